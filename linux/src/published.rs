//! The running daemon's first sight of each CLOSE_WAIT socket, published for the command
//! line: the file `ages` in the run directory (`/run/cwreap`, or `$CWREAP_RUN_DIR`),
//! rewritten whole after each cycle (a temporary file renamed over it), so `scan`, `reap`
//! and `explain` age a socket as the daemon does.
//!
//! A reader trusts the file only while it still speaks for a live daemon: the process it
//! names is alive with the start time it gives, owns the file, and wrote it within a few
//! intervals; the file is a regular one that no other user can change. A SIGKILLed
//! daemon's file is never taken for current ages.
//!
//! The format is little-endian binary: the magic `CWAGES01`, then pid (i32), start time
//! (u64, clock ticks after boot), heartbeat (u64, CLOCK_BOOTTIME ns), interval (u64, ms),
//! count (u64), then per socket netns inode, cookie and first sight (three u64).
//!
//! With `where: on`, the daemon also publishes the file `where` there: the magic
//! `CWWHERE1`, the same header without the count, then the stacks it keeps for `explain
//! --where` (a body this module does not read), trusted the same way.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::kernel::clock::Boottime;
use crate::kernel::discover::SocketKey;
use crate::procfs::ProcFs;

/// Where the daemon publishes and the command line reads, unless `$CWREAP_RUN_DIR` says.
pub const DEFAULT_RUN_DIR: &str = "/run/cwreap";
const FILE: &str = "ages";
const MAGIC: &[u8; 8] = b"CWAGES01";
const WHERE_FILE: &str = "where";
const WHERE_MAGIC: &[u8; 8] = b"CWWHERE1";
const HEADER: usize = 8 + 4 + 8 * 4;
const RECORD: usize = 24;
/// A file larger than this is refused unread (some 2.8 million sockets).
const MAX_BYTES: u64 = 64 << 20;

/// The run directory: `$CWREAP_RUN_DIR` when set and absolute, else [`DEFAULT_RUN_DIR`].
pub fn run_dir() -> PathBuf {
    std::env::var_os("CWREAP_RUN_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .unwrap_or_else(|| PathBuf::from(DEFAULT_RUN_DIR))
}

/// Who wrote the file, and when.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub pid: i32,
    pub start_time: u64,
    pub heartbeat: Boottime,
    pub interval: Duration,
}

/// What a trusted file gives: when the daemon first saw each socket in CLOSE_WAIT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub header: Header,
    pub first_seen: HashMap<SocketKey, Boottime>,
}

/// Why the published ages are not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("no daemon publishes in {0}")]
    Missing(PathBuf),
    #[error("{0}")]
    NotTrusted(String),
    #[error("the daemon that wrote {path} (pid {pid}) is not running any more")]
    DaemonGone { path: PathBuf, pid: i32 },
    #[error("{path} was last written {age:?} ago, longer than its daemon's cycles allow")]
    Stale { path: PathBuf, age: Duration },
    #[error("{path} is malformed: {why}")]
    Malformed { path: PathBuf, why: String },
}

/// The header of a file whose magic is `magic`: 36 bytes.
fn encode_header(magic: &[u8; 8], header: &Header) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER);
    b.extend_from_slice(magic);
    b.extend_from_slice(&header.pid.to_le_bytes());
    b.extend_from_slice(&header.start_time.to_le_bytes());
    b.extend_from_slice(&header.heartbeat.as_nanos().to_le_bytes());
    let interval = u64::try_from(header.interval.as_millis()).unwrap_or(u64::MAX);
    b.extend_from_slice(&interval.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// The header of `b` and what follows it, if its magic is `magic`.
fn decode_header<'a>(magic: &[u8; 8], b: &'a [u8]) -> Result<(Header, &'a [u8]), String> {
    let head = HEADER - 8;
    if b.len() < head {
        return Err(format!("{} bytes, shorter than the header", b.len()));
    }
    if &b[..8] != magic {
        return Err(format!(
            "bad magic (not {})",
            String::from_utf8_lossy(magic)
        ));
    }
    let mut pid = [0u8; 4];
    pid.copy_from_slice(&b[8..12]);
    let header = Header {
        pid: i32::from_le_bytes(pid),
        start_time: u64_at(b, 12),
        heartbeat: Boottime::from_nanos(u64_at(b, 20)),
        interval: Duration::from_millis(u64_at(b, 28)),
    };
    Ok((header, &b[head..]))
}

