//! Entry times shared with other processes through a BPF filesystem.
//!
//! The daemon pins the live map of entry times (`entered`) and, beside it, a one-element
//! map (`daemon`) holding its pid, its start time (field 22 of /proc/PID/stat, so a reused
//! pid does not pass for it), the id of the `entered` map it pinned, and a heartbeat
//! (CLOCK_BOOTTIME of its last cycle). A pinned map outlives its daemon: after a SIGKILL
//! the programs are gone and the map freezes, so [`PinnedAges::open`] hands out entry
//! times only while that daemon is alive and its heartbeat recent.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{Array, HashMap, IterableMap, Map, MapData, MapError};

use super::clock::boottime_ns;
use super::load::Unavailable;

/// Where the daemon pins by default (systemd mounts a BPF filesystem on /sys/fs/bpf).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/cwreap";

/// File names of the pins inside the directory.
pub(crate) const PIN_ENTERED: &str = "entered";
pub(crate) const PIN_DAEMON: &str = "daemon";

const RECORD_LEN: usize = 24;

/// The daemon's identity and heartbeat (`struct cw_daemon` in linux/bpf/cwreap.bpf.c).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonRecord {
    /// The pinning daemon's pid.
    pub pid: u32,
    /// The kernel's id of the `entered` map that daemon pinned.
    pub entered_map_id: u32,
    /// Its start time, in clock ticks after boot (field 22 of /proc/PID/stat).
    pub start_ticks: u64,
    /// CLOCK_BOOTTIME ns of its last heartbeat.
    pub heartbeat_ns: u64,
}

impl DaemonRecord {
    /// The map value's bytes.
    pub fn to_bytes(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[0..4].copy_from_slice(&self.pid.to_ne_bytes()); // pid
        b[4..8].copy_from_slice(&self.entered_map_id.to_ne_bytes()); // entered_map_id
        b[8..16].copy_from_slice(&self.start_ticks.to_ne_bytes()); // start_ticks
        b[16..24].copy_from_slice(&self.heartbeat_ns.to_ne_bytes()); // heartbeat_ns
        b
    }

    /// Read a map value.
    pub fn from_bytes(b: &[u8; RECORD_LEN]) -> DaemonRecord {
        let u32_at = |at: usize| u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let u64_at = |at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[at..at + 8]);
            u64::from_ne_bytes(w)
        };
        DaemonRecord {
            pid: u32_at(0),
            entered_map_id: u32_at(4),
            start_ticks: u64_at(8),
            heartbeat_ns: u64_at(16),
        }
    }
}

/// What /proc/PID/stat says about a process, the two fields the liveness check needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// Field 22: start time in clock ticks after boot.
    pub start_ticks: u64,
}

/// Parse /proc/PID/stat. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after its last `)`.
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // Fields 4..=21 lie between the state and the start time.
    let start_ticks = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, start_ticks })
}

/// Why the pinned entry times cannot be trusted as exact ages right now.
#[derive(Debug, thiserror::Error)]
pub enum NotExact {
    /// Nothing pinned there (no daemon pinned, or it stopped cleanly and unpinned).
    #[error("no pinned entry times in {}", dir.display())]
    NoPin {
        /// The directory.
        dir: PathBuf,
    },
    /// The daemon that pinned them is gone (exited, a zombie, or its pid now belongs to
    /// another process): the map stopped changing when it died.
    #[error(
        "the daemon that pinned the entry times (pid {pid}) is not running: they stopped updating"
    )]
    DaemonDead {
        /// Its pid.
        pid: u32,
    },
    /// The daemon lives but has not completed a cycle recently.
    #[error("the daemon (pid {pid}) last reported {}s ago, more than the {}s allowed", since.as_secs_f64(), max.as_secs_f64())]
    Stale {
        /// Its pid.
        pid: u32,
        /// Time since its last heartbeat.
        since: Duration,
        /// The staleness the caller allowed.
        max: Duration,
    },
    /// Opening a pin or reading a map was refused (root only, or unprivileged BPF is off).
    #[error("no permission to read {}: {error}", path.display())]
    Permission {
        /// The pin.
        path: PathBuf,
        /// The error.
        error: io::Error,
    },
    /// The pins changed while being read (a daemon restarted): try again.
    #[error("the pins in {} changed while being read", dir.display())]
    Replaced {
        /// The directory.
        dir: PathBuf,
    },
    /// Something else went wrong.
    #[error("{}: {error}", path.display())]
    Other {
        /// The pin.
        path: PathBuf,
        /// The error.
        error: String,
    },
}

