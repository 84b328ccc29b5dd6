//! Publishing the daemon's first sight of each CLOSE_WAIT socket for the command line (see
//! `cwreap_linux::published`): rewritten after each cycle, withdrawn at a clean stop. A
//! failure is logged once until publishing works again; the cycle never waits on it.

use std::path::PathBuf;
use std::time::Duration;

use tracing::warn;

use cwreap_linux::kernel::{Boottime, SocketKey};
use cwreap_linux::published::{self, Header};

pub struct Publisher {
    dir: PathBuf,
    header: Header,
    /// A failure was logged; the next is not, until one succeeds.
    failing: bool,
}

impl Publisher {
    pub fn new(dir: PathBuf, pid: i32, start_time: u64) -> Publisher {
        Publisher {
            dir,
            header: Header {
                pid,
                start_time,
                heartbeat: Boottime::default(),
                interval: Duration::ZERO,
            },
            failing: false,
        }
    }

    pub fn publish(
        &mut self,
        now: Boottime,
        interval: Duration,
        first_sights: &[(SocketKey, Boottime)],
    ) {
        self.header.heartbeat = now;
        self.header.interval = interval;
        match published::write(&self.dir, &self.header, first_sights) {
            Ok(()) => self.failing = false,
            Err(e) if !self.failing => {
                self.failing = true;
                warn!(dir = %self.dir.display(), error = %e,
                    "cannot publish first sights for the command line; `cwreap scan` will age sockets by tcp_info only");
            }
            Err(_) => {}
        }
    }

    pub fn withdraw(&self) {
        published::withdraw(&self.dir, self.header.pid);
    }
}
