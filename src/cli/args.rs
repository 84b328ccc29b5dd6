//! The command line (clap definitions). Values are parsed and checked here, so a bad
//! regex, port or duration is a usage error (exit 2) naming the flag.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use regex::Regex;

use crate::cli::plan::Filter;
use crate::shared::attribute::Scope;
use crate::shared::selector::{Exclude, Selector};
use crate::shared::values;

#[derive(Debug, Parser)]
#[command(
    name = "cwreap",
    version,
    about = "Find and reap TCP sockets stuck in CLOSE_WAIT",
    long_about = "Find TCP sockets stuck in CLOSE_WAIT (the peer closed, the application never \
did) and shut them down from outside the owning process, after verifying each one."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List CLOSE_WAIT sockets with owner, age and fd headroom (read-only)
    #[command(after_help = SCAN_EXAMPLES)]
    Scan(ScanArgs),
    /// Shut down matching CLOSE_WAIT sockets now (verified one by one)
    #[command(after_help = REAP_EXAMPLES)]
    Reap(ReapArgs),
    /// Tell which bug class leaks CLOSE_WAIT sockets, and when EMFILE will hit (read-only)
    #[command(after_help = EXPLAIN_EXAMPLES)]
    Explain(ExplainArgs),
    /// Run the policy daemon (the systemd service)
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Validate a policy file and print the effective policy
    #[command(after_help = CHECK_EXAMPLES)]
    Check(CheckArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions(CompletionsArgs),
    /// Write the man pages and completion scripts into a directory (for packaging)
    Generate(GenerateArgs),
    /// Internal: the process that runs an injected close() for `reap --close` (request on
    /// stdin, target's pidfd on fd 3, report on stdout)
    #[command(hide = true)]
    InjectHelper,
}

const COMPLETIONS_EXAMPLES: &str = "Examples:
  cwreap completions bash | sudo tee /usr/share/bash-completion/completions/cwreap
  cwreap completions zsh  > ~/.zfunc/_cwreap
  cwreap completions fish > ~/.config/fish/completions/cwreap.fish";

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Directory to write cwreap.8, cwreap.yaml.5, cwreap.bash, _cwreap and cwreap.fish into
    #[arg(long, value_name = "DIR")]
    pub out_dir: std::path::PathBuf,
}

pub const DEFAULT_CONFIG: &str = "/etc/cwreap/cwreap.yaml";

const RUN_EXAMPLES: &str = "Examples:
  cwreap run                                     # /etc/cwreap/cwreap.yaml
  cwreap run --config ./cwreap.yaml --dry-run    # report only, whatever the file says
  cwreap run --pid-file /run/cwreap.pid          # then: kill -HUP \"$(cat /run/cwreap.pid)\"
  systemctl reload cwreap                        # SIGHUP: re-read the policy";

const CHECK_EXAMPLES: &str = "Examples:
  cwreap check --config /etc/cwreap/cwreap.yaml
  cwreap check --config config/examples/node-app.yaml";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Policy file (YAML)
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    pub config: std::path::PathBuf,
    /// Report what would be done; never shut anything down (overrides the file)
    #[arg(long)]
    pub dry_run: bool,
    /// Write the daemon's own pid to this file, for kill -HUP "$(cat PATH)"; removed at
    /// exit. Its directory must be writable only by root or cwreap's user (scan and reap
    /// --pid-file read a target's pid file instead)
    #[arg(long = "pid-file", value_name = "PATH")]
    pub pid_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file (YAML)
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    pub config: std::path::PathBuf,
}

const SCAN_EXAMPLES: &str = "Examples:
  cwreap scan                          # every CLOSE_WAIT socket on this host (on a terminal,
                                       # a list longer than the screen: per process first)
  cwreap scan --sockets | less         # every socket, whatever the screen
  cwreap scan --comm '^java$' --older-than 5m
  cwreap scan --port 8080 --json | jq .age_ms
  cwreap scan --watch 5s               # live view during an incident";

const REAP_EXAMPLES: &str = "Examples:
  cwreap reap --pid 4242 --older-than 10m --dry-run   # what would happen, permission proven
  cwreap reap --pid 4242 --older-than 10m             # do it
  cwreap reap --comm '^node$' --port 3000 --older-than 2m --max 500 --json
  cwreap reap --port 8080 --older-than 5m --destroy                   # RST, also unaccepted ones
  cwreap reap --pid 4242 --older-than 10m --close --yes               # free fd slots; see HAZARD";

