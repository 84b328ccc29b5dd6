//! The README cannot rot: every `cwreap` command in its shell blocks must parse with the
//! real command line, files it names must exist, its two opening commands are the ones CI
//! runs, and the read-only ones are run for real.
//!
//! Not run here, and why: `systemctl`/`journalctl` (no systemd in the test sandbox; the
//! unit is checked by tests/systemd_unit.rs), `make deb`/`make install` (run by
//! .ci/package-check), `cargo bench` (run by .ci/run in smoke mode), and the emergency
//! recipes against pid 4242 (the same commands run against real leaky servers in
//! tests/scan_reap.rs and tests/netns_destroy.rs).

mod support;

use std::path::Path;

use clap::Parser;
use cwreap::cli::Cli;

fn readme() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md")
}

/// Lines of ```sh blocks.
fn shell_lines(text: &str) -> Vec<String> {
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
fn words(s: &str) -> Vec<String> {
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
    let mut cmds = Vec::new();
    for line in shell_lines(&readme()) {
        // Drop a trailing comment (none of the commands has a '#' inside quotes).
        let code = line.split(" #").next().unwrap_or("").trim();
        for segment in code.split("&&").flat_map(|s| s.split('|')) {
            // Redirections belong to the shell, not to cwreap.
            let segment = segment.split('>').next().unwrap_or("");
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
    // The whole workspace, and every test binary even after a failure.
    let test_cmd = lines[1].split('#').next().unwrap_or("").trim();
    assert_eq!(
        test_cmd, "cargo test --locked --workspace --no-fail-fast",
        "{}",
        lines[1]
    );
    let ci = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run"))
        .expect(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim().starts_with(test_cmd)),
        ".ci/run must run the README's test command `{test_cmd}`"
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
        "tests/support/fixture.rs",
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
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = root.join("config/cwreap.yaml");
    // `cwreap check` refuses a group/other-writable or non-root-owned file when privileged;
    // a checkout may be either, so check a private copy.
    let dir = std::env::temp_dir().join(format!("cwreap-readme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let copy = dir.join("cwreap.yaml");
    std::fs::copy(&cfg, &copy).expect("copy");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let copy_s = copy.to_string_lossy().into_owned();
    for args in [
        vec!["check", "--config", copy_s.as_str()],
        vec!["completions", "bash"],
        vec!["scan", "--port", "1", "--json"],
        vec!["--help"],
    ] {
        let out = support::cwreap(&args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            support::stderr(&out)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
