//! Shell completions and man pages, generated from the clap definitions (cwreap(8)) and
//! from the policy reference below (cwreap.yaml(5)), so they cannot drift from the code.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::args::Cli;

mod reference;

/// Subcommands that `--help` and the man page show but completions leave out: packaging's.
pub const NOT_COMPLETED: [&str; 1] = ["generate"];

/// A shell completion script. Hidden subcommands (the injection helper) and packaging's
/// `generate` are left out: completions offer only what a user types.
pub fn completions(shell: Shell, out: &mut impl Write) {
    let mut cmd = without_hidden_subcommands(Cli::command());
    clap_complete::generate(shell, &mut cmd, "cwreap", out);
}

/// `cmd` without its hidden subcommands (`inject-helper`) and [`NOT_COMPLETED`]: clap_complete's
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
    root.args(cmd.get_arguments().cloned()).subcommands(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set() && !NOT_COMPLETED.contains(&s.get_name()))
            .cloned(),
    )
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
    buf.extend_from_slice(reference::CWREAP_8_TAIL.as_bytes());
    Ok(code_spans_in_roff(buf))
}

/// `text` with each Markdown code span (`x`) set in bold (\fBx\fR), so a help text written
/// for the terminal renders as roff. A line with an odd number of backticks is left as it
/// is (the tests then find the backtick).
fn code_spans(line: &str) -> String {
    if !line.contains('`') || line.matches('`').count() % 2 == 1 {
        return line.to_owned();
    }
    let mut out = String::with_capacity(line.len() + 16);
    for (k, piece) in line.split('`').enumerate() {
        if k % 2 == 1 {
            out.push_str("\\fB");
            out.push_str(piece);
            out.push_str("\\fR");
        } else {
            out.push_str(piece);
        }
    }
    out
}

