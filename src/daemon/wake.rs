//! With events, the wait between cycles also watches the ring buffer: as soon as the kernel
//! queues an event, [`crate::daemon::engine::Daemon::detect`] reads it, so a socket entering
//! CLOSE_WAIT is known with its owner a wake-up after the peer's FIN. Decisions stay with
//! the cycles, at the policy's interval. Looks are spaced by at least [`MIN_GAP`] and by
//! twice the time the last one took: on a busy host, whose connections pass through
//! CLOSE_WAIT by the thousand every second, events are read in batches (at most 200 looks
//! a second, each a few hundred microseconds), and a storm keeps them to a third of a CPU
//! at most. The first event after a quiet spell is read at once.
//!
//! The ring buffer is watched by a thread of the event source ([`ReadyWatch`]), which
//! wakes the daemon's loop through a [`Notify`] and looks again once the loop has read the
//! events.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use cwreap_linux::kernel::Linux;
use cwreap_linux::kernel::events::ReadyWatch;

/// The least time from the start of one look to the next.
pub const MIN_GAP: Duration = Duration::from_millis(5);

/// When the next look may start, after one that started at `started`, took `took` and
/// ended now: [`MIN_GAP`] after its start, and twice its time after its end.
pub fn next_look(started: std::time::Instant, took: Duration) -> std::time::Instant {
    (started + MIN_GAP).max(std::time::Instant::now() + took.saturating_mul(2))
}

/// The ring buffer's readiness, as the daemon's loop waits on it.
pub struct Ring {
    watch: Option<(ReadyWatch, Arc<Notify>)>,
    earliest: Instant,
}

impl Ring {
    /// The ring buffer of `k`'s events; one that never wakes when `k` polls, or its ring
    /// cannot be watched (the interval then rules alone).
    pub fn of(k: &Linux) -> Ring {
        let notify = Arc::new(Notify::new());
        let theirs = notify.clone();
        let watch = k
            .events()
            .and_then(|e| e.watch_ready(move || theirs.notify_one()).ok())
            .map(|w| (w, notify));
        Ring {
            watch,
            earliest: Instant::now(),
        }
    }

    /// Resolves once events are queued and the spacing since the last look has passed;
    /// never without a ring.
    pub async fn queued(&self) {
        match &self.watch {
            Some((_, notify)) => {
                notify.notified().await;
                tokio::time::sleep_until(self.earliest).await;
            }
            None => std::future::pending().await,
        }
    }

    /// A look that started at `started` and took `took` just read the events: watch for
    /// the next ones.
    pub fn looked(&mut self, started: Instant, took: Duration) {
        self.earliest = Instant::from_std(next_look(started.into_std(), took));
        self.rearm();
    }

    /// A cycle read the events (a wake-up its wait consumed may not have been followed by
    /// a look): watch for the next ones.
    pub fn rearm(&self) {
        if let Some((w, _)) = &self.watch {
            w.rearm();
        }
    }
}