/// The bytes of a file with `header` and `first_seen`.
pub fn encode(header: &Header, first_seen: &[(SocketKey, Boottime)]) -> Vec<u8> {
    let mut b = encode_header(MAGIC, header);
    b.reserve(8 + RECORD * first_seen.len());
    b.extend_from_slice(&(first_seen.len() as u64).to_le_bytes());
    for ((netns, cookie), at) in first_seen {
        b.extend_from_slice(&netns.to_le_bytes());
        b.extend_from_slice(&cookie.to_le_bytes());
        b.extend_from_slice(&at.as_nanos().to_le_bytes());
    }
    b
}

/// Parse the bytes of a file; the error says what is wrong.
pub fn decode(b: &[u8]) -> Result<Published, String> {
    let (header, rest) = decode_header(MAGIC, b)?;
    if rest.len() < 8 {
        return Err(format!("{} bytes, shorter than the header", b.len()));
    }
    let count = u64_at(rest, 0);
    let body = &rest[8..];
    if u64::try_from(body.len()).ok() != count.checked_mul(RECORD as u64) {
        return Err(format!(
            "{count} records announced, {} bytes of them present",
            body.len()
        ));
    }
    let mut first_seen = HashMap::with_capacity(body.len() / RECORD);
    for r in body.chunks_exact(RECORD) {
        first_seen.insert(
            (u64_at(r, 0), u64_at(r, 8)),
            Boottime::from_nanos(u64_at(r, 16)),
        );
    }
    Ok(Published { header, first_seen })
}

/// Write the file in `dir` (created mode 0755 when missing): to a temporary file, synced,
/// then renamed over the old one, so a reader sees one whole file or the other.
pub fn write(dir: &Path, header: &Header, first_seen: &[(SocketKey, Boottime)]) -> io::Result<()> {
    write_file(dir, FILE, header.pid, &encode(header, first_seen))
}

