//! The YAML policy of `cwreap run`: reading it, validating it in one step into a [`Config`]
//! (regexes compiled, durations, ports, CIDRs and addresses parsed, every rule checked), the
//! pure process and socket matching a [`Target`] describes, and the ownership check of the
//! file itself. No /proc reading here: the daemon gathers [`ProcessFacts`] and asks.
//!
//! Every error is one line, `<file>:<line>:<col>: <problem>`, pointing at the offending key or
//! value whenever its position is known.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;
use serde::{Deserialize, Deserializer};
use serde_saphyr::{Location, MessageFormatter, Spanned, UserMessageFormatter};

/// Defaults, also shown by [`Config::describe`].
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_REAPS_PER_CYCLE: u32 = 100;
pub const DEFAULT_MAX_REAPS_PER_MINUTE: u32 = 600;
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9814";

/// A validated policy.
#[derive(Debug, Clone)]
pub struct Config {
    /// Time between two cycles (> 0).
    pub interval: Duration,
    /// Global dry-run; a target may override it (see [`Target::effective_dry_run`]).
    pub dry_run: bool,
    pub log_format: LogFormat,
    /// Where to append one JSON line per action (absolute path), if anywhere.
    pub audit_log: Option<PathBuf>,
    pub limits: Limits,
    pub metrics: Metrics,
    /// At least one; names are unique.
    pub targets: Vec<Target>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Caps over all targets together, so a bad policy cannot reap a whole host at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_reaps_per_cycle: u32,
    pub max_reaps_per_minute: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// `None` when the policy says `listen: off`.
    pub listen: Option<SocketAddr>,
}

/// What to do with a selected socket. A new variant (e.g. `Destroy` through SOCK_DESTROY)
/// is meant to break exhaustive matches, so every place that acts is revisited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Report only.
    Log,
    /// Duplicate the socket out of its owner and shut it down (verified).
    Shutdown,
    /// Reset it with netlink SOCK_DESTROY (needs CAP_NET_ADMIN); also reaches connections
    /// never accepted.
    Destroy,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Log => "log",
            Action::Shutdown => "shutdown",
            Action::Destroy => "destroy",
        }
    }
}

/// One `targets:` entry.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    /// The `match:` block (at least one criterion).
    pub matcher: TargetMatch,
    /// Minimum age in CLOSE_WAIT before the action applies (> 0).
    pub older_than: Duration,
    /// Act only while the process holds at least this many CLOSE_WAIT sockets (default 1).
    pub min_close_wait: u32,
    pub exclude: Exclude,
    pub action: Action,
    /// Per-target override of the global `dry_run`.
    pub dry_run: Option<bool>,
    /// Opt-in last resort: close the fd inside the owner (ptrace) when it still holds a
    /// socket cwreap shut down this long ago.
    pub escalate: Option<Escalate>,
}

/// `escalate:` of a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Escalate {
    /// How long after a shutdown the owner must still hold the fd before it is closed
    /// inside the owner.
    pub close_after: Duration,
}

/// Shown by `cwreap check` for every target that escalates.
pub const ESCALATE_HAZARD: &str = "escalate closes fds inside the application (ptrace). If the app later calls close() on the same fd number after it was reused, it closes the wrong file; that is why only fds still held long after shutdown are closed. Needs the ptrace drop-in (systemd/drop-ins/close.conf).";

impl Target {
    /// The dry-run setting in force for this target given the global one. A `--dry-run` on
    /// the command line should win over both: `cli_dry_run || t.effective_dry_run(global)`.
    pub fn effective_dry_run(&self, global: bool) -> bool {
        self.dry_run.unwrap_or(global)
    }

    /// Whether a socket of a matching process is in scope: its local port is one of
    /// `match.local_ports` (when given) and no exclusion applies.
    pub fn socket_selected(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        let ports = &self.matcher.local_ports;
        (ports.is_empty() || ports.contains(&local.port())) && !self.exclude.excludes(local, remote)
    }
}

/// Criteria on the process; all given ones must hold. Regexes are unanchored, like grep's:
/// write `^nginx$` for an exact name.
#[derive(Debug, Clone, Default)]
pub struct TargetMatch {
    pub pid: Option<i32>,
    /// Read by the daemon at every cycle (the service may restart), never at load.
    pub pid_file: Option<PathBuf>,
    pub comm: Option<Regex>,
    pub exe: Option<Regex>,
    pub cmdline: Option<Regex>,
    /// A `*.service` or `*.scope` unit, compared with [`unit_from_cgroup`].
    pub systemd_unit: Option<String>,
    /// A cgroup v2 path prefix, compared component by component.
    pub cgroup: Option<String>,
    pub uid: Option<u32>,
    /// A socket criterion, applied by [`Target::socket_selected`]; empty = any port.
    pub local_ports: Vec<u16>,
}

/// What the daemon knows about one process, gathered from /proc.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: i32,
    pub comm: String,
    pub exe: Option<String>,
    /// The NUL-separated arguments joined by spaces.
    pub cmdline: Option<String>,
    /// The cgroup v2 path, e.g. `/system.slice/nginx.service` (see [`parse_cgroup_file`]).
    pub cgroup: Option<String>,
    pub uid: Option<u32>,
}

impl TargetMatch {
    /// Whether the process meets every process criterion given. `pid_from_file` is what
    /// the daemon read from `pid_file` this cycle; a missing or unreadable file matches
    /// nothing. `local_ports` is not looked at here (see [`Target::socket_selected`]).
    pub fn matches(&self, facts: &ProcessFacts, pid_from_file: Option<i32>) -> bool {
        let regex_on = |re: &Option<Regex>, value: Option<&str>| {
            re.as_ref()
                .is_none_or(|re| value.is_some_and(|v| re.is_match(v)))
        };
        self.pid.is_none_or(|pid| pid == facts.pid)
            && (self.pid_file.is_none() || pid_from_file == Some(facts.pid))
            && regex_on(&self.comm, Some(&facts.comm))
            && regex_on(&self.exe, facts.exe.as_deref())
            && regex_on(&self.cmdline, facts.cmdline.as_deref())
            && self.systemd_unit.as_ref().is_none_or(|unit| {
                facts
                    .cgroup
                    .as_deref()
                    .and_then(unit_from_cgroup)
                    .is_some_and(|u| &u == unit)
            })
            && self.cgroup.as_ref().is_none_or(|prefix| {
                facts
                    .cgroup
                    .as_deref()
                    .is_some_and(|c| cgroup_has_prefix(c, prefix))
            })
            && self.uid.is_none_or(|uid| facts.uid == Some(uid))
    }

    /// Whether any criterion is about the process (otherwise every process is a candidate
    /// and only `local_ports` narrows the sockets).
    pub fn has_process_criteria(&self) -> bool {
        self.pid.is_some()
            || self.pid_file.is_some()
            || self.comm.is_some()
            || self.exe.is_some()
            || self.cmdline.is_some()
            || self.systemd_unit.is_some()
            || self.cgroup.is_some()
            || self.uid.is_some()
    }
}

/// Sockets never to touch, whatever else matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclude {
    pub remote_cidrs: Vec<IpNet>,
    pub local_ports: Vec<u16>,
    pub remote_ports: Vec<u16>,
}

impl Exclude {
    /// Whether any exclusion applies. A remote written as IPv4-mapped IPv6 (a dual-stack
    /// listener's view of an IPv4 peer) is checked against IPv4 CIDRs too, and an IPv4
    /// remote against `::ffff:a.b.c.d` CIDRs.
    pub fn excludes(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        if self.local_ports.contains(&local.port()) || self.remote_ports.contains(&remote.port()) {
            return true;
        }
        let ip = remote.ip();
        let other: Option<IpAddr> = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
        };
        self.remote_cidrs
            .iter()
            .any(|net| net.contains(&ip) || other.is_some_and(|o| net.contains(&o)))
    }
}

/// The innermost `*.service` or `*.scope` component of a cgroup path: the unit systemd
/// started the process in (`/system.slice/nginx.service` → `nginx.service`).
pub fn unit_from_cgroup(path: &str) -> Option<String> {
    path.split('/')
        .rev()
        .find(|c| is_unit_name(c))
        .map(str::to_owned)
}

