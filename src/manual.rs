//! Shell completions and man pages, generated from the clap definitions (cwreap(8)) and
//! from the policy reference below (cwreap.yaml(5)), so they cannot drift from the code.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

pub fn completions(shell: Shell, out: &mut impl Write) {
    let mut cmd = without_hidden_subcommands(Cli::command());
    clap_complete::generate(shell, &mut cmd, "cwreap", out);
}

/// `cmd` without its hidden subcommands (`generate`, `inject-helper`): clap_complete's
/// generators list every subcommand, hidden or not (checked with clap_complete 4.6), and
/// clap can add subcommands but not remove them, so the root is rebuilt with its own
/// arguments and only the visible subcommands.
fn without_hidden_subcommands(cmd: clap::Command) -> clap::Command {
    // clap keeps names as &'static str; ours is this one (checked by the tests).
    let mut root = clap::Command::new("cwreap")
        .subcommand_required(cmd.is_subcommand_required_set())
        .arg_required_else_help(cmd.is_arg_required_else_help_set());
    if cmd.get_version().is_some() {
        root = root.version(env!("CARGO_PKG_VERSION"));
    }
    if let Some(about) = cmd.get_about() {
        root = root.about(about.clone());
    }
    if let Some(about) = cmd.get_long_about() {
        root = root.long_about(about.clone());
    }
    root.args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// cwreap(8): the whole command line, with every subcommand.
pub fn cwreap_8() -> Result<Vec<u8>> {
    let cmd = Cli::command();
    let mut buf = Vec::new();
    let man = clap_mangen::Man::new(cmd.clone())
        .section("8")
        .manual("System Administration")
        .source(concat!("cwreap ", env!("CARGO_PKG_VERSION")));
    man.render_title(&mut buf)?;
    man.render_name_section(&mut buf)?;
    man.render_synopsis_section(&mut buf)?;
    man.render_description_section(&mut buf)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        writeln!(buf, ".SH \"CWREAP {}\"", sub.get_name().to_uppercase())?;
        let sub_man =
            clap_mangen::Man::new(sub.clone().bin_name(format!("cwreap {}", sub.get_name())));
        sub_man.render_synopsis_section(&mut buf)?;
        sub_man.render_options_section(&mut buf)?;
        if let Some(after) = sub.get_after_help() {
            writeln!(buf, ".PP\n.nf\n{}\n.fi", roff_escape(&after.to_string()))?;
        }
    }
    buf.extend_from_slice(CWREAP_8_TAIL.as_bytes());
    Ok(buf)
}

const CWREAP_8_TAIL: &str = r#".SH "EXIT STATUS"
0 success, also when nothing matched; 1 some socket failed; 2 usage, configuration or privilege error.
.SH PRIVILEGES
Reading another user's /proc/PID/fd and pidfd_getfd need CAP_SYS_PTRACE (and
CAP_DAC_READ_SEARCH without root); SOCK_DESTROY needs CAP_NET_ADMIN; entering other network
namespaces needs CAP_SYS_ADMIN.
.SH FILES
/etc/cwreap/cwreap.yaml, the policy (see cwreap.yaml(5)).
.SH "SEE ALSO"
cwreap.yaml(5), ss(8), systemd.service(5)
"#;