/// What selects sockets on the command line: the same criteria as a policy target's
/// `match` and `exclude` blocks (see [`crate::shared::selector::Selector`]). Each flag may be
/// repeated: values of one flag OR, different flags AND.
#[derive(Debug, Clone, Default, Args)]
pub struct Selectors {
    /// Never read the running daemon's exact entry times (its pinned BPF map): ages are
    /// then its first sights and tcp_info's bounds, as without events
    #[arg(long, help_heading = "Ages")]
    pub no_bpf: bool,
    /// Only this process
    #[arg(long = "pid", value_name = "PID", value_parser = values::parse_pid, help_heading = "Selectors")]
    pub pids: Vec<i32>,
    /// Only the process whose pid this file holds (read once, never written)
    #[arg(long = "pid-file", value_name = "PATH", value_parser = values::parse_absolute_path, help_heading = "Selectors")]
    pub pid_files: Vec<PathBuf>,
    /// Only processes whose name (/proc/PID/comm) matches this regex
    #[arg(long, value_name = "REGEX", value_parser = values::parse_regex, help_heading = "Selectors")]
    pub comm: Vec<Regex>,
    /// Only processes whose executable's path matches this regex
    #[arg(long, value_name = "REGEX", value_parser = values::parse_regex, help_heading = "Selectors")]
    pub exe: Vec<Regex>,
    /// Only processes whose command line (arguments joined by spaces) matches this regex
    #[arg(long, value_name = "REGEX", value_parser = values::parse_regex, help_heading = "Selectors")]
    pub cmdline: Vec<Regex>,
    /// Only processes of this systemd unit (e.g. nginx.service), from /proc/PID/cgroup
    #[arg(long, value_name = "NAME", value_parser = values::parse_unit, help_heading = "Selectors")]
    pub unit: Vec<String>,
    /// Only processes in this cgroup v2 path or below it (e.g. /system.slice)
    #[arg(long, value_name = "PREFIX", value_parser = values::parse_cgroup_prefix, help_heading = "Selectors")]
    pub cgroup: Vec<String>,
    /// Only processes of this effective user (the owner of /proc/PID), by id or name
    #[arg(long, value_name = "UID|USER", value_parser = values::parse_uid, help_heading = "Selectors")]
    pub uid: Vec<u32>,
    /// Only sockets with this local port (a server's listening port)
    #[arg(long, value_name = "PORT", value_parser = values::parse_port, help_heading = "Selectors")]
    pub port: Vec<u16>,
    /// Only sockets with this local address (a CIDR; a bare IP is a /32 or /128)
    #[arg(long, value_name = "CIDR", value_parser = values::parse_cidr, help_heading = "Selectors")]
    pub local: Vec<IpNet>,
    /// Only sockets whose peer has this port (a client pool's server: Redis, a database...)
    #[arg(long = "remote-port", value_name = "PORT", value_parser = values::parse_port, help_heading = "Selectors")]
    pub remote_port: Vec<u16>,
    /// Only sockets whose peer is in this CIDR (a bare IP is a /32 or /128; an IPv4 one
    /// also matches ::ffff:a.b.c.d)
    #[arg(long, value_name = "CIDR", value_parser = values::parse_cidr, help_heading = "Selectors")]
    pub remote: Vec<IpNet>,
    /// Never sockets whose peer is in this CIDR
    #[arg(long = "exclude-remote", value_name = "CIDR", value_parser = values::parse_cidr, help_heading = "Selectors")]
    pub exclude_remote: Vec<IpNet>,
    /// Never sockets with this local port
    #[arg(long = "exclude-port", value_name = "PORT", value_parser = values::parse_port, help_heading = "Selectors")]
    pub exclude_port: Vec<u16>,
    /// Never sockets whose peer has this port
    #[arg(long = "exclude-remote-port", value_name = "PORT", value_parser = values::parse_port, help_heading = "Selectors")]
    pub exclude_remote_port: Vec<u16>,
    /// Only processes holding at least N CLOSE_WAIT sockets the other selectors match, whatever their age (as the policy's min_close_wait)
    #[arg(long = "min-close-wait", value_name = "N", value_parser = values::parse_count, help_heading = "Selectors")]
    pub min_close_wait: Option<u32>,
}

