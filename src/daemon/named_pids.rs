//! A pid the policy names (`match: {pid: N}`) means the process that had it when the daemon
//! first saw it. Pids are reused: once that process is gone and the pid names a later one
//! (another start time), the later one is no target of that criterion, until a reload
//! names the pid again. A pid file is read every cycle instead, and follows its service.

use std::collections::{HashMap, HashSet};

use cwreap_linux::kernel::ProcRead;
use tracing::warn;

use crate::daemon::cycle::Targets;
use crate::shared::config::Config;

/// The start time each named pid had when first matched.
#[derive(Default)]
pub struct NamedPids {
    starts: HashMap<i32, u64>,
    /// (pid, start time) of later processes already said to be left alone.
    said: HashSet<(i32, u64)>,
}

impl NamedPids {
    /// Forget the processes seen: the policy was read again.
    pub fn clear(&mut self) {
        self.starts.clear();
        self.said.clear();
    }

    /// Take out of `targets` each target that names a pid by number, where that pid now
    /// names a later process than the one it first named.
    pub fn keep(&mut self, cfg: &Config, proc: &impl ProcRead, targets: &mut Targets) {
        for (&pid, matched) in targets.iter_mut() {
            let by_pid = |i: &usize| cfg.targets[*i].selector.pids.contains(&pid);
            if !matched.iter().any(by_pid) {
                continue;
            }
            // Gone since it was listed: nothing is done with it this cycle anyway.
            let Ok(start) = proc.start_time(pid) else {
                continue;
            };
            if *self.starts.entry(pid).or_insert(start) == start {
                continue;
            }
            matched.retain(|i| !by_pid(i));
            if self.said.insert((pid, start)) {
                warn!(
                    pid,
                    "the process the policy names by this pid exited, and the pid now names another process: it is not a target by that pid (reload the policy to name it)"
                );
            }
        }
        targets.retain(|_, matched| !matched.is_empty());
    }
}