fn is_unit_name(s: &str) -> bool {
    [".service", ".scope"]
        .iter()
        .any(|suffix| s.len() > suffix.len() && s.ends_with(suffix))
        && !s.contains('/')
}

/// The cgroup v2 path from the contents of /proc/PID/cgroup (the `0::` line).
pub fn parse_cgroup_file(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let path = line.strip_prefix("0::")?;
        // The kernel appends this when the cgroup was removed under the process.
        let path = path.strip_suffix(" (deleted)").unwrap_or(path);
        path.starts_with('/').then(|| path.to_owned())
    })
}

fn cgroup_has_prefix(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Line and column (1-based) of a key or value in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("{file}: cannot read the policy: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// Not a valid policy; `position` is that of the offending key or value when known.
    #[error("{file}:{}", located(.position, .message))]
    Invalid {
        file: String,
        position: Option<Position>,
        message: String,
    },
    /// Running as root, the file could be changed by someone other than root.
    #[error("{file}: {problem}")]
    Unsafe { file: String, problem: String },
}

fn located(position: &Option<Position>, message: &str) -> String {
    match position {
        Some(p) => format!("{p}: {message}"),
        None => format!(" {message}"),
    }
}

impl ConfigError {
    pub fn position(&self) -> Option<Position> {
        match self {
            ConfigError::Invalid { position, .. } => *position,
            _ => None,
        }
    }
}

/// Read and validate the policy at `path`. Does not check the file's ownership: the daemon
/// and `cwreap check` call [`check_file_permissions`] first.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    parse(&text, &file)
}

/// Validate a policy given as text; `source` names it in messages.
pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
    let invalid = |p: Problem| ConfigError::Invalid {
        file: source.to_owned(),
        position: p.position,
        message: p.message,
    };
    let raw: RawConfig =
        serde_saphyr::from_str(text).map_err(|e| invalid(yaml_problem(text, &e)))?;
    Config::from_raw(raw).map_err(invalid)
}

/// When running privileged, refuse a policy file that someone other than root could
/// change (sshd's StrictModes): it decides which sockets of which processes get shut down.
/// Privileged means euid 0, or any effective capability (the shipped unit runs as a
/// transient user with ambient CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH and CAP_NET_ADMIN).
pub fn check_file_permissions(path: &Path) -> Result<(), ConfigError> {
    if !runs_privileged() {
        return Ok(());
    }
    let file = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        file: file.clone(),
        source,
    })?;
    match permission_problem(meta.mode(), meta.uid()) {
        None => Ok(()),
        Some(problem) => {
            let f = shell_quote(&file);
            Err(ConfigError::Unsafe {
                problem: format!("{problem}; fix: chown root:root {f} && chmod 600 {f}"),
                file,
            })
        }
    }
}

fn runs_privileged() -> bool {
    rustix::process::geteuid().is_root()
        // If the capabilities cannot be read, check anyway: refusing is the safe side.
        || rustix::thread::capabilities(None).map_or(true, |c| !c.effective.is_empty())
}

fn permission_problem(mode: u32, owner_uid: u32) -> Option<String> {
    let mut problems = Vec::new();
    if owner_uid != 0 {
        problems.push(format!("is owned by uid {owner_uid}, not root"));
    }
    let writable: Vec<&str> = [(0o020, "group"), (0o002, "others")]
        .into_iter()
        .filter(|(bit, _)| mode & bit != 0)
        .map(|(_, who)| who)
        .collect();
    if !writable.is_empty() {
        problems.push(format!(
            "is writable by {} (mode {:04o})",
            writable.join(" and "),
            mode & 0o7777
        ));
    }
    (!problems.is_empty()).then(|| {
        format!(
            "refusing the policy: it {}, so a non-root user could choose what cwreap shuts down",
            problems.join(" and ")
        )
    })
}

fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------------------
// The raw form, as written. Every value keeps its position; values that need checking are
// read as text so the messages are ours, and an explicit null is kept so it can be refused
// rather than silently widening a match.

type Key<T> = Option<Spanned<Option<T>>>;
type List = Key<Vec<Spanned<String>>>;

fn key<'de, D, T>(d: D) -> Result<Key<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Spanned::<Option<T>>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default, deserialize_with = "key")]
    interval: Key<String>,
    #[serde(default, deserialize_with = "key")]
    dry_run: Key<bool>,
    #[serde(default, deserialize_with = "key")]
    log_format: Key<String>,
    #[serde(default, deserialize_with = "key")]
    audit_log: Key<String>,
    #[serde(default, deserialize_with = "key")]
    limits: Key<RawLimits>,
    #[serde(default, deserialize_with = "key")]
    metrics: Key<RawMetrics>,
    #[serde(default, deserialize_with = "key")]
    targets: Key<Vec<Spanned<RawTarget>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default, deserialize_with = "key")]
    max_reaps_per_cycle: Key<String>,
    #[serde(default, deserialize_with = "key")]
    max_reaps_per_minute: Key<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    #[serde(default, deserialize_with = "key")]
    listen: Key<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    #[serde(default, deserialize_with = "key")]
    name: Key<String>,
    #[serde(default, deserialize_with = "key", rename = "match")]
    matcher: Key<RawMatch>,
    #[serde(default, deserialize_with = "key")]
    older_than: Key<String>,
    #[serde(default, deserialize_with = "key")]
    min_close_wait: Key<String>,
    #[serde(default, deserialize_with = "key")]
    exclude: Key<RawExclude>,
    #[serde(default, deserialize_with = "key")]
    action: Key<String>,
    #[serde(default, deserialize_with = "key")]
    dry_run: Key<bool>,
    #[serde(default, deserialize_with = "key")]
    escalate: Key<RawEscalate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEscalate {
    #[serde(default, deserialize_with = "key")]
    close_after: Key<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(default, deserialize_with = "key")]
    pid: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pid_file: Key<String>,
    #[serde(default, deserialize_with = "key")]
    comm: Key<String>,
    #[serde(default, deserialize_with = "key")]
    exe: Key<String>,
    #[serde(default, deserialize_with = "key")]
    cmdline: Key<String>,
    #[serde(default, deserialize_with = "key")]
    systemd_unit: Key<String>,
    #[serde(default, deserialize_with = "key")]
    cgroup: Key<String>,
    #[serde(default, deserialize_with = "key")]
    uid: Key<String>,
    #[serde(default, deserialize_with = "key")]
    local_ports: List,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExclude {
    #[serde(default, deserialize_with = "key")]
    remote_cidrs: List,
    #[serde(default, deserialize_with = "key")]
    local_ports: List,
    #[serde(default, deserialize_with = "key")]
    remote_ports: List,
}

const MATCH_KEYS: &str =
    "pid, pid_file, comm, exe, cmdline, systemd_unit, cgroup, uid, local_ports";

/// A validation failure before the file name is attached.
#[derive(Debug)]
struct Problem {
    position: Option<Position>,
    message: String,
}

fn position(loc: &Location) -> Option<Position> {
    (*loc != Location::UNKNOWN && loc.line() > 0).then(|| Position {
        line: loc.line(),
        column: loc.column(),
    })
}

fn problem_at(loc: &Location, message: impl Into<String>) -> Problem {
    Problem {
        position: position(loc),
        message: message.into(),
    }
}

/// The value of a key that was written, refusing an explicit null.
fn given<'a, T>(k: &'a Key<T>, what: &str) -> Result<Option<(&'a T, &'a Location)>, Problem> {
    match k {
        None => Ok(None),
        Some(Spanned {
            value: Some(v),
            referenced,
            ..
        }) => Ok(Some((v, referenced))),
        Some(Spanned {
            value: None,
            referenced,
            ..
        }) => Err(problem_at(
            referenced,
            format!("{what} has no value; give one or remove the key"),
        )),
    }
}

