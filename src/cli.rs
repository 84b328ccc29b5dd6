//! The command line (clap definitions). Values are parsed and checked here, so a bad
//! regex, port or duration is a usage error (exit 2) naming the flag.

use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use regex::Regex;

use crate::select::Filter;
use crate::snapshot::Scope;

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
    #[command(hide = true)]
    Generate(GenerateArgs),
    /// Internal: the process that runs an injected close() for `reap --close` and the
    /// daemon's escalation (request on stdin, target's pidfd on fd 3, report on stdout)
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
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Policy file (YAML)
    #[arg(long, value_name = "PATH", default_value = DEFAULT_CONFIG)]
    pub config: std::path::PathBuf,
}

const SCAN_EXAMPLES: &str = "Examples:
  cwreap scan                          # every CLOSE_WAIT socket on this host
  cwreap scan --comm '^java$' --older-than 5m
  cwreap scan --port 8080 --json | jq .age_ms
  cwreap scan --watch 5s               # live view during an incident";

const REAP_EXAMPLES: &str = "Examples:
  cwreap reap --pid 4242 --older-than 10m --dry-run   # what would happen, permission proven
  cwreap reap --pid 4242 --older-than 10m             # do it
  cwreap reap --comm '^node$' --port 3000 --older-than 2m --max 500 --json
  cwreap reap --port 8080 --older-than 5m --destroy                   # RST, also unaccepted ones
  cwreap reap --pid 4242 --older-than 10m --close                     # free the fd slots (ptrace)";

#[derive(Debug, Clone, Args)]
pub struct Selectors {
    /// Only this process (repeatable)
    #[arg(long = "pid", value_name = "PID", value_parser = parse_pid)]
    pub pids: Vec<i32>,
    /// Only processes whose name (/proc/PID/comm) matches this regex
    #[arg(long, value_name = "REGEX", value_parser = parse_regex)]
    pub comm: Option<Regex>,
    /// Only sockets with this local port
    #[arg(long, value_name = "PORT", value_parser = parse_port)]
    pub port: Option<u16>,
}

impl Selectors {
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.comm.is_none() && self.port.is_none()
    }

    pub fn scope(&self) -> Scope {
        Scope {
            pids: (!self.pids.is_empty()).then(|| self.pids.clone()),
            comm: self.comm.clone(),
        }
    }

    pub fn filter(&self, older_than: Option<Duration>) -> Filter {
        Filter {
            pids: self.pids.clone(),
            comm: self.comm.clone(),
            port: self.port,
            older_than,
        }
    }
}

#[derive(Debug, Args)]
pub struct ScanArgs {
    #[command(flatten)]
    pub selectors: Selectors,
    /// Only sockets at least this long in CLOSE_WAIT (e.g. 90s, 5m)
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub older_than: Option<Duration>,
    /// One JSON object per socket per line
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Live view, refreshed every INTERVAL (default 2s): CLOSE_WAIT per process, oldest
    /// age, fd headroom and its trend. Ctrl-C to quit
    #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "2s", value_parser = parse_duration)]
    pub watch: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ReapArgs {
    #[command(flatten)]
    pub selectors: Selectors,
    /// Only sockets at least this long in CLOSE_WAIT (required: no default, so a slip cannot reap fresh sockets)
    #[arg(long, value_name = "DUR", value_parser = parse_duration, required = true)]
    pub older_than: Duration,
    /// Verify every socket (proving permission) but do not shut anything down
    #[arg(long)]
    pub dry_run: bool,
    /// Reset the sockets with SOCK_DESTROY (netlink; needs CAP_NET_ADMIN) instead of
    /// shutdown: the peer gets an RST instead of a FIN, the owner sees ECONNABORTED, and
    /// connections never accept()ed (no fd) can be reaped too
    #[arg(long, conflicts_with = "close")]
    pub destroy: bool,
    /// Last resort: free the owner's fd slots by running close(fd) inside the target
    /// (ptrace; the whole process is stopped for a few ms, every fd verified while it is
    /// stopped). Covers matching CLOSE_WAIT sockets and, for --pid targets, sockets already
    /// shut down that the owner still holds. Hazard: an app that later closes the same fd
    /// number may close whatever reused it
    #[arg(long)]
    pub close: bool,
    /// Confirm --close without asking
    #[arg(long)]
    pub yes: bool,
    /// Act on at most N sockets, oldest first
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max: Option<u64>,
    /// One JSON object per socket per line (summary goes to stderr)
    #[arg(long)]
    pub json: bool,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration ({e}); use e.g. 90s, 5m, 1h30m"))?;
    Ok(d)
}

pub fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| format!("invalid regex: {e}"))
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("'{s}' is not a port number (1-65535)")),
    }
}

pub fn parse_pid(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("'{s}' is not a process id (a positive integer)")),
    }
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
        assert_eq!(parse_port("8080"), Ok(8080));
        assert!(parse_port("0").is_err());
        assert!(parse_port("70000").is_err());
        assert!(parse_port("http").is_err());
        assert!(parse_regex("(").is_err());
        assert!(parse_pid("-1").is_err());
    }

    #[test]
    fn reap_requires_older_than() {
        let r = Cli::try_parse_from(["cwreap", "reap", "--pid", "1"]);
        assert!(r.is_err());
        let r = Cli::try_parse_from(["cwreap", "reap", "--pid", "1", "--older-than", "1m"]);
        assert!(r.is_ok());
    }
}