impl Selectors {
    /// The one selector type the policy uses too.
    pub fn selector(&self) -> Selector {
        Selector {
            pids: self.pids.clone(),
            pid_files: self.pid_files.clone(),
            comm: self.comm.clone(),
            exe: self.exe.clone(),
            cmdline: self.cmdline.clone(),
            units: self.unit.clone(),
            cgroups: self.cgroup.clone(),
            uids: self.uid.clone(),
            local_ports: self.port.clone(),
            remote_ports: self.remote_port.clone(),
            local_cidrs: self.local.clone(),
            remote_cidrs: self.remote.clone(),
            exclude: Exclude {
                remote_cidrs: self.exclude_remote.clone(),
                local_ports: self.exclude_port.clone(),
                remote_ports: self.exclude_remote_port.clone(),
            },
        }
    }

    /// No positive selector at all (exclusions alone do not count).
    pub fn is_empty(&self) -> bool {
        self.selector().is_empty()
    }

    /// Which processes attribution walks: the named pids (from --pid, or else from
    /// --pid-file), or all, narrowed by the process criteria.
    /// Every regex of the command line, compiled again within its share of one budget (as
    /// a policy's are): many large ones are a usage error, not minutes of compiling.
    pub fn check_regex_budget(&self) -> Result<(), crate::shared::usage::UsageError> {
        let all: Vec<&Regex> = self
            .comm
            .iter()
            .chain(&self.exe)
            .chain(&self.cmdline)
            .collect();
        let share = values::regex_share(all.len());
        for re in all {
            values::parse_regex_within(re.as_str(), share).map_err(|e| {
                crate::shared::usage::UsageError(format!(
                    "{e} (the command line's {} regexes share {} KiB)",
                    self.comm.len() + self.exe.len() + self.cmdline.len(),
                    values::REGEX_BUDGET / 1024
                ))
            })?;
        }
        Ok(())
    }

    /// Every `--pid-file` read as it will be trusted: refused, unreadable or missing, it
    /// is a usage error (exit 2) naming why and the fix.
    pub fn check_pid_files(&self) -> Result<(), crate::shared::usage::UsageError> {
        let owners = crate::shared::pid_file::trusted_owners();
        for f in &self.pid_files {
            crate::shared::pid_file::read(f, &owners)
                .map_err(|e| crate::shared::usage::UsageError(e.to_string()))?;
        }
        Ok(())
    }

    pub fn scope(&self) -> Scope {
        let selector = self.selector();
        let pids_from_files = crate::shared::attribute::read_pid_files(&self.pid_files).0;
        let pids = if !self.pids.is_empty() {
            Some(self.pids.clone())
        } else if !self.pid_files.is_empty() {
            Some(pids_from_files.clone())
        } else {
            None
        };
        Scope {
            pids,
            selector,
            pids_from_files,
            dead: true,
        }
    }