fn write_file(dir: &Path, name: &str, pid: i32, bytes: &[u8]) -> io::Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    }
    let tmp = dir.join(format!(".{name}.{pid}"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    fs::rename(&tmp, dir.join(name))
}

/// Remove the file (a clean stop), if it is ours.
pub fn withdraw(dir: &Path, pid: i32) {
    withdraw_file(dir, FILE, MAGIC, pid);
}

fn withdraw_file(dir: &Path, name: &str, magic: &[u8; 8], pid: i32) {
    let path = dir.join(name);
    if let Ok(b) = fs::read(&path)
        && decode_header(magic, &b).is_ok_and(|(h, _)| h.pid == pid)
    {
        let _ = fs::remove_file(path);
    }
}

/// Publish the stacks the daemon keeps for `explain --where` (`where: on`): `body` after
/// the header, in the file `where` of `dir`, as [`write`] does.
pub fn write_where(dir: &Path, header: &Header, body: &[u8]) -> io::Result<()> {
    let mut b = encode_header(WHERE_MAGIC, header);
    b.extend_from_slice(body);
    write_file(dir, WHERE_FILE, header.pid, &b)
}

/// Remove the stacks published (a clean stop), if they are ours.
pub fn withdraw_where(dir: &Path, pid: i32) {
    withdraw_file(dir, WHERE_FILE, WHERE_MAGIC, pid);
}

/// The stacks published in `dir` (their header, and the body after it), if they still
/// speak for a live daemon at `now`; trusted as [`read`] trusts the ages.
pub fn read_where(dir: &Path, proc: &ProcFs, now: Boottime) -> Result<(Header, Vec<u8>), Unusable> {
    read_file(dir, WHERE_FILE, proc, now, |b| {
        decode_header(WHERE_MAGIC, b).map(|(h, body)| (h, (h, body.to_vec())))
    })
}

/// The published ages in `dir`, if they still speak for a live daemon at `now`.
pub fn read(dir: &Path, proc: &ProcFs, now: Boottime) -> Result<Published, Unusable> {
    read_file(dir, FILE, proc, now, |b| decode(b).map(|p| (p.header, p)))
}

/// The file `name` in `dir`, parsed by `parse`, if it still speaks for a live daemon.
fn read_file<T>(
    dir: &Path,
    name: &str,
    proc: &ProcFs,
    now: Boottime,
    parse: impl FnOnce(&[u8]) -> Result<(Header, T), String>,
) -> Result<T, Unusable> {
    let path = dir.join(name);
    let not_trusted = |why: String| Unusable::NotTrusted(format!("{}: {why}", path.display()));
    let dmeta = match fs::metadata(dir) {
        Ok(m) => m,
        Err(_) => return Err(Unusable::Missing(dir.to_path_buf())),
    };
    let mut f = match File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Unusable::Missing(dir.to_path_buf()));
        }
        Err(e) => return Err(not_trusted(format!("cannot open it ({e})"))),
    };
    let meta = f.metadata().map_err(|e| not_trusted(e.to_string()))?;
    if !meta.file_type().is_file() {
        return Err(not_trusted("not a regular file".into()));
    }
    if meta.mode() & 0o022 != 0 || dmeta.mode() & 0o002 != 0 && dmeta.mode() & 0o1000 == 0 {
        return Err(not_trusted(
            "writable by others: what it says could be anyone's".into(),
        ));
    }
    if meta.len() > MAX_BYTES {
        return Err(not_trusted(format!(
            "{} bytes, more than any daemon writes",
            meta.len()
        )));
    }
    let mut b = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    (&mut f)
        .take(MAX_BYTES)
        .read_to_end(&mut b)
        .map_err(|e| not_trusted(e.to_string()))?;
    let (h, published) = parse(&b).map_err(|why| Unusable::Malformed {
        path: path.clone(),
        why,
    })?;
    let gone = Unusable::DaemonGone {
        path: path.clone(),
        pid: h.pid,
    };
    // The writer must be alive, be the process that started then, and own the file.
    if proc.start_time(h.pid).ok() != Some(h.start_time) {
        return Err(gone);
    }
    if !matches!(proc.task_state(h.pid, h.pid), Ok(Some(s)) if s != 'Z' && s != 'X') {
        return Err(gone);
    }
    let fsuid = proc
        .status_field(h.pid, None, "Uid")
        .ok()
        .flatten()
        .and_then(|v| {
            v.split_whitespace()
                .nth(3)
                .and_then(|u| u.parse::<u32>().ok())
        });
    if fsuid != Some(meta.uid()) {
        return Err(not_trusted(format!(
            "owned by uid {}, not by the daemon (pid {}) it names",
            meta.uid(),
            h.pid
        )));
    }
    let age = now.saturating_since(h.heartbeat);
    if age > staleness(h.interval) {
        return Err(Unusable::Stale { path, age });
    }
    Ok(published)
}