/// Decide whether a daemon record vouches for its map now: `stat` is its /proc/PID/stat
/// (None when missing), `now_ns` CLOCK_BOOTTIME.
pub fn judge(
    rec: &DaemonRecord,
    stat: Option<&str>,
    now_ns: u64,
    max_staleness: Duration,
) -> Result<(), NotExact> {
    let dead = NotExact::DaemonDead { pid: rec.pid };
    let stat = stat.and_then(parse_stat).ok_or(dead)?;
    if matches!(stat.state, 'Z' | 'X' | 'x') || stat.start_ticks != rec.start_ticks {
        return Err(NotExact::DaemonDead { pid: rec.pid });
    }
    // A heartbeat from the future (it cannot come from this clock) counts as fresh.
    let since = Duration::from_nanos(now_ns.saturating_sub(rec.heartbeat_ns));
    if since > max_staleness {
        return Err(NotExact::Stale {
            pid: rec.pid,
            since,
            max: max_staleness,
        });
    }
    Ok(())
}

fn read_stat(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// This process's pid and start time.
pub(crate) fn own_identity() -> io::Result<(u32, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat")?;
    let parsed = parse_stat(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/self/stat"))?;
    Ok((std::process::id(), parsed.start_ticks))
}

fn map_err(path: &Path, e: &MapError) -> NotExact {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<io::Error>() {
            match io.raw_os_error() {
                Some(libc::ENOENT) => {
                    return NotExact::NoPin {
                        dir: path.parent().unwrap_or(path).to_owned(),
                    };
                }
                Some(libc::EACCES | libc::EPERM) => {
                    return NotExact::Permission {
                        path: path.to_owned(),
                        error: io::Error::from_raw_os_error(io.raw_os_error().unwrap_or(0)),
                    };
                }
                _ => {}
            }
        }
        cause = c.source();
    }
    NotExact::Other {
        path: path.to_owned(),
        error: super::load::chain(e),
    }
}

fn open_daemon(path: &Path) -> Result<Array<MapData, [u8; RECORD_LEN]>, NotExact> {
    let data = MapData::from_pin(path).map_err(|e| map_err(path, &e))?;
    let map = Map::from_map_data(data).map_err(|e| map_err(path, &e))?;
    Array::try_from(map).map_err(|e| map_err(path, &e))
}

/// Read the record, twice if needed: user space writes it with a plain copy, so a read
/// racing a heartbeat could see half of one. Two equal reads in a row are whole.
fn read_record(
    map: &Array<MapData, [u8; RECORD_LEN]>,
    path: &Path,
) -> Result<DaemonRecord, NotExact> {
    let mut last = map.get(&0, 0).map_err(|e| map_err(path, &e))?;
    for _ in 0..8 {
        let again = map.get(&0, 0).map_err(|e| map_err(path, &e))?;
        if again == last {
            return Ok(DaemonRecord::from_bytes(&again));
        }
        last = again;
    }
    Err(NotExact::Replaced {
        dir: path.parent().unwrap_or(path).to_owned(),
    })
}

fn map_id(data: &MapData) -> Result<u32, MapError> {
    Ok(data.info()?.id())
}

/// The pinned entry times, vouched for by a live daemon with a recent heartbeat. For the
/// CLI: exact ages when the daemon is running, a typed reason otherwise.
///
/// The reader must see the daemon's pid as the daemon does (the same pid namespace, both
/// on the host as a rule) and share its CLOCK_BOOTTIME (no time namespace between them);
/// otherwise it answers [`NotExact::DaemonDead`] or [`NotExact::Stale`], never a wrong
/// age.
pub struct PinnedAges {
    dir: PathBuf,
    daemon: Array<MapData, [u8; RECORD_LEN]>,
    entered: HashMap<MapData, u64, u64>,
    record: DaemonRecord,
}

impl std::fmt::Debug for PinnedAges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedAges")
            .field("dir", &self.dir)
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

impl PinnedAges {
    /// Open the pins in `dir` (e.g. [`DEFAULT_PIN_DIR`]) and check that the daemon that
    /// pinned them is alive and beat within `max_staleness`.
    pub fn open(dir: &Path, max_staleness: Duration) -> Result<PinnedAges, NotExact> {
        // One retry: a daemon restarting between the two opens replaces both pins.
        match Self::open_once(dir, max_staleness) {
            Err(NotExact::Replaced { .. }) => Self::open_once(dir, max_staleness),
            other => other,
        }
    }

    fn open_once(dir: &Path, max_staleness: Duration) -> Result<PinnedAges, NotExact> {
        let daemon_path = dir.join(PIN_DAEMON);
        let entered_path = dir.join(PIN_ENTERED);
        // Asked of the filesystem first: without CAP_BPF, bpf(2) may refuse before it
        // looks at the path, and "nothing pinned" is the more useful answer then.
        match std::fs::symlink_metadata(&daemon_path) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(NotExact::NoPin {
                    dir: dir.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                return Err(NotExact::Permission {
                    path: daemon_path,
                    error: e,
                });
            }
            Err(e) => {
                return Err(NotExact::Other {
                    path: daemon_path,
                    error: e.to_string(),
                });
            }
        }
        let daemon = open_daemon(&daemon_path)?;
        let record = read_record(&daemon, &daemon_path)?;
        let data = MapData::from_pin(&entered_path).map_err(|e| map_err(&entered_path, &e))?;
        let id = map_id(&data).map_err(|e| map_err(&entered_path, &e))?;
        if id != record.entered_map_id {
            return Err(NotExact::Replaced {
                dir: dir.to_owned(),
            });
        }
        let map = Map::from_map_data(data).map_err(|e| map_err(&entered_path, &e))?;
        let entered = HashMap::try_from(map).map_err(|e| map_err(&entered_path, &e))?;
        judge(
            &record,
            read_stat(record.pid).as_deref(),
            boottime_ns(),
            max_staleness,
        )?;
        Ok(PinnedAges {
            dir: dir.to_owned(),
            daemon,
            entered,
            record,
        })
    }

    /// Check again, now, that the daemon is alive and beat within `max_staleness` (e.g.
    /// after a batch of lookups, before presenting them as exact).
    pub fn check(&mut self, max_staleness: Duration) -> Result<(), NotExact> {
        let path = self.dir.join(PIN_DAEMON);
        let rec = read_record(&self.daemon, &path)?;
        if rec.pid != self.record.pid || rec.entered_map_id != self.record.entered_map_id {
            return Err(NotExact::Replaced {
                dir: self.dir.clone(),
            });
        }
        self.record = rec;
        judge(
            &rec,
            read_stat(rec.pid).as_deref(),
            boottime_ns(),
            max_staleness,
        )
    }

    /// The daemon record as last read.
    pub fn daemon(&self) -> DaemonRecord {
        self.record
    }

    /// When the socket with this cookie entered CLOSE_WAIT (CLOCK_BOOTTIME ns), if the
    /// daemon's programs saw it happen. The entry stays until the socket is destroyed, so
    /// it may have left CLOSE_WAIT since: check the state elsewhere.
    pub fn entered(&self, cookie: u64) -> io::Result<Option<u64>> {
        lookup(&self.entered, cookie)
    }

    /// Every (cookie, entry time) pinned now.
    pub fn all(&self) -> io::Result<Vec<(u64, u64)>> {
        self.entered
            .iter()
            .map(|kv| kv.map_err(|e| io::Error::other(super::load::chain(&e))))
            .collect()
    }
}

pub(crate) fn lookup(map: &HashMap<MapData, u64, u64>, cookie: u64) -> io::Result<Option<u64>> {
    match map.get(&cookie, 0) {
        Ok(ts) => Ok(Some(ts)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(io::Error::other(super::load::chain(&e))),
    }
}

/// The daemon's side: its pins and the record it keeps beating.
pub(crate) struct PinOwner {
    dir: PathBuf,
    daemon: Array<MapData, [u8; RECORD_LEN]>,
    daemon_map_id: u32,
    record: DaemonRecord,
}

fn pin_err(context: &str, e: &(dyn std::error::Error + 'static)) -> Unavailable {
    super::load::classify(context, e)
}

impl PinOwner {
    /// Make sure `dir` is on a BPF filesystem (creating the directory when its parent is
    /// one) and that no live daemon owns pins there. Mounts nothing.
    pub(crate) fn prepare(dir: &Path) -> Result<(), Unavailable> {
        let no_bpffs = || Unavailable::NoBpffs {
            path: dir.to_owned(),
        };
        if !dir.exists() {
            let parent = dir.parent().ok_or_else(no_bpffs)?;
            if !super::bpffs::is_bpffs(parent).unwrap_or(false) {
                return Err(no_bpffs());
            }
            match std::fs::create_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(pin_err("create the pin directory", &e)),
            }
        }
        if !super::bpffs::is_bpffs(dir).unwrap_or(false) {
            return Err(no_bpffs());
        }
        let daemon_path = dir.join(PIN_DAEMON);
        if let Ok(map) = open_daemon(&daemon_path)
            && let Ok(rec) = read_record(&map, &daemon_path)
            && rec.pid != std::process::id()
            && judge(&rec, read_stat(rec.pid).as_deref(), 0, Duration::MAX).is_ok()
        {
            return Err(Unavailable::PinBusy {
                path: dir.to_owned(),
                pid: rec.pid,
            });
        }
        Ok(())
    }

    /// Write the record, then pin `entered` and `daemon`, each under a temporary name
    /// renamed over the old pin: a reader sees the old pair or the new one, and the map
    /// id in the record tells them apart.
    pub(crate) fn pin(
        dir: &Path,
        entered: &MapData,
        mut daemon: Array<MapData, [u8; RECORD_LEN]>,
    ) -> Result<PinOwner, Unavailable> {
        let (pid, start_ticks) = own_identity().map_err(|e| pin_err("read /proc/self/stat", &e))?;
        let entered_map_id = map_id(entered).map_err(|e| pin_err("map info", &e))?;
        let daemon_map_id = map_id(daemon.map()).map_err(|e| pin_err("map info", &e))?;
        let record = DaemonRecord {
            pid,
            entered_map_id,
            start_ticks,
            heartbeat_ns: boottime_ns(),
        };
        daemon
            .set(0, record.to_bytes(), 0)
            .map_err(|e| pin_err("write the daemon record", &e))?;
        pin_replacing(entered, dir, PIN_ENTERED)?;
        if let Err(e) = pin_replacing(daemon.map(), dir, PIN_DAEMON) {
            // An `entered` pin with no record of ours beside it would only confuse readers.
            let _ = std::fs::remove_file(dir.join(PIN_ENTERED));
            return Err(e);
        }
        Ok(PinOwner {
            dir: dir.to_owned(),
            daemon,
            daemon_map_id,
            record,
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn beat(&mut self) -> io::Result<()> {
        self.record.heartbeat_ns = boottime_ns();
        self.daemon
            .set(0, self.record.to_bytes(), 0)
            .map_err(|e| io::Error::other(super::load::chain(&e)))
    }
}

fn pin_replacing(map: &MapData, dir: &Path, name: &str) -> Result<(), Unavailable> {
    // No dot: a BPF filesystem refuses names with one (EPERM), keeping them for its own.
    let tmp = dir.join(format!("{name}_new_{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    map.pin(&tmp).map_err(|e| pin_err("pin a map", &e))?;
    std::fs::rename(&tmp, dir.join(name)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        pin_err("rename a pin into place", &e)
    })
}

impl Drop for PinOwner {
    /// Unpin on a clean stop, unless a newer daemon pinned over us: readers then see "no
    /// pin" rather than a frozen map.
    fn drop(&mut self) {
        let daemon_path = self.dir.join(PIN_DAEMON);
        let ours = MapData::from_pin(&daemon_path)
            .ok()
            .and_then(|d| map_id(&d).ok())
            .is_some_and(|id| id == self.daemon_map_id);
        if ours {
            let _ = std::fs::remove_file(&daemon_path);
            let entered_path = self.dir.join(PIN_ENTERED);
            let entered_ours = MapData::from_pin(&entered_path)
                .ok()
                .and_then(|d| map_id(&d).ok())
                .is_some_and(|id| id == self.record.entered_map_id);
            if entered_ours {
                let _ = std::fs::remove_file(&entered_path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (my (odd) daemon) S 1 4242 4242 0 -1 4194560 1133 0 0 0 \
                        12 3 0 0 20 0 4 0 987654 123456789 900 18446744073709551615 \
                        1 1 0 0 0 0 0 4096 17475 0 0 0 17 1 0 0 0 0 0";

    fn record() -> DaemonRecord {
        DaemonRecord {
            pid: 4242,
            entered_map_id: 77,
            start_ticks: 987654,
            heartbeat_ns: 10_000_000_000,
        }
    }

    #[test]
    fn stat_fields_after_the_last_parenthesis() {
        assert_eq!(
            parse_stat(STAT),
            Some(ProcStat {
                state: 'S',
                start_ticks: 987654
            })
        );
        assert_eq!(parse_stat("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn record_round_trips() {
        let r = record();
        let b = r.to_bytes();
        assert_eq!(&b[0..4], &4242u32.to_ne_bytes()); // pid
        assert_eq!(&b[4..8], &77u32.to_ne_bytes()); // entered_map_id
        assert_eq!(&b[8..16], &987654u64.to_ne_bytes()); // start_ticks
        assert_eq!(&b[16..24], &10_000_000_000u64.to_ne_bytes()); // heartbeat_ns
        assert_eq!(DaemonRecord::from_bytes(&b), r);
    }

    #[test]
    fn alive_and_recent_is_exact() {
        let now = 10_000_000_000 + 2_000_000_000;
        assert!(judge(&record(), Some(STAT), now, Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn heartbeat_in_the_future_is_fresh() {
        assert!(judge(&record(), Some(STAT), 1, Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn gone_zombie_or_reused_pid_is_dead() {
        let now = 10_000_000_000;
        let max = Duration::from_secs(5);
        let dead = |r| matches!(r, Err(NotExact::DaemonDead { pid: 4242 }));
        assert!(dead(judge(&record(), None, now, max)));
        assert!(dead(judge(
            &record(),
            Some(&STAT.replace(") S ", ") Z ")),
            now,
            max
        )));
        assert!(dead(judge(
            &record(),
            Some(&STAT.replace("987654", "987655")),
            now,
            max
        )));
        assert!(dead(judge(&record(), Some("nonsense"), now, max)));
    }

    #[test]
    fn old_heartbeat_is_stale() {
        let now = 10_000_000_000 + 6_000_000_000;
        match judge(&record(), Some(STAT), now, Duration::from_secs(5)) {
            Err(NotExact::Stale { pid, since, max }) => {
                assert_eq!(pid, 4242);
                assert_eq!(since, Duration::from_secs(6));
                assert_eq!(max, Duration::from_secs(5));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn own_identity_matches_proc() {
        let (pid, ticks) = own_identity().unwrap();
        assert_eq!(pid, std::process::id());
        assert!(ticks > 0);
    }

    #[test]
    fn missing_pins_are_no_pin() {
        let dir = std::env::temp_dir().join("cwreap-no-such-pin-dir");
        assert!(matches!(
            PinnedAges::open(&dir, Duration::from_secs(1)),
            Err(NotExact::NoPin { .. })
        ));
    }
}