/// A written scalar, parsed; the error points at the value.
fn scalar<T>(
    k: &Key<String>,
    what: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, Problem> {
    match given(k, what)? {
        None => Ok(None),
        Some((text, loc)) => parse(text)
            .map(Some)
            .map_err(|e| problem_at(loc, format!("{what}: {e}"))),
    }
}

/// A written list of scalars, each parsed; the error points at the bad item.
fn list<T>(
    k: &List,
    what: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<(Vec<T>, Location)>, Problem> {
    let Some((items, loc)) = given(k, what)? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let v =
            parse(&item.value).map_err(|e| problem_at(&item.referenced, format!("{what}: {e}")))?;
        out.push(v);
    }
    Ok(Some((out, *loc)))
}

fn block<T>(k: &Key<T>) -> Option<&T> {
    k.as_ref().and_then(|s| s.value.as_ref())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 90s, 5m, 1h30m"))?;
    if d.is_zero() {
        return Err(format!("`{s}` must be greater than zero"));
    }
    Ok(d)
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => u16::try_from(p).map_err(|e| e.to_string()),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("`{s}` is not a port number (1-65535)")),
    }
}

fn parse_count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => u32::try_from(n).map_err(|_| format!("{n} is too large")),
        Err(_) => Err(format!("`{s}` is not a positive whole number")),
    }
}

fn parse_pid(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("`{s}` is not a process id (a positive integer)")),
    }
}

fn parse_uid(s: &str) -> Result<u32, String> {
    s.trim()
        .parse::<u32>()
        .map_err(|_| format!("`{s}` is not a numeric user id (0-4294967295)"))
}

fn parse_regex(s: &str) -> Result<Regex, String> {
    Regex::new(s).map_err(|e| {
        // The regex crate explains on several lines; keep the line that says what is wrong.
        let text = e.to_string();
        let why = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("error: "))
            .map(str::to_owned)
            .unwrap_or_else(|| one_line(&text));
        format!("invalid regex `{s}`: {why}")
    })
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!(
        "`{s}` is not a CIDR or IP address (e.g. 10.0.0.0/8, 192.0.2.7, fd00::/8)"
    ))
}

fn parse_absolute_path(s: &str) -> Result<PathBuf, String> {
    if s.starts_with('/') {
        Ok(PathBuf::from(s))
    } else {
        Err(format!("`{s}` must be an absolute path"))
    }
}

fn parse_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    let t = s.trim();
    if t == "off" {
        return Ok(None);
    }
    match t.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(format!("`{s}`: port 0 is not allowed")),
        Ok(a) => Ok(Some(a)),
        Err(_) => Err(format!(
            "`{s}` is not an ip:port address (e.g. 127.0.0.1:9814 or [::1]:9814) or `off`"
        )),
    }
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("`{other}` is not one of `text`, `json`")),
    }
}

fn parse_action(s: &str) -> Result<Action, String> {
    match s.trim() {
        "log" => Ok(Action::Log),
        "shutdown" => Ok(Action::Shutdown),
        "destroy" => Ok(Action::Destroy),
        other => {
            let hint = suggest(other, &["log", "shutdown", "destroy"])
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            Err(format!(
                "`{other}` is not one of `log`, `shutdown`, `destroy`{hint}"
            ))
        }
    }
}

fn parse_unit(s: &str) -> Result<String, String> {
    let t = s.trim();
    if is_unit_name(t) {
        Ok(t.to_owned())
    } else if !t.is_empty() && !t.contains('/') && !t.contains('.') {
        Err(format!(
            "`{s}` is not a unit name; did you mean `{t}.service`?"
        ))
    } else {
        Err(format!(
            "`{s}` is not a unit name (a `*.service` or `*.scope`, e.g. nginx.service)"
        ))
    }
}

fn parse_cgroup_prefix(s: &str) -> Result<String, String> {
    let t = s.trim();
    if !t.starts_with('/') {
        return Err(format!(
            "`{s}` must be a cgroup path starting with `/` (e.g. /system.slice/nginx.service)"
        ));
    }
    let trimmed = t.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
}

impl Config {
    fn from_raw(raw: RawConfig) -> Result<Config, Problem> {
        let interval = scalar(&raw.interval, "`interval`", parse_duration)?;
        let dry_run = given(&raw.dry_run, "`dry_run`")?.map(|(v, _)| *v);
        let log_format = scalar(&raw.log_format, "`log_format`", parse_log_format)?;
        let audit_log = scalar(&raw.audit_log, "`audit_log`", parse_absolute_path)?;
        let limits = match block(&raw.limits) {
            None => Limits {
                max_reaps_per_cycle: DEFAULT_MAX_REAPS_PER_CYCLE,
                max_reaps_per_minute: DEFAULT_MAX_REAPS_PER_MINUTE,
            },
            Some(l) => Limits {
                max_reaps_per_cycle: scalar(
                    &l.max_reaps_per_cycle,
                    "`limits.max_reaps_per_cycle`",
                    parse_count,
                )?
                .unwrap_or(DEFAULT_MAX_REAPS_PER_CYCLE),
                max_reaps_per_minute: scalar(
                    &l.max_reaps_per_minute,
                    "`limits.max_reaps_per_minute`",
                    parse_count,
                )?
                .unwrap_or(DEFAULT_MAX_REAPS_PER_MINUTE),
            },
        };
        let listen = match block(&raw.metrics) {
            Some(m) => scalar(&m.listen, "`metrics.listen`", parse_listen)?,
            None => None,
        };
        let listen = match listen {
            Some(l) => l,
            None => parse_listen(DEFAULT_METRICS_LISTEN).map_err(|message| Problem {
                position: None,
                message,
            })?,
        };

        let targets = match &raw.targets {
            None => {
                return Err(Problem {
                    position: None,
                    message: "no `targets`: list at least one target, e.g. \
                              `targets: [{name: web, match: {comm: ^nginx$}, older_than: 10m}]`"
                        .to_owned(),
                });
            }
            Some(Spanned {
                value, referenced, ..
            }) => match value {
                Some(list) if !list.is_empty() => list,
                _ => {
                    return Err(problem_at(
                        referenced,
                        "`targets` is empty: list at least one target",
                    ));
                }
            },
        };
        let mut seen: HashMap<String, Option<Position>> = HashMap::new();
        let mut out = Vec::with_capacity(targets.len());
        for (i, t) in targets.iter().enumerate() {
            let target = Target::from_raw(&t.value, &t.referenced, i + 1)?;
            let name_loc = t.value.name.as_ref().map_or(t.referenced, |n| n.referenced);
            if let Some(first) = seen.get(&target.name) {
                let first = first
                    .map(|p| format!(" (first used at line {})", p.line))
                    .unwrap_or_default();
                return Err(problem_at(
                    &name_loc,
                    format!("duplicate target name `{}`{first}", target.name),
                ));
            }
            seen.insert(target.name.clone(), position(&name_loc));
            out.push(target);
        }

        Ok(Config {
            interval: interval.unwrap_or(DEFAULT_INTERVAL),
            // Safe by default: a policy must say `dry_run: false` to shut anything down.
            dry_run: dry_run.unwrap_or(true),
            log_format: log_format.unwrap_or(LogFormat::Text),
            audit_log,
            limits,
            metrics: Metrics { listen },
            targets: out,
        })
    }
}

