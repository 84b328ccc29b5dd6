//! With events, a cycle comes as soon as the kernel queues one (a socket entered or left
//! CLOSE_WAIT), not only at the interval: a new CLOSE_WAIT socket is known, with its owner,
//! a ring-buffer wake-up and one cycle after the peer's FIN, not up to a whole interval
//! later. Cycles brought by events are spaced by at least [`MIN_GAP`] and by twice the last
//! cycle's time, so a storm of state changes keeps the daemon to a third of a CPU at most.
//! An interval of [`EARLY_ABOVE`] or less is short enough: events bring nothing earlier.

use std::time::Duration;

use tokio::time::Instant;

use cwreap_linux::kernel::Linux;
use cwreap_linux::kernel::events::Ready;

/// The least time from the end of one cycle to a cycle brought by events.
pub const MIN_GAP: Duration = Duration::from_millis(100);

/// Intervals up to this are waited out: the next cycle is near anyway.
pub const EARLY_ABOVE: Duration = Duration::from_secs(1);

/// What ends the wait for the next cycle early: events queued.
pub struct Wake {
    ring: Option<Ready>,
    earliest: Instant,
}

impl Wake {
    /// For the wait of `interval` after a cycle that ended `now` and took `took`; nothing
    /// to wait on when `k` polls, when the interval is short, or when the ring buffer
    /// cannot be waited on (then the interval rules).
    pub fn after(k: &Linux, interval: Duration, now: Instant, took: Duration) -> Wake {
        Wake {
            ring: k
                .events()
                .filter(|_| interval > EARLY_ABOVE)
                .and_then(|e| e.ready().ok()),
            earliest: now + MIN_GAP.max(took.saturating_mul(2)),
        }
    }

    /// Resolves once events are queued and the gap has passed; never without events.
    pub async fn events(&self) {
        match &self.ring {
            Some(ring) => {
                ring.queued().await;
                tokio::time::sleep_until(self.earliest).await;
            }
            None => std::future::pending().await,
        }
    }
}
