//! The README cannot rot: every `cwreap` command in its shell blocks must parse with the
//! real command line, files it names must exist, its two opening commands are the ones CI
//! runs, and the read-only ones are run for real.
//!
//! The "Try it in one minute" block runs as written (but for its two `cargo build` lines:
//! the test binaries are the same programs), and its output has the shape of the samples.
//!
//! Not run here, and why: `systemctl`/`journalctl` (no systemd in the test sandbox; the
//! unit is checked by tests/it/systemd_unit.rs), `make deb`/`make install` (run by
//! .ci/package-check), `cargo bench` (run by .ci/run in smoke mode), and the emergency
//! recipes against pid 4242 (the same commands run against real leaky servers in
//! tests/it/scan_reap.rs and tests/it/netns_destroy.rs).

use std::os::unix::process::CommandExt;
use std::path::Path;

use clap::Parser;
use cwreap::cli::args::Cli;

use crate::support::{Scratch, cwreap, cwreap_bin, fixture_bin, stderr, without_pins};

pub(super) fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md")
}

/// Lines of ```sh blocks.
pub(super) fn shell_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            inside = !inside && t == "```sh";
            continue;
        }
        if inside && !t.is_empty() {
            out.push(t.to_string());
        }
    }
    out
}

/// Split like a shell would for these simple lines: whitespace, single and double quotes.
pub(super) fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote: Option<char> = None;
    let mut any = false;
    for c in s.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                any = true;
            }
            (None, c) if c.is_whitespace() => {
                if any || !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            (None, c) => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Every cwreap invocation in the README's shell blocks, as argv (program name first).
fn cwreap_commands() -> Vec<Vec<String>> {
    cwreap_commands_in(&readme())
}

/// Every cwreap invocation in the shell blocks of `text`, as argv (program name first).
pub(super) fn cwreap_commands_in(text: &str) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    for line in shell_lines(text) {
        // Drop a trailing comment (none of the commands has a '#' inside quotes).
        let code = line.split(" #").next().unwrap_or("").trim();
        // The port the Try-it block reads from the fixture's output.
        let code = code.replace("$PORT", "7000");
        for segment in code.split("&&").flat_map(|s| s.split('|')) {
            // Redirections belong to the shell, not to cwreap.
            let segment = segment.split('>').next().unwrap_or("");
            let segment = segment.trim_end_matches('&');
            let mut w = words(segment.trim());
            if w.first().is_some_and(|x| x == "sudo") {
                w.remove(0);
            }
            let is_cwreap = w
                .first()
                .is_some_and(|p| p == "cwreap" || p.ends_with("/cwreap"));
            if is_cwreap {
                cmds.push(w);
            }
        }
    }
    cmds
}

#[test]
fn every_cwreap_command_in_the_readme_parses() {
    let cmds = cwreap_commands();
    assert!(
        cmds.len() >= 15,
        "found only {} commands: {cmds:?}",
        cmds.len()
    );
    for argv in &cmds {
        if let Err(e) = Cli::try_parse_from(argv) {
            let ok = matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            );
            assert!(ok, "README command does not parse: {argv:?}\n{e}");
        }
    }
    // Each subcommand the README teaches appears at least once.
    for sub in ["scan", "reap", "explain", "run", "check"] {
        assert!(
            cmds.iter().any(|a| a.get(1).is_some_and(|s| s == sub)),
            "README shows no `cwreap {sub}`"
        );
    }
}

#[test]
fn readme_opens_with_the_two_commands_ci_runs() {
    let lines = shell_lines(&readme());
    assert!(
        lines[0].starts_with("cargo run --release --bin cwreap -- scan"),
        "{}",
        lines[0]
    );
    // The whole workspace, every test binary even after a failure, and the tests that need
    // root too.
    let test_cmd = lines[1].split('#').next().unwrap_or("").trim();
    assert_eq!(
        test_cmd, "cargo test --locked --workspace --no-fail-fast -- --include-ignored",
        "{}",
        lines[1]
    );
    let ci = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run"))
        .expect(".ci/run");
    assert!(
        ci.lines()
            .any(|l| l.trim().starts_with(&format!("{test_cmd} "))),
        ".ci/run must run the README's test command `{test_cmd}`"
    );
    let make = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Makefile"))
        .expect("Makefile");
    assert!(
        make.lines()
            .any(|l| l.trim() == test_cmd.replacen("cargo", "$(CARGO)", 1)),
        "`make test` must run the README's test command `{test_cmd}`"
    );
}

#[test]
fn files_the_readme_names_exist() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for f in [
        "config/cwreap.yaml",
        "config/examples",
        "config/cwreap.rules.yml",
        "systemd/cwreap.service",
        "deploy/kubernetes/cwreap-daemonset.yaml",
        "Makefile",
        "testkit/src/fixture/mod.rs",
        "docs/SECURITY.md",
    ] {
        let text = readme();
        if text.contains(f) {
            assert!(
                root.join(f).exists(),
                "README names {f}, which does not exist"
            );
        }
    }
}