impl Target {
    fn from_raw(raw: &RawTarget, at: &Location, index: usize) -> Result<Target, Problem> {
        let name = match given(&raw.name, &format!("`name` of target #{index}"))? {
            None => {
                return Err(problem_at(at, format!("target #{index} has no `name`")));
            }
            Some((n, loc)) => {
                let n = n.trim();
                if n.is_empty() {
                    return Err(problem_at(
                        loc,
                        format!("target #{index} has an empty `name`"),
                    ));
                }
                if n.chars().any(char::is_control) {
                    return Err(problem_at(
                        loc,
                        format!("the `name` of target #{index} contains control characters"),
                    ));
                }
                n.to_owned()
            }
        };
        let ctx = format!("in target `{name}`");
        let what = |k: &str| format!("`{k}` {ctx}");

        let matcher = match &raw.matcher {
            None => {
                return Err(problem_at(
                    at,
                    format!(
                        "target `{name}` has no `match` block; give at least one of {MATCH_KEYS}"
                    ),
                ));
            }
            Some(Spanned {
                value, referenced, ..
            }) => {
                let empty = RawMatch::default();
                TargetMatch::from_raw(value.as_ref().unwrap_or(&empty), referenced, &name)?
            }
        };

        let older_than = match scalar(&raw.older_than, &what("older_than"), parse_duration)? {
            Some(d) => d,
            None => {
                return Err(problem_at(
                    at,
                    format!(
                        "target `{name}` has no `older_than`; it is required (e.g. `older_than: 10m`, \
                         above the clients' pool idle timeouts)"
                    ),
                ));
            }
        };
        let min_close_wait =
            scalar(&raw.min_close_wait, &what("min_close_wait"), parse_count)?.unwrap_or(1);

        let exclude = match block(&raw.exclude) {
            None => Exclude::default(),
            Some(e) => {
                let w = |k: &str| format!("`exclude.{k}` {ctx}");
                let ports = |k: &List, key: &str| {
                    Ok::<_, Problem>(
                        list(k, &w(key), parse_port)?
                            .map(|(v, _)| v)
                            .unwrap_or_default(),
                    )
                };
                let local_ports = ports(&e.local_ports, "local_ports")?;
                if let Some(p) = local_ports.iter().find(|p| matcher.local_ports.contains(p)) {
                    let loc = e
                        .local_ports
                        .as_ref()
                        .and_then(|s| s.value.as_ref())
                        .and_then(|items| items.iter().find(|i| parse_port(&i.value) == Ok(*p)))
                        .map(|i| i.referenced)
                        .unwrap_or(Location::UNKNOWN);
                    return Err(problem_at(
                        &loc,
                        format!(
                            "{}: port {p} is both matched and excluded, so it selects nothing",
                            w("local_ports")
                        ),
                    ));
                }
                Exclude {
                    remote_cidrs: list(&e.remote_cidrs, &w("remote_cidrs"), parse_cidr)?
                        .map(|(v, _)| v)
                        .unwrap_or_default(),
                    local_ports,
                    remote_ports: ports(&e.remote_ports, "remote_ports")?,
                }
            }
        };

        let action = scalar(&raw.action, &what("action"), parse_action)?.unwrap_or(Action::Log);
        let dry_run = given(&raw.dry_run, &what("dry_run"))?.map(|(v, _)| *v);
        let escalate = match block(&raw.escalate) {
            None => None,
            Some(e) => {
                let key = format!("`escalate.close_after` in target `{name}`");
                match scalar(&e.close_after, &key, parse_duration)? {
                    Some(close_after) => Some(Escalate { close_after }),
                    None => {
                        return Err(problem_at(
                            at,
                            format!(
                                "target `{name}`: `escalate` needs `close_after` (e.g. `close_after: 10m`)"
                            ),
                        ));
                    }
                }
            }
        };
        if escalate.is_some() && action != Action::Shutdown {
            return Err(problem_at(
                at,
                format!("target `{name}`: `escalate` only follows `action: shutdown`"),
            ));
        }

        Ok(Target {
            name,
            matcher,
            older_than,
            min_close_wait,
            exclude,
            action,
            dry_run,
            escalate,
        })
    }
}

impl TargetMatch {
    fn from_raw(raw: &RawMatch, at: &Location, name: &str) -> Result<TargetMatch, Problem> {
        let what = |k: &str| format!("`match.{k}` in target `{name}`");
        let local_ports = match list(&raw.local_ports, &what("local_ports"), parse_port)? {
            Some((ports, loc)) if ports.is_empty() => {
                return Err(problem_at(
                    &loc,
                    format!(
                        "{} is empty; list ports or remove the key",
                        what("local_ports")
                    ),
                ));
            }
            Some((ports, _)) => ports,
            None => Vec::new(),
        };
        let m = TargetMatch {
            pid: scalar(&raw.pid, &what("pid"), parse_pid)?,
            pid_file: scalar(&raw.pid_file, &what("pid_file"), parse_absolute_path)?,
            comm: scalar(&raw.comm, &what("comm"), parse_regex)?,
            exe: scalar(&raw.exe, &what("exe"), parse_regex)?,
            cmdline: scalar(&raw.cmdline, &what("cmdline"), parse_regex)?,
            systemd_unit: scalar(&raw.systemd_unit, &what("systemd_unit"), parse_unit)?,
            cgroup: scalar(&raw.cgroup, &what("cgroup"), parse_cgroup_prefix)?,
            uid: scalar(&raw.uid, &what("uid"), parse_uid)?,
            local_ports,
        };
        if !m.has_process_criteria() && m.local_ports.is_empty() {
            return Err(problem_at(
                at,
                format!(
                    "the `match` block of target `{name}` is empty, which would select every \
                     process; give at least one of {MATCH_KEYS}"
                ),
            ));
        }
        Ok(m)
    }
}

// ---------------------------------------------------------------------------------------
// YAML errors: position from the parser, message made ours where we can say more.

fn yaml_problem(text: &str, err: &serde_saphyr::Error) -> Problem {
    let mut inner = err;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = inner
    {
        inner = error;
    }
    let loc = err.location().or_else(|| inner.location());
    let context = loc.as_ref().and_then(|l| target_at(text, l));
    let message = match inner {
        serde_saphyr::Error::SerdeUnknownField {
            field, expected, ..
        } => unknown_key_message(field, expected, context.as_deref()),
        other => {
            let msg = match other {
                serde_saphyr::Error::Unexpected { expected, .. } => match *expected {
                    "mapping start" => "expected a mapping (`key: value` lines) here".to_owned(),
                    "sequence start" => "expected a list (`[a, b]` or `- a` lines) here".to_owned(),
                    "string scalar" => {
                        "expected a single value here, not a list or a mapping".to_owned()
                    }
                    e => format!("expected {e}"),
                },
                _ => one_line(&UserMessageFormatter.format_message(other)),
            };
            match context {
                Some(t) => format!("{msg} (in target {t})"),
                None => msg,
            }
        }
    };
    Problem {
        position: loc.as_ref().and_then(position),
        message,
    }
}

fn unknown_key_message(field: &str, expected: &[&str], target: Option<&str>) -> String {
    let target = target.unwrap_or("`?`");
    let has = |k: &str| expected.contains(&k);
    let place = if has("targets") {
        "at the top level".to_owned()
    } else if has("older_than") {
        format!("in target {target}")
    } else if has("cmdline") {
        format!("in the `match` block of target {target}")
    } else if has("remote_cidrs") {
        format!("in the `exclude` block of target {target}")
    } else if has("max_reaps_per_cycle") {
        "in `limits`".to_owned()
    } else if has("listen") {
        "in `metrics`".to_owned()
    } else {
        "here".to_owned()
    };
    let hint = if has("older_than") && MATCH_KEYS.split(", ").any(|k| k == field) {
        format!("; `{field}` is a criterion: put it under `match:`")
    } else if let Some(s) = suggest(field, expected) {
        format!("; did you mean `{s}`?")
    } else {
        format!("; valid keys: {}", expected.join(", "))
    };
    format!("unknown key `{field}` {place}{hint}")
}

/// The target (as "`name`" or "#N") whose block holds `loc`, found by a lenient second
/// read that only looks at where each target starts.
fn target_at(text: &str, loc: &Location) -> Option<String> {
    #[derive(Deserialize)]
    struct Skeleton {
        #[serde(default)]
        targets: Option<Vec<Spanned<SkeletonTarget>>>,
    }
    #[derive(Deserialize)]
    struct SkeletonTarget {
        #[serde(default)]
        name: Option<AnyName>,
    }
    /// Whatever the name is, even a wrong type, so the skeleton itself reads.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum AnyName {
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    let skeleton: Skeleton = serde_saphyr::from_str(text).ok()?;
    let targets = skeleton.targets?;
    let here = (loc.line(), loc.column());
    let starts: Vec<(u64, u64)> = targets
        .iter()
        .map(|t| (t.referenced.line(), t.referenced.column()))
        .collect();
    let i = starts.iter().enumerate().rposition(|(_, s)| *s <= here)?;
    let (line, column) = starts[i];
    // A key of the target is at its first key's column or deeper; anything shallower
    // after it belongs to the document around the list.
    if here.0 > line && here.1 < column {
        return None;
    }
    Some(match &targets[i].value.name {
        Some(AnyName::Text(n)) if !n.trim().is_empty() => format!("`{}`", n.trim()),
        _ => format!("#{}", i + 1),
    })
}