fn roff_escape(s: &str) -> String {
    s.lines()
        .map(|l| {
            let l = l.replace('\\', "\\\\");
            if l.starts_with('.') || l.starts_with('\'') {
                format!("\\&{l}")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// cwreap.yaml(5): the policy file reference.
pub fn cwreap_yaml_5() -> String {
    let mut s = String::new();
    s.push_str(&format!(
        ".TH CWREAP.YAML 5 \"\" \"cwreap {}\" \"File Formats\"\n",
        env!("CARGO_PKG_VERSION")
    ));
    s.push_str(".SH NAME\ncwreap.yaml \\- policy for the cwreap daemon\n");
    s.push_str(".SH DESCRIPTION\nThe policy `cwreap run` reads (default /etc/cwreap/cwreap.yaml). Unknown keys, bad values and duplicate target names are errors reported as FILE:LINE:COL; `cwreap check --config FILE` validates a file and prints the effective policy. When cwreap runs privileged, the file must be owned by root and not writable by group or others.\n");
    for (section, keys) in POLICY_KEYS {
        s.push_str(&format!(".SH \"{section}\"\n"));
        for (key, text) in *keys {
            s.push_str(&format!(".TP\n.B {key}\n{}\n", roff_escape(text)));
        }
    }
    s.push_str(".SH EXAMPLE\n.nf\n");
    s.push_str(&roff_escape(EXAMPLE));
    s.push_str("\n.fi\n.SH \"SEE ALSO\"\ncwreap(8)\n");
    s
}

/// The policy keys, one line of reference each. Kept next to the parser's defaults.
pub const POLICY_KEYS: &[(&str, &[(&str, &str)])] = &[
    (
        "GLOBAL KEYS",
        &[
            ("interval", "Time between cycles, e.g. 30s. Default 30s."),
            (
                "dry_run",
                "true: report what would be done, touch nothing. Default true.",
            ),
            ("log_format", "text or json. Default text."),
            (
                "audit_log",
                "Absolute path of a JSON Lines file getting one line per action. Optional.",
            ),
            (
                "limits.max_reaps_per_cycle",
                "At most this many socket-touching actions per cycle. Default 100.",
            ),
            (
                "limits.max_reaps_per_minute",
                "At most this many per sliding minute. Default 600.",
            ),
            (
                "metrics.listen",
                "ip:port of the read-only Prometheus endpoint, or off. Default 127.0.0.1:9814.",
            ),
        ],
    ),
    (
        "TARGETS",
        &[
            ("targets[].name", "Unique name; the metrics' target label."),
            (
                "targets[].match",
                "At least one of: pid, pid_file (read every cycle), comm, exe, cmdline (regexes), systemd_unit (e.g. nginx.service), cgroup (path prefix), uid, local_ports. All given criteria must hold.",
            ),
            (
                "targets[].older_than",
                "Required, greater than zero: minimum age in CLOSE_WAIT (a lower bound from tcp_info last_ack_recv). Keep it above connection-pool idle timeouts.",
            ),
            (
                "targets[].min_close_wait",
                "Act only while the process holds at least this many CLOSE_WAIT sockets. Default 1.",
            ),
            (
                "targets[].exclude",
                "remote_cidrs, local_ports, remote_ports: sockets never acted on.",
            ),
            (
                "targets[].action",
                "log (report only), shutdown (pidfd_getfd + verify + shutdown; the default for reaping), or destroy (netlink SOCK_DESTROY: RST, reaches unaccepted connections, needs CAP_NET_ADMIN). Default log.",
            ),
            (
                "targets[].dry_run",
                "Per-target override of the global dry_run.",
            ),
        ],
    ),
];

const EXAMPLE: &str = "interval: 30s
dry_run: false
audit_log: /var/log/cwreap/audit.jsonl
targets:
  - name: api
    match: { systemd_unit: api.service }
    older_than: 10m
    min_close_wait: 20
    exclude: { remote_cidrs: [10.0.0.0/8] }
    action: shutdown";

/// Write every generated file into `dir`.
pub fn generate(dir: &Path) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    let mut put = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        written.push(name.to_string());
        Ok(())
    };
    put("cwreap.8", &cwreap_8()?)?;
    put("cwreap.yaml.5", cwreap_yaml_5().as_bytes())?;
    for (shell, name) in [
        (Shell::Bash, "cwreap.bash"),
        (Shell::Zsh, "_cwreap"),
        (Shell::Fish, "cwreap.fish"),
    ] {
        let mut buf = Vec::new();
        completions(shell, &mut buf);
        put(name, &buf)?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn man_pages_cover_commands_and_keys() {
        let page = String::from_utf8(cwreap_8().expect("render")).expect("utf-8");
        assert!(
            page.contains("\n.TH cwreap 8"),
            "{}",
            &page[..80.min(page.len())]
        );
        for needle in [
            "CWREAP SCAN",
            "CWREAP REAP",
            "CWREAP RUN",
            "CWREAP CHECK",
            "\\-\\-older\\-than",
            "EXIT STATUS",
        ] {
            assert!(page.contains(needle), "cwreap.8 lacks {needle}");
        }
        let yaml = cwreap_yaml_5();
        for key in [
            "interval",
            "older_than",
            "min_close_wait",
            "exclude",
            "destroy",
            "metrics.listen",
        ] {
            assert!(yaml.contains(key), "cwreap.yaml.5 lacks {key}");
        }
    }

    #[test]
    fn man_page_example_is_a_valid_policy() {
        crate::config::parse(EXAMPLE, "example").unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn completions_know_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut buf = Vec::new();
            completions(shell, &mut buf);
            let text = String::from_utf8(buf).expect("utf-8");
            for sub in ["scan", "reap", "run", "check"] {
                assert!(text.contains(sub), "{shell:?} completion lacks {sub}");
            }
            assert!(text.contains("older-than"), "{shell:?}");
            for hidden in ["inject-helper", "inject_helper", "generate"] {
                assert!(
                    !text.contains(hidden),
                    "{shell:?} completion offers {hidden}"
                );
            }
        }
    }

    #[test]
    fn hidden_subcommands_are_only_left_out() {
        let full = Cli::command();
        let visible = without_hidden_subcommands(Cli::command());
        let names = |c: &clap::Command| -> Vec<String> {
            c.get_subcommands()
                .map(|s| s.get_name().to_string())
                .collect()
        };
        let expected: Vec<String> = full
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_string())
            .collect();
        assert_eq!(names(&visible), expected);
        assert!(names(&full).contains(&"inject-helper".to_string()));
        let args = |c: &clap::Command| -> Vec<String> {
            c.get_arguments().map(|a| a.get_id().to_string()).collect()
        };
        assert_eq!(args(&visible), args(&full));
        assert_eq!(visible.get_version(), full.get_version());
        assert_eq!(visible.get_name(), full.get_name());
        let mut help = Vec::new();
        Cli::command()
            .write_long_help(&mut help)
            .expect("render help");
        let help = String::from_utf8(help).expect("utf-8");
        assert!(!help.contains("inject-helper"), "{help}");
    }
}
