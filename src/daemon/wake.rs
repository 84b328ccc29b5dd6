//! With events, the wait between cycles also watches the ring buffer: as soon as the kernel
//! queues an event, [`crate::daemon::engine::Daemon::detect`] reads it, so a socket entering
//! CLOSE_WAIT is known with its owner a wake-up after the peer's FIN. Decisions stay with
//! the cycles, at the policy's interval. Looks are spaced by twice the time the last one
//! took, so a storm of state changes keeps them to a third of a CPU at most.

use std::time::Duration;

use tokio::time::Instant;

use cwreap_linux::kernel::Linux;
use cwreap_linux::kernel::events::Ready;

/// The ring buffer's readiness, registered with the running reactor.
pub struct Ring {
    fd: Option<Ready>,
    earliest: Instant,
}

impl Ring {
    /// The ring buffer of `k`'s events; one that never wakes when `k` polls, or its ring
    /// cannot be watched (the interval then rules alone). Call within the runtime.
    pub fn of(k: &Linux) -> Ring {
        let fd = k.events().and_then(|e| e.ready().ok());
        Ring {
            fd,
            earliest: Instant::now(),
        }
    }

    /// Resolves once events are queued and the spacing since the last look has passed;
    /// never without a ring.
    pub async fn queued(&self) {
        match &self.fd {
            Some(fd) => {
                fd.queued().await;
                tokio::time::sleep_until(self.earliest).await;
            }
            None => std::future::pending().await,
        }
    }

    /// A look that took `took` just ended.
    pub fn looked(&mut self, took: Duration) {
        self.earliest = Instant::now() + took.saturating_mul(2);
    }
}
