//! Parsing /proc's text: socket links, limits, stat and status (through procfs-core,
//! checked first so malformed text is an error and never a panic), fdinfo and maps lines,
//! and the inodes an epoll instance watches.

use std::io;
use std::path::Path;

use procfs_core::FromRead;
use procfs_core::process::{LimitValue, Stat, Status};

/// A parse error of `path`, with the path in its message.
pub(super) fn in_file(path: &Path, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{}: {e}", path.display()))
}

/// Text of a /proc file that is not what the kernel writes.
pub(super) fn malformed(why: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.to_string())
}

/// The soft and hard limits of one resource; None is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

/// `socket:[12345]` → 12345.
pub fn parse_socket_link(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Both limits of `Max open files` in the text of /proc/PID/limits.
pub fn parse_nofile(limits: &str) -> io::Result<Limits> {
    // procfs-core finds the columns by counting back from the end of each line, and a line
    // of fewer than three words makes that count go below zero (a panic in debug builds).
    // The kernel writes a name and two values on every line (units on most).
    let short = limits
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("Limit"))
        .find(|l| l.split_whitespace().count() < 3);
    if let Some(line) = short {
        return Err(malformed(format!(
            "limits line {line:?} has too few columns"
        )));
    }
    let all = procfs_core::process::Limits::from_read(limits.as_bytes()).map_err(malformed)?;
    let value = |v| match v {
        LimitValue::Unlimited => None,
        LimitValue::Value(n) => Some(n),
    };
    Ok(Limits {
        soft: value(all.max_open_files.soft_limit),
        hard: value(all.max_open_files.hard_limit),
    })
}

/// /proc/PID/stat (or a thread's), parsed by procfs-core.
pub(super) fn parse_stat(stat: &[u8]) -> io::Result<Stat> {
    // procfs-core takes for granted that the comm sits in parentheses with a space on either
    // side, and slices the line around them by byte offset: anything else would panic. The
    // check runs on the very string it parses (its lossy conversion, trimmed).
    let text = String::from_utf8_lossy(stat);
    let line = text.trim();
    let bytes = line.as_bytes();
    let framed = match (line.find('('), line.rfind(')')) {
        (Some(open), Some(close)) => {
            close > open
                && open.checked_sub(1).and_then(|i| bytes.get(i)) == Some(&b' ')
                && bytes.get(close + 1) == Some(&b' ')
        }
        _ => false,
    };
    if !framed {
        return Err(malformed("stat line without `PID (COMM) STATE`"));
    }
    Stat::from_read(bytes).map_err(malformed)
}

/// A /proc status file, parsed by procfs-core.
pub(super) fn parse_status(status: &[u8]) -> io::Result<Status> {
    Status::from_read(status).map_err(malformed)
}

/// The state letter (field 3) of a stat line, and the fields after it. The comm before it
/// ends at the last `)`: it may itself hold spaces, parentheses and bytes that are not
/// UTF-8. Read by hand, unlike [`parse_stat`]: it runs for every thread considered (each
/// one seized, each one looked at for a live one) and needs only the letter, not 52
/// fields parsed.
pub(super) fn stat_after_comm(stat: &[u8]) -> Option<(char, impl Iterator<Item = &[u8]>)> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let mut fields = stat[close + 1..]
        .split(u8::is_ascii_whitespace)
        .filter(|f| !f.is_empty());
    let state = *fields.next()?.first()?;
    Some((char::from(state), fields))
}

/// The value of `key:` in a `Key:\tvalue` file (status, fdinfo), trimmed.
pub(super) fn field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(str::trim)
    })
}

/// The pid a pidfd refers to, from `Pid:` in its fdinfo (-1 once the process is gone).
pub fn parse_fdinfo_pid(fdinfo: &str) -> Option<i32> {
    field(fdinfo, "Pid").and_then(|v| v.parse().ok())
}

/// One line of /proc/PID/maps: start, end, whether it is readable and executable, and its
/// path (empty for anonymous memory).
pub fn parse_maps_line(line: &str) -> Option<(u64, u64, bool, &str)> {
    let mut cols = line.splitn(6, ' ');
    let (start, end) = cols.next()?.split_once('-')?;
    let perms = cols.next()?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let rx = perms.starts_with('r') && perms.as_bytes().get(2) == Some(&b'x');
    let path = cols.nth(3).map(str::trim).unwrap_or("");
    (end > start).then_some((start, end, rx, path))
}

/// The inodes of the files registered in an epoll instance, from its
/// /proc/PID/fdinfo/N: the hexadecimal `ino:` of each `tfd:` line, in file order.
///
/// `tfd:` (the fd number the file was registered under) is not used: once that fd is
/// closed while a dup of it keeps the file open, the entry stays with its stale `tfd`, and
/// the number may be reused by another file. The inode names the file itself.
pub fn parse_epoll_fdinfo(text: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    parse_epoll_fdinfo_into(text, &mut out);
    out
}

/// [`parse_epoll_fdinfo`] appending to `out`, without allocating per line.
pub fn parse_epoll_fdinfo_into(text: &[u8], out: &mut Vec<u64>) {
    for line in text.split(|&b| b == b'\n') {
        if !line.starts_with(b"tfd:") {
            continue;
        }
        let Some(at) = line.windows(5).position(|w| w == b" ino:") else {
            continue;
        };
        let mut ino: u64 = 0;
        let mut digits = 0;
        for &b in &line[at + 5..] {
            let d = match b {
                b'0'..=b'9' => b - b'0',
                b'a'..=b'f' => b - b'a' + 10,
                b'A'..=b'F' => b - b'A' + 10,
                _ => break,
            };
            let Some(next) = ino
                .checked_mul(16)
                .and_then(|v| v.checked_add(u64::from(d)))
            else {
                digits = 0; // overflow: not an inode we can name
                break;
            };
            ino = next;
            digits += 1;
        }
        if digits > 0 {
            out.push(ino);
        }
    }
}
