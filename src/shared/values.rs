//! The value parsers shared by command-line flags and policy keys, so a value means the
//! same in both: durations, ports, counts, pids, uids and user names, regexes, CIDRs,
//! absolute paths, systemd unit names and cgroup prefixes. Each returns the problem as one
//! line naming the value.

use std::path::PathBuf;
use std::time::Duration;

use std::net::IpAddr;

use ipnet::IpNet;
use regex::Regex;

use crate::shared::selector::is_unit_name;

/// The longest age anything is asked to reach (`older_than`, `--older-than`): a year.
pub const MAX_AGE: Duration = Duration::from_secs(365 * 24 * 3600);
/// The longest time between two looks (the daemon's `interval`, `scan --watch`): a day.
pub const MAX_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// The largest count a limit or a selector takes (sockets, reaps).
pub const MAX_COUNT: u32 = 10_000_000;
/// The longest regex or literal a selector takes, in bytes of its text.
pub const MAX_PATTERN_LEN: usize = 1024;
/// What one compiled regex may take (its NFA, and each lazy DFA), at most.
pub const PATTERN_SIZE_LIMIT: usize = 1 << 20;
/// What all the regexes of one policy (or one command line) may take together: each gets
/// an even share, so compiling them all stays bounded in time and memory.
pub const REGEX_BUDGET: usize = 4 << 20;

/// A duration: humantime text, greater than zero, at most [`MAX_AGE`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration_or_zero(s)?;
    if d.is_zero() {
        return Err(format!("`{s}` must be greater than zero"));
    }
    Ok(d)
}

/// A duration that may be zero, at most [`MAX_AGE`].
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("`{s}` is not a duration ({e}); use e.g. 90s, 5m, 1h30m"))?;
    if d > MAX_AGE {
        return Err(format!(
            "`{}` is longer than {}, the most cwreap waits for anything",
            s.trim(),
            humantime::format_duration(MAX_AGE)
        ));
    }
    Ok(d)
}

/// A time between two looks: at least `floor`, at most [`MAX_INTERVAL`].
pub fn parse_period(s: &str, floor: Duration) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < floor {
        return Err(format!(
            "`{}` is below the floor of {}; a shorter interval would keep a core busy",
            s.trim(),
            humantime::format_duration(floor)
        ));
    }
    if d > MAX_INTERVAL {
        return Err(format!(
            "`{}` is longer than {}; look at least once a day",
            s.trim(),
            humantime::format_duration(MAX_INTERVAL)
        ));
    }
    Ok(d)
}

pub fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u64>() {
        Ok(p) if (1..=65535).contains(&p) => u16::try_from(p).map_err(|e| e.to_string()),
        Ok(p) => Err(format!("port {p} is out of range 1-65535")),
        Err(_) => Err(format!("`{s}` is not a port number (1-65535)")),
    }
}

pub fn parse_count(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u64>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) if n > u64::from(MAX_COUNT) => Err(format!("{n} is more than {MAX_COUNT}")),
        Ok(n) => u32::try_from(n).map_err(|_| format!("{n} is too large")),
        Err(_) => Err(format!("`{s}` is not a positive whole number")),
    }
}

pub fn parse_pid(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(format!("`{s}` is not a process id (a positive integer)")),
    }
}

/// A user id, or a user name looked up in /etc/passwd.
pub fn parse_uid(s: &str) -> Result<u32, String> {
    let t = s.trim();
    if let Ok(uid) = t.parse::<u32>() {
        return Ok(uid);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    user_id(&passwd, t).ok_or_else(|| {
        format!("`{s}` is neither a numeric user id (0-4294967295) nor a user in /etc/passwd")
    })
}

/// The uid of user `name` in the text of an /etc/passwd file.
pub fn user_id(passwd: &str, name: &str) -> Option<u32> {
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// A regex of at most [`MAX_PATTERN_LEN`] bytes compiling within [`PATTERN_SIZE_LIMIT`].
pub fn parse_regex(s: &str) -> Result<Regex, String> {
    parse_regex_within(s, PATTERN_SIZE_LIMIT)
}

/// A regex of at most [`MAX_PATTERN_LEN`] bytes that compiles within `size_limit` bytes
/// (its share of [`REGEX_BUDGET`]). The limit bounds compile time as well as memory.
pub fn parse_regex_within(s: &str, size_limit: usize) -> Result<Regex, String> {
    if s.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "a regex of {} bytes; at most {MAX_PATTERN_LEN} are taken (it is matched against every process, every cycle)",
            s.len()
        ));
    }
    regex::RegexBuilder::new(s)
        .size_limit(size_limit)
        .dfa_size_limit(size_limit)
        .build()
        .map_err(|e| {
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

/// The size limit of each of `n` regexes sharing [`REGEX_BUDGET`].
pub fn regex_share(n: usize) -> usize {
    PATTERN_SIZE_LIMIT.min(REGEX_BUDGET / n.max(1))
}

pub fn parse_cidr(s: &str) -> Result<IpNet, String> {
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

pub fn parse_absolute_path(s: &str) -> Result<PathBuf, String> {
    if s.starts_with('/') {
        Ok(PathBuf::from(s))
    } else {
        Err(format!("`{s}` must be an absolute path"))
    }
}

pub fn parse_unit(s: &str) -> Result<String, String> {
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

pub fn parse_cgroup_prefix(s: &str) -> Result<String, String> {
    let t = s.trim();
    if !t.starts_with('/') {
        return Err(format!(
            "`{s}` must be a cgroup path starting with `/` (e.g. /system.slice/nginx.service)"
        ));
    }
    let trimmed = t.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.to_owned())
}

/// A message (a YAML or regex error) on one line: control characters split it, and the
/// pieces are joined with single spaces.
pub fn one_line(s: &str) -> String {
    s.split(|c: char| c.is_control())
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}