/// How old a heartbeat may be: two intervals and a cycle's own time.
pub fn staleness(interval: Duration) -> Duration {
    interval
        .saturating_mul(2)
        .saturating_add(Duration::from_secs(10))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::clock::{Clock, SystemClock};

    fn header(pid: i32, start: u64, heartbeat: Boottime) -> Header {
        Header {
            pid,
            start_time: start,
            heartbeat,
            interval: Duration::from_secs(5),
        }
    }

    #[test]
    fn round_trip_and_malformed_input() {
        let h = header(42, 777, Boottime::from_nanos(9_000));
        let recs = [
            ((1, 2), Boottime::from_nanos(5)),
            ((1, 3), Boottime::from_nanos(6)),
        ];
        let b = encode(&h, &recs);
        assert_eq!(b.len(), HEADER + 2 * RECORD);
        let p = decode(&b).expect("decodes");
        assert_eq!(p.header, h);
        assert_eq!(p.first_seen.get(&(1, 3)), Some(&Boottime::from_nanos(6)));
        assert!(decode(&b[..b.len() - 1]).is_err(), "a cut record");
        assert!(decode(&b[..10]).is_err(), "a cut header");
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(decode(&bad).is_err(), "bad magic");
        let mut lying = b;
        lying[36] = 9; // count: 9 records, 2 present
        assert!(decode(&lying).is_err());
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cwreap-published-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("mkdir");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).expect("chmod");
        d
    }

    fn me() -> (i32, u64) {
        let pid = i32::try_from(std::process::id()).expect("pid");
        (
            pid,
            ProcFs::default().start_time(pid).expect("own start time"),
        )
    }

    #[test]
    fn a_live_writer_is_trusted_and_anything_else_is_refused() {
        let dir = scratch("trust");
        let proc = ProcFs::default();
        let now = SystemClock.now();
        assert!(matches!(read(&dir, &proc, now), Err(Unusable::Missing(_))));
        let (pid, start) = me();
        write(&dir, &header(pid, start, now), &[((7, 8), now)]).expect("write");
        let p = read(&dir, &proc, now).expect("trusted");
        assert_eq!(p.first_seen.len(), 1);
        // A heartbeat older than two intervals and slack: stale.
        let later = now.checked_add(Duration::from_secs(60)).expect("time");
        assert!(matches!(
            read(&dir, &proc, later),
            Err(Unusable::Stale { .. })
        ));
        // Another start time: the pid names another process now.
        write(&dir, &header(pid, start + 1, now), &[]).expect("write");
        assert!(matches!(
            read(&dir, &proc, now),
            Err(Unusable::DaemonGone { .. })
        ));
        // A file others may change.
        write(&dir, &header(pid, start, now), &[]).expect("write");
        fs::set_permissions(dir.join(FILE), fs::Permissions::from_mode(0o666)).expect("chmod");
        assert!(matches!(
            read(&dir, &proc, now),
            Err(Unusable::NotTrusted(_))
        ));
        // A symlink is never followed.
        fs::remove_file(dir.join(FILE)).expect("rm");
        std::os::unix::fs::symlink("/etc/hostname", dir.join(FILE)).expect("symlink");
        assert!(matches!(
            read(&dir, &proc, now),
            Err(Unusable::NotTrusted(_))
        ));
        fs::remove_file(dir.join(FILE)).expect("rm");
        write(&dir, &header(pid, start, now), &[]).expect("write");
        withdraw(&dir, pid + 1);
        assert!(dir.join(FILE).exists(), "not ours: left alone");
        withdraw(&dir, pid);
        assert!(!dir.join(FILE).exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_where_file_is_trusted_as_the_ages_are_and_never_taken_for_them() {
        let dir = scratch("where");
        let proc = ProcFs::default();
        let now = SystemClock.now();
        assert!(matches!(
            read_where(&dir, &proc, now),
            Err(Unusable::Missing(_))
        ));
        let (pid, start) = me();
        let h = header(pid, start, now);
        write_where(&dir, &h, b"{\"body\": 1}").expect("write");
        let (got, body) = read_where(&dir, &proc, now).expect("trusted");
        assert_eq!(got, h);
        assert_eq!(body, b"{\"body\": 1}");
        // The ages file is another one: each reader takes only its own.
        assert!(matches!(read(&dir, &proc, now), Err(Unusable::Missing(_))));
        fs::copy(dir.join(WHERE_FILE), dir.join(FILE)).expect("copy");
        assert!(matches!(
            read(&dir, &proc, now),
            Err(Unusable::Malformed { .. })
        ));
        let later = now.checked_add(Duration::from_secs(60)).expect("time");
        assert!(matches!(
            read_where(&dir, &proc, later),
            Err(Unusable::Stale { .. })
        ));
        write_where(&dir, &header(pid, start + 1, now), b"{}").expect("write");
        assert!(matches!(
            read_where(&dir, &proc, now),
            Err(Unusable::DaemonGone { .. })
        ));
        withdraw_where(&dir, pid + 1);
        assert!(dir.join(WHERE_FILE).exists(), "not ours: left alone");
        withdraw_where(&dir, pid);
        assert!(!dir.join(WHERE_FILE).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