/// A whole roff page with the code spans of its text lines in bold.
fn code_spans_in_roff(page: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&page);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        out.push_str(&code_spans(line));
    }
    out.into_bytes()
}

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
    s.push_str(".SH DESCRIPTION\nThe policy \\fBcwreap run\\fR reads (default /etc/cwreap/cwreap.yaml). Unknown keys, bad values and duplicate target names are errors reported as FILE:LINE:COL; \\fBcwreap check --config FILE\\fR validates a file and prints the effective policy. When cwreap runs privileged, the file must be owned by root and not writable by group or others.\n");
    for (section, keys) in POLICY_KEYS {
        s.push_str(&format!(".SH \"{section}\"\n"));
        for (key, text) in *keys {
            s.push_str(&format!(
                ".TP\n.B {key}\n{}\n",
                code_spans(&roff_escape(text))
            ));
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
            (
                "interval",
                "Time between cycles, e.g. 30s; at least 100ms. Default 30s.",
            ),
            (
                "dry_run",
                "true: report what would be done, touch nothing. Default true.",
            ),
            (
                "log_format",
                "text or json, for lines on stderr. Default text. When stderr is the journal, entries go to journald with every field a journal field (see cwreap(8), JOURNAL_STREAM) whatever this says.",
            ),
            (
                "audit_log",
                "Absolute path of a JSON Lines file getting one line per action (event action), per release check (event fd_release), and, before a cycle changes any socket, one per socket it will act on (event intent), synced to disk first so a killed daemon leaves a record of every socket it touched. Lines are always whole: a torn last line (crash, full disk) is cut off; lost records count in cwreap_audit_write_errors_total. Every directory on the path must belong to root or the daemon's uid and not be writable by group or others unless sticky; the file is never followed as a symlink and must be a regular file (created mode 0600; a missing directory is created mode 0750). Reopened on SIGHUP, for logrotate (nocreate, then reload). Optional.",
            ),
            (
                "on_audit_failure",
                "skip or act: when the intent records of a cycle cannot be written (a full or failing disk), skip acts on nothing that changes a socket (each skipped action counted in cwreap_actions_skipped_unrecorded_total and the failure logged), act goes on and relies on the journal. Default skip: no action without a record.",
            ),
            (
                "discovery",
                "auto, events or poll: how the daemon finds CLOSE_WAIT sockets. events: BPF tracepoints on the TCP state change (inet_sock_set_state, tcp_destroy_sock) report each socket as it enters and leaves CLOSE_WAIT, with the kernel's time of entry, so ages are exact (age_source event) and no dump runs between reconciliations (at start, every 10 minutes, and after any lost event); needs Linux 5.12 with BTF and CAP_BPF with CAP_PERFMON (the events.conf drop-in). The entry times are pinned under /sys/fs/bpf/cwreap for scan, reap and explain run as root, trusted only while this daemon lives and beats. poll: a sock_diag dump every cycle. auto (default): events when the programs load, else poll, saying why once. events refuses to start without them. The mode in use is logged at start and exported as cwreap_discovery_mode{mode}.",
            ),
            (
                "where",
                "on or off: keep the BPF programs of explain --where attached to the targets' processes while the daemon runs (Linux 6.3 with BTF, CAP_BPF and CAP_PERFMON), and publish, per socket, the user stack of the read that returned its EOF and of its accept or connect, in the run directory (/run/cwreap/where), for `cwreap explain --where` run as root, trusted only while this daemon lives. explain --where then names the code of leaks whose EOF came before it ran, and needs no --for. Where the programs cannot be loaded the daemon says why once and runs on. Default off; a change takes effect at the next restart.",
            ),
            (
                "still_held_after",
                "How long the owner of a socket cwreap shut down has to close its fd before the verdict is still_held (event fd_release, cwreap_fd_released_total). The owner is looked at every cycle until then: released as soon as it lets go, gone if the process exits, still_held if the fd still names the same socket at the end of the window. Default 3 intervals or 30s, whichever is longer, so an app that closes on its next heartbeat or poll is not reported.",
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
                "limits.max_escalations_per_minute",
                "At most this many escalations (fd-limit raises and signals) per sliding minute, a budget apart from the reaps: escalations run first in a cycle, so no reap holds one back. One that is due past it is deferred, counted in cwreap_escalations_deferred_total and logged once. Default 60.",
            ),
            (
                "metrics.listen",
                "ip:port of the read-only Prometheus endpoint, or off (also `metrics: off`). Default 127.0.0.1:9814.",
            ),
        ],
    ),
    (
        "TARGETS",
        &[
            ("targets[].name", "Unique name; the metrics' target label."),
            (
                "targets[].match",
                "Which processes (and sockets) the target is about: at least one criterion; all given must hold. Regexes are unanchored, like grep's. A socket belongs to the first target whose criteria, local_ports and exclude included, accept it.",
            ),
            ("targets[].match.pid", "A process id."),
            (
                "targets[].match.pid_file",
                "Absolute path of a file holding a pid, read every cycle (a missing file matches nothing).",
            ),
            (
                "targets[].match.comm",
                "Regex on the process name (/proc/PID/comm).",
            ),
            (
                "targets[].match.exe",
                "Regex on the executable's path (/proc/PID/exe).",
            ),
            (
                "targets[].match.cmdline",
                "Regex on the command line, arguments joined by spaces.",
            ),
            (
                "targets[].match.systemd_unit",
                "A *.service or *.scope unit the process runs in (from /proc/PID/cgroup).",
            ),
            (
                "targets[].match.cgroup",
                "A cgroup v2 path prefix, compared component by component.",
            ),
            (
                "targets[].match.uid",
                "The process's effective user (the owner of /proc/PID), by id or name.",
            ),
            (
                "targets[].match.local_ports",
                "A socket criterion: only sockets whose local port is one of these (a server's ports).",
            ),
            (
                "targets[].match.remote_ports",
                "A socket criterion: only sockets whose peer's port is one of these (a client pool's servers: a database, Redis...).",
            ),
            (
                "targets[].match.local_cidrs",
                "A socket criterion: only sockets whose local address is in one of these CIDRs (a bare IP is a /32 or /128).",
            ),
            (
                "targets[].match.remote_cidrs",
                "A socket criterion: only sockets whose peer is in one of these CIDRs (an IPv4 CIDR also matches ::ffff:a.b.c.d peers).",
            ),
            (
                "targets[].older_than",
                "Required, greater than zero: minimum time in CLOSE_WAIT, decided on the lower bound of the socket's age, never the upper: the exact time of the state change when event discovery saw it; otherwise the larger of the time since the daemon first saw it in CLOSE_WAIT and tcp_info last_ack_recv (which keepalive probes and heartbeats reset). The daemon publishes its first sights, so `cwreap scan` run beside it ages sockets the same way. Keep it above connection-pool idle timeouts.",
            ),
            (
                "targets[].min_close_wait",
                "Act only while the process holds at least this many CLOSE_WAIT sockets that this target selects, whatever their age (older_than then picks among them). Default 1.",
            ),
            (
                "targets[].exclude",
                "Sockets never acted on, whatever else matches.",
            ),
            (
                "targets[].exclude.remote_cidrs",
                "Peer addresses: CIDRs or bare IPs (IPv4 peers seen as ::ffff:a.b.c.d match IPv4 CIDRs too).",
            ),
            (
                "targets[].exclude.local_ports",
                "Local ports to leave alone.",
            ),
            (
                "targets[].exclude.remote_ports",
                "Peer ports to leave alone.",
            ),
            (
                "targets[].action",
                "log (report only), shutdown (pidfd_getfd + verify + shutdown; the default for reaping), or destroy (netlink SOCK_DESTROY: RST, reaches unaccepted connections, needs CAP_NET_ADMIN). Default log.",
            ),
            (
                "targets[].dry_run",
                "Per-target override of the global dry_run.",
            ),
            (
                "targets[].escalate",
                "Opt-in, for apps that keep their fds after shutdown: raise_fd_limit_at, signal_at, raise_before_emfile, signal_before_emfile, signal. Neither touches a socket or an fd of the process; the daemon never closes fds inside a target (the old close_after is refused). Each happens once per process and per mode: in a dry run it is recorded as what would have happened (outcome dry_run), and the real one stays armed for when the policy enforces (after a reload or a restart).",
            ),
            (
                "targets[].escalate.raise_fd_limit_at",
                "A percentage (e.g. 80%): when a process of the target holds at least min_close_wait leaking sockets (in CLOSE_WAIT, or dead held: ended connections whose fd it still holds, those cwreap shut down among them) and its open fds reach this share of its soft RLIMIT_NOFILE, raise the soft limit to the hard limit (prlimit), once per process; the hard limit is never changed, and limits the process changed since they were read are left as it set them (nothing raised, audited as skipped). Never when the soft limit is 1024 or less (select() with FD_SETSIZE breaks above it), so never on a service whose LimitNOFILE was not raised. Needs CAP_SYS_RESOURCE.",
            ),
            (
                "targets[].escalate.signal_at",
                "A percentage above raise_fd_limit_at (e.g. 95%): on the same condition, send `signal` through the pidfd held since attribution (never to a reused pid), once per process, within limits.max_escalations_per_minute: a restart before EMFILE. A percentage fires too late when the leak uses up the headroom above it within one interval (the daemon warns when it sees that); use signal_before_emfile then. Needs CAP_KILL.",
            ),
            (
                "targets[].escalate.raise_before_emfile",
                "A duration (e.g. 10m): raise the fd limit, as raise_fd_limit_at does, once the forecast puts EMFILE within it. The forecast is the growth of the process's open fds over the last minute (one sample per cycle; the estimator of `cwreap explain`) carried to its soft limit; it needs two cycles to see a rate. Longer than signal_before_emfile.",
            ),
            (
                "targets[].escalate.signal_before_emfile",
                "A duration (e.g. 2m): send `signal`, as signal_at does, once the forecast puts EMFILE within it. Keep it a few intervals long: a 5 fds/s leak with interval 5s moves 25 fds between two looks.",
            ),
            (
                "targets[].escalate.signal",
                "SIGTERM (default), SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 or SIGKILL.",
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
            "CWREAP EXPLAIN",
            "eof_unwatched",
            "pool_idle",
            "hsperfdata",
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

    /// Every key the policy parser accepts, asked of the parser itself: an unknown key at
    /// each level gets an error that lists the valid ones.
    fn schema_keys() -> Vec<String> {
        let levels: &[(&str, &str)] = &[
            ("", "zzzzzzzz: 1\n"),
            ("limits.", "limits: {zzzzzzzz: 1}\n"),
            ("metrics.", "metrics: {zzzzzzzz: 1}\n"),
            ("targets[].", "targets:\n  - {name: a, zzzzzzzz: 1}\n"),
            (
                "targets[].match.",
                "targets:\n  - {name: a, match: {zzzzzzzz: 1}}\n",
            ),
            (
                "targets[].exclude.",
                "targets:\n  - {name: a, match: {comm: x}, older_than: 1m, exclude: {zzzzzzzz: 1}}\n",
            ),
            (
                "targets[].escalate.",
                "targets:\n  - {name: a, match: {comm: x}, older_than: 1m, escalate: {zzzzzzzz: 1}}\n",
            ),
        ];
        let mut keys = Vec::new();
        for (prefix, text) in levels {
            let err = match crate::shared::config::parse(text, "schema.yaml") {
                Ok(_) => panic!("{text} parsed"),
                Err(e) => e.to_string(),
            };
            let list = err
                .split("valid keys: ")
                .nth(1)
                .unwrap_or_else(|| panic!("no key list in: {err}"));
            for k in list.split(", ") {
                keys.push(format!("{prefix}{}", k.trim()));
            }
        }
        keys
    }

    #[test]
    fn man_page_documents_every_policy_key() {
        let documented: Vec<&str> = POLICY_KEYS
            .iter()
            .flat_map(|(_, keys)| keys.iter().map(|(k, _)| *k))
            .collect();
        let keys = schema_keys();
        assert!(keys.len() > 30, "the schema was read: {keys:?}");
        // Blocks are documented by their keys; the removed `close_after` by the text that
        // says it is refused.
        let page = cwreap_yaml_5();
        for k in &keys {
            if k == "targets[].escalate.close_after" {
                assert!(page.contains("close_after"), "the refusal is documented");
                continue;
            }
            let block_with_keys = keys.iter().any(|other| {
                other.starts_with(&format!("{k}.")) || other.starts_with(&format!("{k}[]."))
            });
            assert!(
                block_with_keys || documented.contains(&k.as_str()),
                "cwreap.yaml(5) does not document `{k}`"
            );
            let shown = k.trim_end_matches('.');
            assert!(
                block_with_keys || page.contains(shown),
                "cwreap.yaml(5) lacks {k}"
            );
        }
    }

    #[test]
    fn man_page_example_is_a_valid_policy() {
        crate::shared::config::parse(EXAMPLE, "example").unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn completions_know_the_subcommands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut buf = Vec::new();
            completions(shell, &mut buf);
            let text = String::from_utf8(buf).expect("utf-8");
            for sub in ["scan", "reap", "explain", "run", "check"] {
                assert!(text.contains(sub), "{shell:?} completion lacks {sub}");
            }
            assert!(
                !text.contains("generate"),
                "{shell:?} offers the hidden `generate`"
            );
            assert!(
                !text.contains("out-dir"),
                "{shell:?} offers `generate`'s flag"
            );
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
            .filter(|s| !s.is_hide_set() && !NOT_COMPLETED.contains(&s.get_name()))
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
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with("generate ")),
            "packaging's generate is in --help: {help}"
        );
    }

    #[test]
    fn man_pages_are_roff_without_markdown() {
        let pages = [
            (
                "cwreap.8",
                String::from_utf8(cwreap_8().expect("render")).expect("utf-8"),
            ),
            ("cwreap.yaml.5", cwreap_yaml_5()),
        ];
        for (name, page) in &pages {
            for artefact in ["`", "**", "](#", "](http"] {
                let line = page.lines().find(|l| l.contains(artefact));
                assert!(line.is_none(), "{name} has {artefact:?}: {line:?}");
            }
            assert!(page.contains("\\fB"), "{name} sets code in bold");
        }
        let page = &pages[0].1;
        for section in [
            "OUTCOMES",
            "\"EXIT STATUS\"",
            "\"JSON OUTPUT\"",
            "SIGNALS",
            "\"AUDIT LOG\"",
            "METRICS",
            "FILES",
            "ENVIRONMENT",
            "PRIVILEGES",
            "\"CWREAP GENERATE\"",
        ] {
            assert!(
                page.contains(&format!("\n.SH {section}\n")),
                "cwreap.8 has no section {section}"
            );
        }
        for word in [
            "reaped",
            "dry_run",
            "gone",
            "changed",
            "skipped",
            "SIGHUP",
            "SIGTERM",
            "SIGINT",
            "intent",
            "fd_release",
            "escalation",
        ] {
            assert!(page.contains(word), "cwreap.8 lacks {word}");
        }
    }

    #[test]
    fn code_spans_become_bold() {
        assert_eq!(
            code_spans("run `cwreap check` now"),
            "run \\fBcwreap check\\fR now"
        );
        assert_eq!(code_spans("odd ` left"), "odd ` left");
        assert_eq!(code_spans("none"), "none");
    }
}