    pub fn filter(&self, older_than: Option<Duration>) -> Filter {
        Filter {
            selector: self.selector(),
            pids_from_files: crate::shared::attribute::read_pid_files(&self.pid_files).0,
            older_than,
            min_close_wait: self.min_close_wait,
        }
    }
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub selectors: Selectors,
    /// Only sockets at least this long in CLOSE_WAIT (e.g. 90s, 5m), by the lower bound of
    /// their age (AGE shows it, with an upper bound when far from it)
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// One JSON object per socket per line
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// List every socket, also on a terminal where the list is longer than the screen (it
    /// then shows the per-process summary first). A pipe always gets every socket
    #[arg(long, conflicts_with = "watch")]
    pub sockets: bool,
    /// Live view, refreshed every INTERVAL (default 2s): CLOSE_WAIT per process, oldest
    /// age, fd headroom and its trend. Ctrl-C to quit
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s", value_parser = parse_watch)]
    pub watch: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ReapArgs {
    #[command(flatten)]
    pub selectors: Selectors,
    /// Only sockets at least this long in CLOSE_WAIT, by the lower bound of their age, never
    /// the upper (required: no default, so a slip cannot reap fresh sockets)
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// Verify every socket (proving permission) but do not shut anything down
    #[arg(long)]
    pub dry_run: bool,
    /// Reset the sockets with SOCK_DESTROY (netlink; needs CAP_NET_ADMIN) instead of
    /// shutdown: the peer gets an RST instead of a FIN, the owner sees ECONNABORTED, and
    /// connections never accept()ed (no fd) can be reaped too
    #[arg(long, conflicts_with = "close")]
    pub destroy: bool,
    /// Manual last resort, for one named process you will restart anyway: free its fd slots
    /// by running close(fd) inside it (ptrace; the process is stopped for a few ms and every
    /// fd verified while stopped). Needs --pid, and --yes or a typed yes. Closes only
    /// matching CLOSE_WAIT sockets and sockets of connections that ended but are still held;
    /// never a listening, connecting, never-connected or non-TCP one. HAZARD: the app still
    /// holds the number and may use it after it was reused, misdelivering data or killing
    /// another connection (seen in Python, Go, Java and Node)
    #[arg(long)]
    pub close: bool,
    /// Confirm --close without asking
    #[arg(long, requires = "close")]
    pub yes: bool,
    /// Act on at most N sockets, oldest first
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max: Option<u64>,
    /// One JSON object per socket per line (summary goes to stderr)
    #[arg(long)]
    pub json: bool,
}

const EXPLAIN_EXAMPLES: &str = "Examples:
  cwreap explain                          # every process holding CLOSE_WAIT sockets
  cwreap explain --pid 4242 --for 30s     # + leak rate and time to EMFILE
  cwreap explain --comm '^node$' --json | jq '.patterns'
  cwreap explain --where --for 60s --pid 4242   # + the code that read the EOF and kept the fd

Patterns, from recv_q, whether an epoll instance of the owner watches the socket, which
end it is, and the owner's runtime:
  eof_ignored    watched, recv_q 0         the loop read the EOF and never closed
  not_read       watched, recv_q >= 1      the loop stopped reading this connection
                 (node: not watched)       paused by backpressure (libuv drops it from epoll)
  eof_unwatched  not watched, recv_q 0     read the EOF, stopped watching, kept the fd
  abandoned      not watched, recv_q >= 1  parked or dropped without close()
  pool_idle      client end, not watched,  an idle pooled connection the server closed:
                 only the FIN unread       harmless, safe to reap
  unaccepted     in the accept queue       the accept loop is stalled or too slow
The runtime (jvm, node, python, go, other; unknown when /proc/PID/maps cannot be read in
time) is named from the executable and its memory map, and the advice is that runtime's.
\"The GC may close\" is said only where a collector can: a JVM socket nothing watches that
no full collection (from its hsperfdata counters) has shown referenced, and Go.
Read-only: never stops or signals a process, never duplicates a socket that a sock_diag
table lists (only one in no table, to tell whether it is dead held).
--where attaches BPF programs for the window only (Linux 6.3+, BTF, CAP_BPF and
CAP_PERFMON; else exit 2 naming what is missing): the stacks of EOF reads, accepts and
connects, unwound by frame pointers or by CFI from a copy of the stack, symbolized from
DWARF or the symbol tables (and perf maps for JIT code). Sockets that close in the window
are dropped; those whose EOF was read before it are counted without a stack, unless a
daemon with `where: on` runs beside it: then the stacks it recorded (published in its run
directory, trusted only while it lives) fill them in, and --for may be left out (the
daemon's records alone). Not seen: splice, kTLS, io_uring.";

/// `cwreap explain`: read-only diagnosis of the leak behind the CLOSE_WAIT sockets.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub selectors: Selectors,
    /// Sample for this long (one sample a second) to measure new CLOSE_WAIT sockets per
    /// minute and forecast EMFILE from the fd growth; without it, one sample (both unknown)
    #[arg(long = "for", value_name = "DUR", value_parser = parse_window)]
    pub window: Option<Duration>,
    /// One JSON object per process per line
    #[arg(long)]
    pub json: bool,
    /// Name the code: for the --for window, record the user stack of every read that
    /// returns EOF on a TCP socket and of the accept or connect that opened it, then show
    /// the sockets still leaking at its end with those stacks (BPF: Linux 6.3+, BTF,
    /// CAP_BPF and CAP_PERFMON); with a daemon running `where: on`, also (or, without
    /// --for, only) the stacks it recorded
    #[arg(long = "where")]
    pub where_: bool,
    /// With --where: only sockets at least this long in CLOSE_WAIT at the end of the window
    #[arg(long, value_name = "DUR", value_parser = parse_duration, requires = "where_")]
    pub older_than: Option<Duration>,
}

/// An age for `--older-than`: zero allowed (every socket), at most a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    values::parse_duration_or_zero(s)
}