#[test]
fn read_only_readme_commands_run() {
    for args in [
        vec!["completions", "bash"],
        vec!["scan", "--port", "1", "--json"],
        vec!["--help"],
    ] {
        let out = cwreap(&args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }
}

#[test]
#[ignore = "needs root: `cwreap check` of the shipped policy proves that its audit log directory, /var/log/cwreap, can be created"]
fn the_readme_check_command_accepts_the_shipped_policy() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = root.join("config/cwreap.yaml");
    // `cwreap check` refuses a group/other-writable or non-root-owned file when privileged;
    // a checkout may be either, so check a private copy.
    let dir = Scratch::new("readme", 0o700);
    let copy = dir.path("cwreap.yaml");
    std::fs::copy(&cfg, &copy).expect("copy");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = cwreap(&["check", "--config", &copy.to_string_lossy()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// The README's section under `heading`: its ```sh block's lines and its plain ``` blocks.
fn section(text: &str, heading: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?}"));
    let rest = &text[start + heading.len()..];
    let body = &rest[..rest.find("\n## ").unwrap_or(rest.len())];
    let (mut sh, mut samples) = (Vec::new(), Vec::new());
    let mut block: Option<(bool, Vec<String>)> = None;
    for line in body.lines() {
        if line.trim_start().starts_with("```") {
            match block.take() {
                None => block = Some((line.trim() == "```sh", Vec::new())),
                Some((true, lines)) => sh = lines,
                Some((false, lines)) => samples.push(lines),
            }
        } else if let Some((_, lines)) = block.as_mut() {
            lines.push(line.to_string());
        }
    }
    (sh, samples)
}

/// What a line of cwreap's table output looks like, values reduced to their kind: numbers,
/// ages, addresses, fd counts; headers and words stay as they are.
fn shape(line: &str) -> Vec<String> {
    line.split_whitespace()
        .map(|t| {
            let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            let kind = if digits(t) {
                "N"
            } else if t.parse::<std::net::SocketAddr>().is_ok() {
                "ADDR"
            } else if t.strip_suffix('s').is_some_and(digits) {
                "AGE"
            } else if t
                .split_once('/')
                .is_some_and(|(a, b)| digits(a) && digits(b))
            {
                "N/N"
            } else if t.starts_with('(') && t.ends_with("%)") {
                "(N%)"
            } else if t.strip_prefix('×').is_some_and(digits) {
                "×N"
            } else {
                return t.trim_end_matches(',').to_string();
            };
            kind.to_string()
        })
        .collect()
}

/// `got` has the shape of `sample`, line by line; else a message with both.
fn same_shape(what: &str, sample: &[String], got: &[String]) -> Result<(), String> {
    let differs =
        sample.len() != got.len() || sample.iter().zip(got).any(|(a, b)| shape(a) != shape(b));
    if differs {
        return Err(format!(
            "{what}: output does not have the README sample's shape\n--- sample:\n{}\n--- got:\n{}",
            sample.join("\n"),
            got.join("\n")
        ));
    }
    Ok(())
}

#[test]
#[ignore = "needs root: its `cwreap reap` duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn the_try_it_block_runs_as_written() {
    let (block, samples) = section(&readme(), "## Try it in one minute");
    assert_eq!(samples.len(), 2, "the scan and reap samples");
    let dir = std::env::temp_dir().join(format!("cwreap-tryit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    // The block as written, each line after a marker so its output can be told apart. The
    // `cargo build` lines are left out (these binaries are what they build), and the pause
    // that lets the sockets age is a wait on that condition instead, so a busy machine
    // cannot make it too short.
    let mut script = String::from("set -e\n");
    let mut commands = Vec::new();
    for line in &block {
        if line.starts_with("cargo build") {
            continue;
        }
        let line = line
            .replace("target/release/cwreap-fixture", "\u{0}fixture\u{0}")
            .replace("target/release/cwreap", &cwreap_bin().to_string_lossy())
            // Last: the test binaries' own paths may contain `target/release/cwreap`.
            .replace("\u{0}fixture\u{0}", &fixture_bin().to_string_lossy());
        let line = if line.starts_with("sleep ") {
            format!(
                "until [ \"$({} scan --port $PORT --older-than 1s --json | grep -c .)\" = 3 ]; do sleep 0.1; done",
                cwreap_bin().display()
            )
        } else {
            line
        };
        script.push_str(&format!("echo '@@ {}'\n{line}\n", commands.len()));
        commands.push(line);
    }
    // Then the client's last lines: it exits by itself once each connection got its EOF.
    script.push_str("wait\n");
    // A daemon elsewhere on the machine must not lend the block its exact ages.
    let child = without_pins(&mut std::process::Command::new("bash"))
        .arg("-c")
        .arg(&script)
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run bash");
    let pgid = child.id();
    let (done, finished) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        // Only a guard against a hang: the block ends long before.
        if finished
            .recv_timeout(crate::support::HANG_GUARD * 2)
            .is_err()
        {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .status();
        }
    });
    let out = child.wait_with_output().expect("bash output");
    let _ = done.send(());
    let _ = guard.join();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let server_log = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    let context =
        format!("--- stdout:\n{stdout}\n--- stderr:\n{stderr}\n--- server.log:\n{server_log}");
    assert!(
        out.status.success(),
        "the block failed ({})\n{context}",
        out.status
    );

    // The client's lines, wherever they landed: one announcement, then one EOF each.
    let is_client = |l: &str| {
        l.starts_with("half-closed 3 connection(s) to 127.0.0.1:")
            || l.strip_prefix("eof ")
                .is_some_and(|n| n.parse::<u32>().is_ok())
    };
    let client: Vec<&str> = stdout.lines().filter(|l| is_client(l)).collect();
    let eofs: std::collections::BTreeSet<&str> = client
        .iter()
        .filter(|l| l.starts_with("eof"))
        .copied()
        .collect();
    assert_eq!(client.len(), 4, "{context}");
    assert_eq!(
        eofs,
        ["eof 0", "eof 1", "eof 2"].into_iter().collect(),
        "{context}"
    );
    // The server's events are in its log, not on the terminal.
    let count = |p: &str| server_log.lines().filter(|l| l.starts_with(p)).count();
    assert!(server_log.starts_with("listen 127.0.0.1:"), "{context}");
    assert_eq!((count("accepted "), count("eof ")), (3, 3), "{context}");
    assert!(!stdout.contains("accepted "), "{context}");

    // Each cwreap command's output, by its marker.
    let mut by_command: Vec<Vec<String>> = vec![Vec::new(); commands.len()];
    let mut current = None;
    for line in stdout.lines() {
        if let Some(i) = line
            .strip_prefix("@@ ")
            .and_then(|i| i.parse::<usize>().ok())
        {
            current = Some(i);
        } else if let Some(i) = current
            && !is_client(line)
        {
            by_command[i].push(line.to_string());
        }
    }
    let output_of = |what: &str, pick: &dyn Fn(&str) -> bool| -> &Vec<String> {
        let i = commands
            .iter()
            .position(|c| pick(c))
            .unwrap_or_else(|| panic!("no {what} command in the block"));
        &by_command[i]
    };
    let cwreap = |sub: &str| format!("{} {sub} ", cwreap_bin().display());
    let scan = output_of("scan", &|c| c.starts_with(&cwreap("scan")));
    let dry = output_of("dry-run", &|c| {
        c.starts_with(&cwreap("reap")) && c.contains("--dry-run")
    });
    let reap = output_of("reap", &|c| {
        c.starts_with(&cwreap("reap")) && !c.contains("--dry-run")
    });
    let dry_sample: Vec<String> = samples[1]
        .iter()
        .map(|l| match l.strip_suffix("reaped") {
            Some(row) => format!("{row}dry_run"),
            None => l.replace("reap: ", "reap (dry run): "),
        })
        .collect();
    // A process this machine will not let root read (here the VM's init, which holds a
    // capability root lacks) is said in one more line than the sample has: it must name
    // exactly the processes whose fds cannot be read, counted apart.
    let unreadable = unreadable_processes();
    let scan: Vec<String> = scan
        .iter()
        .filter(|l| {
            let Some(n) = l
                .strip_prefix("Skipped 0 process(es) that exited during the scan and ")
                .and_then(|r| r.strip_suffix(" that could not be read."))
            else {
                return true;
            };
            assert_eq!(
                n.parse::<usize>().ok(),
                Some(unreadable.len()),
                "unreadable processes: {unreadable:?}\n{context}"
            );
            false
        })
        .cloned()
        .collect();
    let scan = &scan;
    let mut failures = Vec::new();
    for (what, sample, got) in [
        ("scan", &samples[0], scan),
        ("reap --dry-run", &dry_sample, dry),
        ("reap", &samples[1], reap),
    ] {
        if let Err(e) = same_shape(what, sample, got) {
            failures.push(e);
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // And the counts the samples show.
    assert!(
        reap.iter()
            .any(|l| l.starts_with("reap: 3 matched, 3 reaped,")),
        "{context}"
    );
}

/// The processes whose fds root may not read here (readlink of an fd fails with EACCES or
/// EPERM), by pid.
fn unreadable_processes() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        let denied = fds.flatten().any(|fd| {
            std::fs::read_link(fd.path())
                .is_err_and(|e| matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)))
        });
        if denied {
            out.push(pid);
        }
    }
    out.sort_unstable();
    out
}