fn one_line(s: &str) -> String {
    s.split(|c: char| c.is_control())
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The candidate closest to `word` by optimal-string-alignment distance (typos, swapped
/// letters), if close enough to be a plausible typo.
fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_lowercase();
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(&word, &c.to_lowercase()), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

// ---------------------------------------------------------------------------------------
// describe: the effective policy, every default explicit, itself a valid policy.

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn duration_text(d: Duration) -> String {
    quote(&humantime::format_duration(d).to_string())
}

fn port_list(ports: &[u16]) -> String {
    let items: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("[{}]", items.join(", "))
}

impl Config {
    /// The effective policy for `cwreap check`: every default made explicit, one block per
    /// target. The text is itself a valid policy with the same meaning.
    pub fn describe(&self) -> String {
        let mut l: Vec<String> = Vec::new();
        l.push(format!("interval: {}", duration_text(self.interval)));
        l.push(format!("dry_run: {}", self.dry_run));
        l.push(format!("log_format: {}", self.log_format.as_str()));
        match &self.audit_log {
            Some(p) => l.push(format!("audit_log: {}", quote(&p.display().to_string()))),
            None => l.push("# audit_log: none".to_owned()),
        }
        l.push("limits:".to_owned());
        l.push(format!(
            "  max_reaps_per_cycle: {}",
            self.limits.max_reaps_per_cycle
        ));
        l.push(format!(
            "  max_reaps_per_minute: {}",
            self.limits.max_reaps_per_minute
        ));
        l.push("metrics:".to_owned());
        match self.metrics.listen {
            Some(a) => l.push(format!("  listen: {}", quote(&a.to_string()))),
            None => l.push("  listen: \"off\"".to_owned()),
        }
        l.push("targets:".to_owned());
        for t in &self.targets {
            l.push(format!("  - name: {}", quote(&t.name)));
            l.push("    match:".to_owned());
            let m = &t.matcher;
            if let Some(pid) = m.pid {
                l.push(format!("      pid: {pid}"));
            }
            if let Some(p) = &m.pid_file {
                l.push(format!(
                    "      pid_file: {}",
                    quote(&p.display().to_string())
                ));
            }
            for (k, re) in [("comm", &m.comm), ("exe", &m.exe), ("cmdline", &m.cmdline)] {
                if let Some(re) = re {
                    l.push(format!("      {k}: {}", quote(re.as_str())));
                }
            }
            if let Some(u) = &m.systemd_unit {
                l.push(format!("      systemd_unit: {}", quote(u)));
            }
            if let Some(c) = &m.cgroup {
                l.push(format!("      cgroup: {}", quote(c)));
            }
            if let Some(uid) = m.uid {
                l.push(format!("      uid: {uid}"));
            }
            if !m.local_ports.is_empty() {
                l.push(format!("      local_ports: {}", port_list(&m.local_ports)));
            } else {
                l.push("      # local_ports: any".to_owned());
            }
            l.push(format!("    older_than: {}", duration_text(t.older_than)));
            l.push(format!("    min_close_wait: {}", t.min_close_wait));
            l.push("    exclude:".to_owned());
            let cidrs: Vec<String> = t
                .exclude
                .remote_cidrs
                .iter()
                .map(|n| quote(&n.to_string()))
                .collect();
            l.push(format!("      remote_cidrs: [{}]", cidrs.join(", ")));
            l.push(format!(
                "      local_ports: {}",
                port_list(&t.exclude.local_ports)
            ));
            l.push(format!(
                "      remote_ports: {}",
                port_list(&t.exclude.remote_ports)
            ));
            l.push(format!("    action: {}", t.action.as_str()));
            match t.dry_run {
                Some(d) => l.push(format!("    dry_run: {d}")),
                None => l.push(format!(
                    "    # dry_run: {} (the global setting)",
                    self.dry_run
                )),
            }
            if let Some(e) = t.escalate {
                l.push(format!(
                    "    escalate: {{close_after: {}}}",
                    duration_text(e.close_after)
                ));
                l.push(format!("    # WARNING: {ESCALATE_HAZARD}"));
            }
        }
        let mut out = l.join("\n");
        out.push('\n');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str =
        "targets:\n  - name: web\n    match:\n      comm: ^nginx$\n    older_than: 5m\n";

    fn ok(text: &str) -> Config {
        match parse(text, "t.yaml") {
            Ok(c) => c,
            Err(e) => panic!("expected a valid policy, got: {e}"),
        }
    }

    /// The one-line error for `text`.
    fn err(text: &str) -> String {
        match parse(text, "t.yaml") {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => {
                let s = e.to_string();
                assert!(!s.contains('\n'), "error spans several lines: {s:?}");
                s
            }
        }
    }

    /// A one-target policy with `body` as extra target keys (indented 4).
    fn with_target(body: &str) -> String {
        format!("targets:\n  - name: web\n    match:\n      comm: ^nginx$\n{body}")
    }

    #[test]
    fn defaults_are_safe_and_explicit() {
        let c = ok(MIN);
        assert_eq!(c.interval, Duration::from_secs(30));
        assert!(c.dry_run);
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.audit_log, None);
        assert_eq!(c.limits.max_reaps_per_cycle, 100);
        assert_eq!(c.limits.max_reaps_per_minute, 600);
        assert_eq!(c.metrics.listen, "127.0.0.1:9814".parse().ok());
        let t = &c.targets[0];
        assert_eq!(t.name, "web");
        assert_eq!(t.older_than, Duration::from_secs(300));
        assert_eq!(t.min_close_wait, 1);
        assert_eq!(t.action, Action::Log);
        assert_eq!(t.dry_run, None);
        assert!(t.effective_dry_run(c.dry_run));
        assert_eq!(t.exclude, Exclude::default());
    }

    #[test]
    fn everything_set() {
        let c = ok("interval: 1m30s
dry_run: false
log_format: json
audit_log: /var/log/cwreap/audit.jsonl
limits: {max_reaps_per_cycle: 5, max_reaps_per_minute: 50}
metrics: {listen: '[::1]:9000'}
targets:
  - name: api
    match:
      pid: 42
      pid_file: /run/api.pid
      comm: ^api$
      exe: /usr/bin/api
      cmdline: --port 8080
      systemd_unit: api.service
      cgroup: /system.slice/
      uid: 1000
      local_ports: [8080, '8443']
    older_than: 10m
    min_close_wait: 3
    exclude:
      remote_cidrs: [10.0.0.0/8, 192.0.2.7, 'fd00::/8', 10.1.2.3/16]
      local_ports: [9090]
      remote_ports: [5432]
    action: shutdown
    dry_run: true
");
        assert_eq!(c.interval, Duration::from_secs(90));
        assert!(!c.dry_run);
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(
            c.audit_log.as_deref(),
            Some(Path::new("/var/log/cwreap/audit.jsonl"))
        );
        assert_eq!(c.limits.max_reaps_per_cycle, 5);
        assert_eq!(c.limits.max_reaps_per_minute, 50);
        assert_eq!(c.metrics.listen, "[::1]:9000".parse().ok());
        let t = &c.targets[0];
        let m = &t.matcher;
        assert_eq!(m.pid, Some(42));
        assert_eq!(m.pid_file.as_deref(), Some(Path::new("/run/api.pid")));
        assert_eq!(m.systemd_unit.as_deref(), Some("api.service"));
        assert_eq!(m.cgroup.as_deref(), Some("/system.slice"));
        assert_eq!(m.uid, Some(1000));
        assert_eq!(m.local_ports, vec![8080, 8443]);
        assert_eq!(t.min_close_wait, 3);
        let nets: Vec<String> = t
            .exclude
            .remote_cidrs
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            nets,
            ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8", "10.1.0.0/16"]
        );
        assert_eq!(t.action, Action::Shutdown);
        assert_eq!(t.dry_run, Some(true));
        assert!(t.effective_dry_run(c.dry_run));
    }

    #[test]
    fn target_dry_run_overrides_global() {
        let c = ok(&with_target("    older_than: 5m\n    dry_run: false\n"));
        assert!(c.dry_run);
        assert!(!c.targets[0].effective_dry_run(c.dry_run));
    }

    #[test]
    fn metrics_off() {
        let c = ok(&format!("metrics:\n  listen: off\n{MIN}"));
        assert_eq!(c.metrics.listen, None);
        let e = err(&format!("metrics:\n  listen: localhost:9814\n{MIN}"));
        assert!(e.starts_with("t.yaml:2:11: `metrics.listen`"), "{e}");
        let e = err(&format!("metrics:\n  listen: 127.0.0.1:0\n{MIN}"));
        assert!(e.contains("port 0"), "{e}");
    }

    #[test]
    fn global_values_are_checked() {
        let e = err(&format!("interval: 0s\n{MIN}"));
        assert_eq!(e, "t.yaml:1:11: `interval`: `0s` must be greater than zero");
        let e = err(&format!("interval: soon\n{MIN}"));
        assert!(
            e.starts_with("t.yaml:1:11: `interval`: `soon` is not a duration"),
            "{e}"
        );
        let e = err(&format!("log_format: xml\n{MIN}"));
        assert!(
            e.starts_with("t.yaml:1:13: `log_format`: `xml` is not one of"),
            "{e}"
        );
        let e = err(&format!("audit_log: audit.jsonl\n{MIN}"));
        assert!(e.contains("must be an absolute path"), "{e}");
        let e = err(&format!("limits:\n  max_reaps_per_cycle: 0\n{MIN}"));
        assert_eq!(
            e,
            "t.yaml:2:24: `limits.max_reaps_per_cycle`: must be at least 1"
        );
        let e = err(&format!("limits:\n  max_reaps_per_minute: lots\n{MIN}"));
        assert!(
            e.starts_with("t.yaml:2:25: `limits.max_reaps_per_minute`: `lots`"),
            "{e}"
        );
        let e = err(&format!("dry_run: maybe\n{MIN}"));
        assert!(e.starts_with("t.yaml:1:10: invalid boolean"), "{e}");
    }

    #[test]
    fn explicit_null_is_refused() {
        let e = err(&format!("interval:\n{MIN}"));
        // A null points at the end of its key, where the value is missing.
        assert!(e.starts_with("t.yaml:1:9: `interval` has no value"), "{e}");
        let e = err(&with_target(
            "    older_than: 5m\n    exclude:\n      local_ports:\n",
        ));
        assert!(
            e.contains("`exclude.local_ports` in target `web` has no value"),
            "{e}"
        );
        // An empty block is fine (all defaults).
        ok(&format!("limits:\n{MIN}"));
        ok(&with_target("    older_than: 5m\n    exclude:\n"));
    }

    #[test]
    fn targets_must_be_present_and_non_empty() {
        let e = err("interval: 30s\n");
        assert!(e.starts_with("t.yaml: no `targets`"), "{e}");
        // The example the message gives is valid.
        let (_, example) = e.rsplit_once("e.g. ").expect("an example");
        ok(example.trim_matches('`'));
        assert_eq!(
            err("targets: []\n"),
            "t.yaml:1:10: `targets` is empty: list at least one target"
        );
        let e = err("targets:\n");
        assert!(e.starts_with("t.yaml:1:8: `targets` is empty"), "{e}");
        assert!(err("").starts_with("t.yaml: no `targets`"));
    }

    #[test]
    fn name_rules() {
        let e = err("targets:\n  - match: {pid: 1}\n    older_than: 1m\n");
        assert_eq!(e, "t.yaml:2:5: target #1 has no `name`");
        let e = err("targets:\n  - name: ''\n    match: {pid: 1}\n    older_than: 1m\n");
        assert_eq!(e, "t.yaml:2:11: target #1 has an empty `name`");
        let dup = format!("{MIN}  - name: web\n    match: {{pid: 3}}\n    older_than: 1m\n");
        assert_eq!(
            err(&dup),
            "t.yaml:6:11: duplicate target name `web` (first used at line 2)"
        );
    }

    #[test]
    fn older_than_required_and_positive() {
        let e = err("targets:\n  - name: web\n    match: {pid: 1}\n");
        assert!(
            e.starts_with("t.yaml:2:5: target `web` has no `older_than`; it is required"),
            "{e}"
        );
        let e = err(&with_target("    older_than: 0s\n"));
        assert_eq!(
            e,
            "t.yaml:5:17: `older_than` in target `web`: `0s` must be greater than zero"
        );
        let e = err(&with_target("    older_than: 5 minutes later\n"));
        assert!(
            e.starts_with(
                "t.yaml:5:17: `older_than` in target `web`: `5 minutes later` is not a duration"
            ),
            "{e}"
        );
    }

    #[test]
    fn match_rules() {
        let e = err("targets:\n  - name: web\n    older_than: 1m\n");
        assert!(
            e.starts_with("t.yaml:2:5: target `web` has no `match` block"),
            "{e}"
        );
        let e = err("targets:\n  - name: web\n    match: {}\n    older_than: 1m\n");
        assert!(
            e.starts_with("t.yaml:3:12: the `match` block of target `web` is empty, which would select every process"),
            "{e}"
        );
        let e = err("targets:\n  - name: web\n    match:\n    older_than: 1m\n");
        assert!(
            e.contains("is empty, which would select every process"),
            "{e}"
        );
        let m = |body: &str| {
            format!("targets:\n  - name: web\n    older_than: 1m\n    match:\n      {body}\n")
        };
        let e = err(&m("pid: 0"));
        assert!(
            e.starts_with("t.yaml:5:12: `match.pid` in target `web`: `0` is not a process id"),
            "{e}"
        );
        let e = err(&m("pid_file: run/x.pid"));
        assert!(e.contains("must be an absolute path"), "{e}");
        let e = err(&m("comm: '(nginx'"));
        assert!(
            e.starts_with(
                "t.yaml:5:13: `match.comm` in target `web`: invalid regex `(nginx`: unclosed group"
            ),
            "{e}"
        );
        assert!(err(&m("exe: '['")).contains("invalid regex"));
        assert!(err(&m("cmdline: '*'")).contains("invalid regex"));
        let e = err(&m("systemd_unit: nginx"));
        assert!(e.contains("did you mean `nginx.service`?"), "{e}");
        assert!(err(&m("systemd_unit: a/b.service")).contains("is not a unit name"));
        let e = err(&m("cgroup: system.slice"));
        assert!(e.contains("must be a cgroup path starting with `/`"), "{e}");
        assert!(err(&m("uid: -1")).contains("is not a numeric user id"));
        assert!(err(&m("uid: root")).contains("is not a numeric user id"));
        let e = err(&m("local_ports: []"));
        assert!(
            e.starts_with("t.yaml:5:20: `match.local_ports` in target `web` is empty"),
            "{e}"
        );
        // local_ports alone is a criterion.
        ok(&m("local_ports: [8080]"));
    }

    #[test]
    fn ports() {
        let m = |ports: &str| {
            format!(
                "targets:\n  - name: web\n    older_than: 1m\n    match:\n      local_ports: [80, {ports}]\n"
            )
        };
        assert_eq!(
            err(&m("0")),
            "t.yaml:5:25: `match.local_ports` in target `web`: port 0 is out of range 1-65535"
        );
        assert!(err(&m("70000")).contains("port 70000 is out of range 1-65535"));
        assert!(err(&m("http")).contains("`http` is not a port number (1-65535)"));
        assert_eq!(parse_port("65535"), Ok(65535));
        assert_eq!(parse_port(" 1 "), Ok(1));
    }

    #[test]
    fn exclude_rules() {
        let e = err(&with_target(
            "    older_than: 1m\n    exclude:\n      remote_cidrs: [10.0.0.0/8, 10.0.0.0/33]\n",
        ));
        assert!(
            e.starts_with(
                "t.yaml:7:34: `exclude.remote_cidrs` in target `web`: `10.0.0.0/33` is not a CIDR"
            ),
            "{e}"
        );
        assert!(
            err(&with_target(
                "    older_than: 1m\n    exclude:\n      remote_ports: [99999]\n"
            ))
            .contains("`exclude.remote_ports` in target `web`: port 99999")
        );
        let both = "targets:\n  - name: web\n    older_than: 1m\n    match: {local_ports: [80, 443]}\n    exclude: {local_ports: [22, 443]}\n";
        assert_eq!(
            err(both),
            "t.yaml:5:33: `exclude.local_ports` in target `web`: port 443 is both matched and excluded, so it selects nothing"
        );
    }

    #[test]
    fn escalate_rules() {
        let ok = parse(
            &with_target(
                "    older_than: 1m\n    action: shutdown\n    escalate: {close_after: 10m}\n",
            ),
            "t.yaml",
        )
        .expect("valid escalate");
        assert_eq!(
            ok.targets[0].escalate,
            Some(Escalate {
                close_after: Duration::from_secs(600)
            })
        );
        assert!(ok.describe().contains("WARNING: escalate closes fds"));
        let again = parse(&ok.describe(), "described.yaml").expect("describe round-trips");
        assert_eq!(again.targets[0].escalate, ok.targets[0].escalate);
        let e = err(&with_target(
            "    older_than: 1m\n    escalate: {close_after: 10m}\n",
        ));
        assert!(e.contains("only follows `action: shutdown`"), "{e}");
        let e = err(&with_target(
            "    older_than: 1m\n    action: shutdown\n    escalate: {}\n",
        ));
        assert!(e.contains("needs `close_after`"), "{e}");
        let e = err(&with_target(
            "    older_than: 1m\n    action: shutdown\n    escalate: {close_after: soon}\n",
        ));
        assert!(e.contains("close_after"), "{e}");
    }

    #[test]
    fn action_rules() {
        let e = err(&with_target("    older_than: 1m\n    action: shotdown\n"));
        assert_eq!(
            e,
            "t.yaml:6:13: `action` in target `web`: `shotdown` is not one of `log`, `shutdown`, `destroy`; did you mean `shutdown`?"
        );
        let ok = parse(
            &with_target("    older_than: 1m\n    action: destroy\n"),
            "t.yaml",
        )
        .expect("destroy is an action");
        assert_eq!(ok.targets[0].action, Action::Destroy);
        let e = err(&with_target("    older_than: 1m\n    min_close_wait: 0\n"));
        assert_eq!(
            e,
            "t.yaml:6:21: `min_close_wait` in target `web`: must be at least 1"
        );
    }

    #[test]
    fn unknown_keys_name_the_place_and_suggest() {
        let e = err(&with_target("    older_then: 5m\n"));
        assert_eq!(
            e,
            "t.yaml:5:5: unknown key `older_then` in target `web`; did you mean `older_than`?"
        );
        let e = err("targets:\n  - name: web\n    match:\n      pdi: 1\n    older_than: 1m\n");
        assert_eq!(
            e,
            "t.yaml:4:7: unknown key `pdi` in the `match` block of target `web`; did you mean `pid`?"
        );
        let e = err(&format!("intervall: 30s\n{MIN}"));
        assert_eq!(
            e,
            "t.yaml:1:1: unknown key `intervall` at the top level; did you mean `interval`?"
        );
        let e = err(&format!("limits:\n  max_reaps: 3\n{MIN}"));
        assert!(
            e.starts_with("t.yaml:2:3: unknown key `max_reaps` in `limits`; valid keys:"),
            "{e}"
        );
        let e = err(&format!("metrics:\n  listne: off\n{MIN}"));
        assert!(e.contains("in `metrics`; did you mean `listen`?"), "{e}");
        let e = err(&with_target(
            "    older_than: 1m\n    exclude:\n      remote_cidr: []\n",
        ));
        assert!(
            e.contains("unknown key `remote_cidr` in the `exclude` block of target `web`; did you mean `remote_cidrs`?"),
            "{e}"
        );
        let e = err("targets:\n  - name: web\n    comm: nginx\n    older_than: 1m\n");
        assert!(
            e.contains("`comm` is a criterion: put it under `match:`"),
            "{e}"
        );
        // The second target, named after the typo.
        let e = err(&format!("{MIN}  - older_thn: 1m\n    name: api\n"));
        assert_eq!(
            e,
            "t.yaml:6:5: unknown key `older_thn` in target `api`; did you mean `older_than`?"
        );
        // A top-level key after the list is not blamed on the last target.
        let e = err(&format!("{MIN}dryrun: true\n"));
        assert!(
            e.starts_with(
                "t.yaml:6:1: unknown key `dryrun` at the top level; did you mean `dry_run`?"
            ),
            "{e}"
        );
    }

    #[test]
    fn yaml_errors_are_one_line_with_position() {
        let e = err("targets:\n  - name: \"web\n    match: {}\n");
        assert!(e.starts_with("t.yaml:2:11: "), "{e}");
        let e = err("targets:\n  - name: web\n   match: {}\n");
        assert!(e.starts_with("t.yaml:3:4: "), "{e}");
        let e = err(&with_target("    older_than: 1m\n    dry_run: perhaps\n"));
        assert_eq!(e, "t.yaml:6:14: invalid boolean (in target `web`)");
        assert_eq!(
            err("- 1\n"),
            "t.yaml:1:1: expected a mapping (`key: value` lines) here"
        );
        let e = err("targets:\n  - name: [web]\n");
        assert_eq!(
            e,
            "t.yaml:2:11: expected a single value here, not a list or a mapping (in target #1)"
        );
        assert!(err("targets: web\n").starts_with("t.yaml:1:10: expected a list"));
        let e = err(&format!("{MIN}    name: again\n"));
        assert!(e.starts_with("t.yaml:6:5: duplicate mapping key"), "{e}");
    }

    #[test]
    fn edit_distance_and_suggestions() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("pdi", "pid"), 1);
        assert_eq!(edit_distance("older_then", "older_than"), 1);
        let keys = [
            "name",
            "match",
            "older_than",
            "exclude",
            "action",
            "dry_run",
        ];
        assert_eq!(suggest("older_then", &keys), Some("older_than"));
        assert_eq!(suggest("Action", &keys), Some("action"));
        assert_eq!(suggest("matches", &keys), Some("match"));
        assert_eq!(suggest("frobnicate", &keys), None);
        assert_eq!(suggest("x", &keys), None);
    }

    #[test]
    fn units_from_cgroups() {
        assert_eq!(
            unit_from_cgroup("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            unit_from_cgroup("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service")
                .as_deref(),
            Some("foo.service")
        );
        assert_eq!(
            unit_from_cgroup("/user.slice/user-1000.slice/session-3.scope").as_deref(),
            Some("session-3.scope")
        );
        assert_eq!(
            unit_from_cgroup("/system.slice/docker-ab12.scope/init").as_deref(),
            Some("docker-ab12.scope")
        );
        assert_eq!(unit_from_cgroup("/"), None);
        assert_eq!(unit_from_cgroup("/system.slice"), None);
        assert_eq!(unit_from_cgroup("/a/.service"), None);
    }

    #[test]
    fn cgroup_file() {
        assert_eq!(
            parse_cgroup_file("0::/system.slice/nginx.service\n").as_deref(),
            Some("/system.slice/nginx.service")
        );
        let hybrid = "12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/x.service\n0::/system.slice/x.service\n";
        assert_eq!(
            parse_cgroup_file(hybrid).as_deref(),
            Some("/system.slice/x.service")
        );
        assert_eq!(
            parse_cgroup_file("0::/a:b/c.scope\n").as_deref(),
            Some("/a:b/c.scope")
        );
        assert_eq!(
            parse_cgroup_file("0::/gone.scope (deleted)\n").as_deref(),
            Some("/gone.scope")
        );
        assert_eq!(parse_cgroup_file("1:cpu:/x\n"), None);
        assert_eq!(parse_cgroup_file(""), None);
    }

    fn facts() -> ProcessFacts {
        ProcessFacts {
            pid: 4242,
            comm: "nginx".into(),
            exe: Some("/usr/sbin/nginx".into()),
            cmdline: Some("nginx: worker process".into()),
            cgroup: Some("/system.slice/nginx.service".into()),
            uid: Some(33),
        }
    }

    fn matcher(body: &str) -> TargetMatch {
        let c = ok(&format!(
            "targets:\n  - name: t\n    older_than: 1m\n    match: {{{body}}}\n"
        ));
        c.targets[0].matcher.clone()
    }

    #[test]
    fn process_matching() {
        let f = facts();
        assert!(matcher("comm: ngin").matches(&f, None));
        assert!(!matcher("comm: ^ngin$").matches(&f, None));
        assert!(matcher("pid: 4242").matches(&f, None));
        assert!(!matcher("pid: 4243").matches(&f, None));
        assert!(matcher("exe: /nginx$").matches(&f, None));
        assert!(matcher("cmdline: worker").matches(&f, None));
        assert!(matcher("systemd_unit: nginx.service").matches(&f, None));
        assert!(!matcher("systemd_unit: apache.service").matches(&f, None));
        assert!(matcher("cgroup: /system.slice").matches(&f, None));
        assert!(matcher("cgroup: /system.slice/nginx.service").matches(&f, None));
        assert!(matcher("cgroup: /").matches(&f, None));
        assert!(!matcher("cgroup: /system.sl").matches(&f, None));
        assert!(matcher("uid: 33").matches(&f, None));
        assert!(!matcher("uid: 0").matches(&f, None));
        // pid_file: the pid read this cycle must be this process; none read, no match.
        let pf = matcher("pid_file: /run/nginx.pid");
        assert!(pf.matches(&f, Some(4242)));
        assert!(!pf.matches(&f, Some(1)));
        assert!(!pf.matches(&f, None));
        // All criteria must hold.
        assert!(matcher("comm: nginx, uid: 33").matches(&f, None));
        assert!(!matcher("comm: nginx, uid: 0").matches(&f, None));
        // A criterion on a fact we could not read does not match.
        let bare = ProcessFacts {
            pid: 4242,
            comm: "nginx".into(),
            ..ProcessFacts::default()
        };
        assert!(!matcher("exe: nginx").matches(&bare, None));
        assert!(!matcher("cmdline: nginx").matches(&bare, None));
        assert!(!matcher("systemd_unit: nginx.service").matches(&bare, None));
        assert!(!matcher("cgroup: /").matches(&bare, None));
        assert!(!matcher("uid: 33").matches(&bare, None));
        // local_ports is a socket criterion: any process passes the process check.
        let ports = matcher("local_ports: [80]");
        assert!(!ports.has_process_criteria());
        assert!(ports.matches(&bare, None));
    }

    fn target(extra: &str) -> Target {
        let c = ok(&format!(
            "targets:\n  - name: t\n    older_than: 1m\n    match: {{comm: x, local_ports: [80, 443]}}\n{extra}"
        ));
        c.targets[0].clone()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    #[test]
    fn socket_selection_and_exclusions() {
        let t = target("");
        assert!(t.socket_selected(sa("10.0.0.1:80"), sa("192.0.2.1:5000")));
        assert!(!t.socket_selected(sa("10.0.0.1:8080"), sa("192.0.2.1:5000")));

        let t = target(
            "    exclude:\n      remote_cidrs: [10.0.0.0/8, '2001:db8::/32', 192.0.2.7, '::ffff:198.51.100.0/120']\n      remote_ports: [5432]\n",
        );
        let local = sa("127.0.0.1:80");
        assert!(!t.socket_selected(local, sa("10.1.2.3:5000")));
        assert!(t.socket_selected(local, sa("11.1.2.3:5000")));
        assert!(!t.socket_selected(local, sa("192.0.2.7:5000")));
        assert!(t.socket_selected(local, sa("192.0.2.8:5000")));
        assert!(!t.socket_selected(local, sa("[2001:db8::1]:5000")));
        assert!(!t.socket_selected(local, sa("11.1.2.3:5432")));
        // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
        let v6local = sa("[::]:443");
        assert!(!t.socket_selected(v6local, sa("[::ffff:10.9.9.9]:5000")));
        assert!(t.socket_selected(v6local, sa("[::ffff:11.9.9.9]:5000")));
        // And an IPv4 peer against a mapped CIDR.
        assert!(!t.socket_selected(local, sa("198.51.100.9:5000")));

        let t = target("    exclude: {local_ports: [22]}\n");
        let no_ports = Target {
            matcher: TargetMatch::default(),
            ..t
        };
        assert!(!no_ports.socket_selected(sa("127.0.0.1:22"), sa("192.0.2.1:5000")));
        assert!(no_ports.socket_selected(sa("127.0.0.1:23"), sa("192.0.2.1:5000")));
    }

    #[test]
    fn permission_rules() {
        assert_eq!(permission_problem(0o100600, 0), None);
        assert_eq!(permission_problem(0o100644, 0), None);
        assert_eq!(permission_problem(0o100400, 0), None);
        let p = permission_problem(0o100664, 0).expect("group-writable");
        assert!(p.contains("writable by group (mode 0664)"), "{p}");
        let p = permission_problem(0o100666, 0).expect("world-writable");
        assert!(p.contains("writable by group and others"), "{p}");
        let p = permission_problem(0o100600, 1000).expect("not root's");
        assert!(p.contains("owned by uid 1000, not root"), "{p}");
        let p = permission_problem(0o100602, 1000).expect("both");
        assert!(p.contains("uid 1000") && p.contains("others"), "{p}");
        assert_eq!(
            shell_quote("/etc/cwreap/cwreap.yaml"),
            "/etc/cwreap/cwreap.yaml"
        );
        assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
    }

    #[test]
    fn permission_check_on_a_real_file() {
        let dir = std::env::temp_dir().join(format!("cwreap-config-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let f = dir.join("policy.yaml");
        std::fs::write(&f, MIN).expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).expect("chmod");
        let r = check_file_permissions(&f);
        if rustix::process::geteuid().is_root() {
            let e = r
                .expect_err("world-writable file refused as root")
                .to_string();
            assert!(e.contains("chmod 600"), "{e}");
        } else {
            assert!(r.is_ok(), "only root refuses");
        }
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let own = std::fs::metadata(&f).expect("stat").uid();
        assert_eq!(
            check_file_permissions(&f).is_ok(),
            own == 0 || !runs_privileged()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn load_reports_unreadable_files() {
        let e = load(Path::new("/nonexistent/cwreap.yaml")).expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/cwreap.yaml: cannot read the policy")
        );
    }

    #[test]
    fn describe_is_explicit_and_round_trips() {
        let c = ok(MIN);
        let d = c.describe();
        for line in [
            "interval: \"30s\"",
            "dry_run: true",
            "log_format: text",
            "max_reaps_per_cycle: 100",
            "max_reaps_per_minute: 600",
            "listen: \"127.0.0.1:9814\"",
            "  - name: \"web\"",
            "      comm: \"^nginx$\"",
            "    older_than: \"5m\"",
            "    min_close_wait: 1",
            "    action: log",
            "    # dry_run: true (the global setting)",
        ] {
            assert!(d.contains(line), "missing {line:?} in\n{d}");
        }
        let full = ok(
            "metrics: {listen: off}\naudit_log: /var/log/cwreap/audit.jsonl\ntargets:\n  - name: 'a \"q\" \\\\ b'\n    match: {cmdline: 'x\\d+ \"y\"', local_ports: [80]}\n    older_than: 1h 2m 3s\n    exclude: {remote_cidrs: ['::ffff:10.0.0.0/104']}\n    action: shutdown\n    dry_run: false\n",
        );
        for c in [c, full] {
            let d = c.describe();
            let again = ok(&d);
            assert_eq!(again.describe(), d);
        }
    }
}
