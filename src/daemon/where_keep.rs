//! `where: on`: the programs of `explain --where` stay attached while the daemon runs,
//! recording the targets' processes only, and what they record is kept per socket and
//! published for the command line (the file `where` in the run directory, beside `ages`),
//! so `explain --where` names the code of a leak whose EOF came long before it ran.
//!
//! The programs keep what they record per socket in the kernel (forgotten there as the
//! socket is freed) and send each stack once. A thread of its own reads the stacks as they
//! come, tells the programs which stacks they may name by hash alone, follows the targets
//! each cycle gives it, and rewrites the file from what the programs keep at most once a
//! second while they record, and every few seconds anyway (a heartbeat: readers trust only
//! a fresh file of a live daemon); never more often than twenty times the time reading
//! the kernel's records takes. A clean stop withdraws the file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use cwreap_linux::bpf::{Unavailable, WhereOptions, WhereProbe};
use cwreap_linux::kernel::{Clock, SystemClock};
use cwreap_linux::published::{self, Header};

use crate::shared::where_capture::{self, Recorded, Trust};

/// The ring buffer: read every 200 ms at the latest, and it carries only stacks not sent
/// before, so a quarter of what a command's window uses is plenty (it is resident memory
/// of the daemon).
const RING_BYTES: u32 = 1 << 22;
/// At most this often while the programs record.
const PUBLISH_EVERY: Duration = Duration::from_secs(1);
/// At least this often: the heartbeat readers check against (with the staleness margin).
const BEAT_EVERY: Duration = Duration::from_secs(5);

/// The recording thread, and the targets it follows.
pub struct WhereKeep {
    follow: Arc<Mutex<Vec<u32>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    dir: PathBuf,
    pid: i32,
}

impl WhereKeep {
    /// Load the programs (recording nobody until [`Self::follow`]) and start the thread
    /// that keeps and publishes what they record in `dir`.
    pub fn start(dir: PathBuf, pid: i32, start_time: u64) -> Result<WhereKeep, Unavailable> {
        let probe = WhereProbe::load(&WhereOptions {
            follow: true,
            ring_bytes: RING_BYTES,
            ..WhereOptions::default()
        })?;
        let mut keep = WhereKeep {
            follow: Arc::default(),
            stop: Arc::default(),
            thread: None,
            dir: dir.clone(),
            pid,
        };
        let header = Header {
            pid,
            start_time,
            heartbeat: Default::default(),
            interval: BEAT_EVERY,
        };
        let (follow, stop) = (keep.follow.clone(), keep.stop.clone());
        let spawned = std::thread::Builder::new()
            .name("cwreap-where".into())
            .spawn(move || run(probe, dir, header, &follow, &stop));
        match spawned {
            Ok(t) => keep.thread = Some(t),
            Err(e) => {
                return Err(Unavailable::Other {
                    context: "start the recording thread".into(),
                    error: e.to_string(),
                });
            }
        }
        Ok(keep)
    }

    /// Record exactly these processes (the targets of the last cycle) from now on.
    pub fn follow(&self, pids: &[i32]) {
        let pids: Vec<u32> = pids.iter().filter_map(|p| u32::try_from(*p).ok()).collect();
        if let Ok(mut f) = self.follow.lock() {
            *f = pids;
        }
    }

    /// Stop recording and withdraw the file (a clean stop). The thread gets half a second
    /// to finish a write in progress; the process does not wait for it longer.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(t) = self.thread.take().filter(|t| t.is_finished()) {
            let _ = t.join();
        }
        published::withdraw_where(&self.dir, self.pid);
    }
}

/// The thread: read, keep, follow, publish, until `stop`.
fn run(
    mut probe: WhereProbe,
    dir: PathBuf,
    mut header: Header,
    follow: &Mutex<Vec<u32>>,
    stop: &AtomicBool,
) {
    let clock = SystemClock;
    let mut rec = Recorded::default();
    let mut trust = Trust::default();
    let mut buf = Vec::new();
    let mut following: Vec<u32> = Vec::new();
    let mut recorded = None;
    let mut published_at: Option<Instant> = None;
    let mut gap = PUBLISH_EVERY;
    let mut failing = false;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = probe.wait(Duration::from_millis(200)) {
            warn!(error = %e, "where: waiting on the ring buffer failed; recording stops");
            break;
        }
        let mut want = follow.lock().map(|f| f.clone()).unwrap_or_default();
        want.sort_unstable();
        if want != following {
            match probe.follow(&want) {
                Ok(()) => {
                    info!(pids = ?want, "where: recording the stacks of these processes");
                    following = want;
                }
                Err(e) => warn!(error = %e, "where: cannot change the processes recorded"),
            }
        }
        rec.take(&mut probe, &mut trust, &mut buf);
        let counts = probe.counts().unwrap_or_default();
        // Each EOF read, connect and accept kept counts as one or the other.
        let changed = recorded != Some((counts.full, counts.short));
        let now = Instant::now();
        let since = published_at.map(|t| now.duration_since(t));
        let read_now = since.is_none_or(|s| changed && s >= gap);
        // The heartbeat is never late: a beat alone republishes what was read last.
        if !read_now && since.is_some_and(|s| s < BEAT_EVERY) {
            continue;
        }
        if read_now {
            let read = Instant::now();
            rec.refresh(&mut probe, |tgid| following.binary_search(&tgid).is_ok());
            gap = where_capture::read_gap(PUBLISH_EVERY, read.elapsed());
            recorded = Some((counts.full, counts.short));
        }
        header.heartbeat = clock.now();
        match published::write_where(&dir, &header, &rec.to_bytes(&counts)) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                warn!(dir = %dir.display(), error = %e,
                    "where: cannot publish the stacks for explain --where");
            }
            Err(_) => {}
        }
        published_at = Some(now);
    }
}