/// The shortest `--watch` interval: as the daemon's floor, so a view never keeps a core
/// busy.
pub const MIN_WATCH: Duration = Duration::from_millis(100);

/// A `--watch` interval: at least [`MIN_WATCH`], at most a day.
pub fn parse_watch(s: &str) -> Result<Duration, String> {
    values::parse_period(s, MIN_WATCH)
}

/// The longest `explain --for` window: one sample a second, each a whole scan.
pub const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// An `explain --for` window: at most [`MAX_WINDOW`].
pub fn parse_window(s: &str) -> Result<Duration, String> {
    let d = values::parse_duration_or_zero(s)?;
    if d > MAX_WINDOW {
        return Err(format!(
            "`{}` is longer than {}; sample for a shorter window, or keep `cwreap scan --watch` running",
            s.trim(),
            humantime::format_duration(MAX_WINDOW)
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn values() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("soon").is_err());
        assert_eq!(values::parse_port("8080"), Ok(8080));
        assert!(values::parse_port("0").is_err());
        assert!(values::parse_port("70000").is_err());
        assert!(values::parse_port("http").is_err());
        assert!(values::parse_regex("(").is_err());
        assert!(values::parse_pid("-1").is_err());
    }

    /// One word of a line `scan_args` wrote, as a POSIX shell reads it ('…' and \').
    fn unquote(word: &str) -> String {
        let (mut out, mut quoted, mut chars) = (String::new(), false, word.chars());
        while let Some(c) = chars.next() {
            match c {
                '\'' => quoted = !quoted,
                '\\' if !quoted => out.extend(chars.next()),
                _ => out.push(c),
            }
        }
        out
    }

    #[test]
    fn selectors_are_one_selector() {
        let cli = Cli::try_parse_from([
            "cwreap",
            "scan",
            "--comm",
            "^a$",
            "--comm",
            "^b$",
            "--cmdline=--tag api",
            "--cmdline",
            "it's",
            "--remote-port",
            "6379",
            "--remote",
            "10.0.0.7",
            "--local",
            "127.0.0.0/8",
            "--unit",
            "api.service",
            "--cgroup",
            "/system.slice/",
            "--uid",
            "root",
            "--exclude-remote-port",
            "22",
            "--min-close-wait",
            "3",
        ])
        .expect("valid");
        let Command::Scan(args) = cli.command else {
            panic!("scan")
        };
        let s = args.selectors.selector();
        assert_eq!(s.comm.len(), 2, "repeats of one kind");
        assert_eq!(s.remote_ports, [6379]);
        assert_eq!(
            s.remote_cidrs[0].to_string(),
            "10.0.0.7/32",
            "a bare IP is a /32"
        );
        assert_eq!(s.cgroups, ["/system.slice"]);
        assert_eq!(s.uids, [0], "a user name is looked up");
        assert_eq!(s.exclude.remote_ports, [22]);
        assert_eq!(args.selectors.min_close_wait, Some(3));
        // The scan line written from it parses back to the same selector.
        let mut again = vec!["cwreap".to_owned(), "scan".to_owned()];
        for w in s.scan_args() {
            again.push(unquote(&w));
        }
        let Command::Scan(back) = Cli::try_parse_from(&again).expect("round trip").command else {
            panic!("scan")
        };
        assert_eq!(back.selectors.selector().scan_args(), s.scan_args());
        // Bad values name the flag.
        for bad in [
            ["--remote", "10.0.0.0/33"],
            ["--unit", "a/b"],
            ["--uid", "nosuchuser-xyz"],
        ] {
            let e = Cli::try_parse_from(["cwreap", "scan", bad[0], bad[1]])
                .expect_err("invalid value")
                .to_string();
            assert!(e.contains(bad[0]), "{e}");
        }
    }

    #[test]
    fn reap_requirements_are_checked_together_by_the_command() {
        // clap accepts a bare `reap`, so the command can name every missing requirement at
        // once (see commands::reap::missing_requirements).
        assert!(Cli::try_parse_from(["cwreap", "reap"]).is_ok());
        let r = Cli::try_parse_from(["cwreap", "reap", "--pid", "1", "--older-than", "1m"]);
        assert!(r.is_ok());
        assert!(Cli::try_parse_from(["cwreap", "reap", "--older-than", "soon"]).is_err());
    }
}
