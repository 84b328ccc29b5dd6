//! Between cycles, with events: what the kernel queued is read as it comes, so each socket
//! that entered CLOSE_WAIT is known with its owner (pid, fd) within milliseconds of the
//! peer's FIN, not up to an interval later. Nothing is decided here: the sockets join the
//! tracked set as part of the next cycle's observation (that cycle is a full one and finds
//! them arrived), and the owner is found by reading only the fd tables whose count moved,
//! or by one pass of the socket iterator when those do not hold it. A socket no target
//! holds is remembered as unowned, as a cycle would.

use std::time::Duration;

use tracing::{debug, warn};

use cwreap_linux::kernel::{Kernel, SocketKey, key_of};

use super::Daemon;
use crate::shared::attribute::Holder;

/// What one look at the queued events found.
#[derive(Debug, Default)]
pub struct Detected {
    /// Sockets that entered CLOSE_WAIT, each with the target fds that hold it (none: no
    /// target holds it, or it waits in an accept queue).
    pub entered: Vec<(SocketKey, Vec<Holder>)>,
    /// Sockets that left CLOSE_WAIT or ended.
    pub left: usize,
    /// For each socket held by a target whose entry the kernel timed: from its entry
    /// into CLOSE_WAIT to the daemon knowing its owner.
    pub latencies: Vec<Duration>,
    /// Reading the events failed (the next cycle takes a full snapshot).
    pub failed: bool,
}

impl<K: Kernel> Daemon<K> {
    /// Read the events queued since the last look (events mode only; nothing otherwise),
    /// and find the owner of each socket that entered CLOSE_WAIT among the targets of the
    /// last cycle.
    pub fn detect(&mut self) -> Detected {
        let mut out = Detected::default();
        if self.kernel.mode() != "events" || self.last_snapshot.is_none() {
            return out;
        }
        self.step();
        let changes = match self.kernel.changes() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "reading the kernel's events failed; the next cycle takes a full snapshot");
                self.kernel.take_failures();
                self.last_snapshot = None;
                out.failed = true;
                return out;
            }
        };
        let now = self.kernel.now();
        let (entered, left) = self.tracker.apply_between(changes, now);
        out.left = left.len();
        self.left_between.extend(left);
        if entered.is_empty() {
            return out;
        }
        let pids: Vec<i32> = self
            .pids
            .iter()
            .copied()
            .filter(|&p| self.cache.indexed(p))
            .collect();
        let found = cwreap_linux::netns::Found {
            close_wait: entered,
            listeners: Vec::new(),
        };
        let (k, unowned) = (&mut self.kernel, &self.unowned);
        // Where the iterator cannot be used, the next cycle reads the tables.
        let listed = self.cache.refresh_listed(k, &pids, &found, unowned, false);
        let now = self.kernel.now();
        for d in found.close_wait {
            let holders = if listed.is_some() && d.inode != 0 {
                self.cache.holders(d.inode).to_vec()
            } else {
                Vec::new()
            };
            let key = key_of(&d);
            if let Some(first) = holders.first() {
                let after = self
                    .kernel
                    .entered_at(key)
                    .map(|at| now.saturating_since(at));
                debug!(
                    pid = first.pid,
                    fd = first.fd,
                    cookie = key.1,
                    inode = d.inode,
                    after_ms = after.map(|a| a.as_millis() as u64),
                    "socket entered CLOSE_WAIT"
                );
                out.latencies.extend(after);
            }
            if listed.is_some() && holders.is_empty() && d.inode != 0 {
                self.unowned.insert(d.inode);
            }
            out.entered.push((key, holders));
        }
        out
    }
}
