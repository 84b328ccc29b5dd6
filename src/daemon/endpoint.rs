//! The metrics endpoint: a minimal read-only HTTP server (`GET /metrics`, anything else
//! 404/405) on the daemon's runtime, while cycles run on a blocking thread. Every
//! connection has a deadline, so a slow or broken client never stalls a cycle. At most
//! [`MAX_CLIENTS`] are served at once; when all are taken, the oldest connection that has
//! not sent a complete request is evicted to make room (see [`serve`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot};
use tracing::{debug, info, warn};

use crate::daemon::metrics::Metrics;

/// How long a client may take to send its request and read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(5);
const MAX_REQUEST: usize = 8 * 1024;
/// Most clients served at once. Prometheus needs one; the rest is headroom for people.
pub const MAX_CLIENTS: usize = 64;

/// Bind the endpoint (so a bad address fails at start-up, not later).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// How long the accept loop waits for an evicted connection's task to close it and free
/// its slot (that task only has to be scheduled once; this bounds the wait regardless).
const EVICTION_WAIT: Duration = Duration::from_secs(1);

/// Serve until the runtime stops. Each client gets its own task and a deadline; at most
/// [`MAX_CLIENTS`] at once. When all slots are taken, the oldest connection that has not
/// sent a complete request is closed to make room for the new one, so idle connections,
/// however many and however fast they come back, cannot keep a scraper out; and a
/// connection that sent its request is never closed unanswered that way. When every slot
/// is answering, a new connection is closed as soon as it is accepted (leaving it in the
/// listen queue would let the queue, and then the clients' retries, pile up instead).
/// After a flood, freed heap is handed back to the system.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let waiting = Waiting::default();
    // Connections closed unserved, and those of them evicted, since the endpoint was
    // last full (for the log).
    let (mut shed, mut evicted) = (0u64, 0u64);
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if shed == 0 {
                    warn!(
                        max_clients = MAX_CLIENTS,
                        "metrics endpoint: too many clients at once; closing the oldest connections that have sent no request yet (new ones while every slot is answering)"
                    );
                }
                shed += 1;
                let Some(slot) = make_room(&slots, &waiting, &metrics).await else {
                    drop(stream);
                    metrics.count_refused();
                    continue;
                };
                evicted += 1;
                slot
            }
        };
        // The flood is over once a connection leaves room for another.
        if shed > 0 && slots.available_permits() > 0 {
            info!(
                refused = shed,
                evicted, "metrics endpoint: serving again after a flood of connections"
            );
            (shed, evicted) = (0, 0);
        }
        let (id, evict) = waiting.join();
        let metrics = metrics.clone();
        let slots_left = slots.clone();
        let waiting = waiting.clone();
        tokio::spawn(async move {
            if tokio::time::timeout(
                CLIENT_DEADLINE,
                handle(stream, &metrics, &waiting, id, evict),
            )
            .await
            .is_err()
            {
                debug!(%peer, "metrics client timed out");
            }
            waiting.take(id);
            drop(slot);
            // The last client of a flood leaves: what the clients' tasks and buffers used
            // is free again, and glibc keeps freed heap unless asked.
            if slots_left.available_permits() == MAX_CLIENTS && metrics.flood_over() {
                cwreap_linux::sys::release_free_heap();
            }
        });
    }
}

/// Every slot is taken: evict the oldest connection still without a complete request and
/// take its slot once its task has closed it. None when every slot is answering a request
/// (or, against all odds, the slot did not come free within [`EVICTION_WAIT`]).
async fn make_room(
    slots: &Arc<Semaphore>,
    waiting: &Waiting,
    metrics: &Metrics,
) -> Option<OwnedSemaphorePermit> {
    if !waiting.evict_oldest() {
        return None;
    }
    metrics.count_evicted();
    let slot = tokio::time::timeout(EVICTION_WAIT, slots.clone().acquire_owned()).await;
    slot.ok()?.ok()
}

/// The connections that have not sent a complete request yet, oldest first (ids grow
/// with each accept): the ones a newcomer may evict when every slot is taken. Evicting
/// one drops its sender, which tells its task to close it; a connection whose request is
/// complete takes itself out ([`Waiting::take`]) and is never evicted after that.
#[derive(Clone, Default)]
struct Waiting(Arc<Mutex<Queue>>);

#[derive(Default)]
struct Queue {
    next: u64,
    conns: BTreeMap<u64, oneshot::Sender<()>>,
}

impl Waiting {
    /// A new connection: its id, and what resolves when it is evicted.
    fn join(&self) -> (u64, oneshot::Receiver<()>) {
        let (tx, rx) = oneshot::channel();
        let mut q = self.lock();
        let id = q.next;
        q.next += 1;
        q.conns.insert(id, tx);
        (id, rx)
    }

    /// Evict the oldest waiting connection; false when none is waiting.
    fn evict_oldest(&self) -> bool {
        self.lock().conns.pop_first().is_some()
    }

    /// Take connection `id` out (its request is complete, or it is gone): it can no longer
    /// be evicted. False if it was evicted before.
    fn take(&self, id: u64) -> bool {
        self.lock().conns.remove(&id).is_some()
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding it; a poisoned queue is still a consistent one.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The request line of an HTTP request, once its head is complete.
pub fn route(head: &str) -> (&'static str, &'static str) {
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") | ("HEAD", "/metrics") => ("200 OK", "metrics"),
        ("GET", _) | ("HEAD", _) => ("404 Not Found", "not found\n"),
        _ => ("405 Method Not Allowed", "only GET /metrics is served\n"),
    }
}

/// Read the request, unless the connection is evicted first, then answer it.
async fn handle(
    mut stream: TcpStream,
    metrics: &Metrics,
    waiting: &Waiting,
    id: u64,
    evict: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let head = tokio::select! {
        head = read_head(&mut stream) => head?,
        _ = evict => return Ok(()),
    };
    // The client left before a complete request, or it was evicted as the request came.
    let Some(head) = head else { return Ok(()) };
    if !waiting.take(id) {
        return Ok(());
    }
    answer(stream, &head, metrics).await
}

/// The request head, up to its blank line or a little past [`MAX_REQUEST`] bytes; None if
/// the client closed before.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            break;
        }
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

async fn answer(mut stream: TcpStream, head: &str, metrics: &Metrics) -> std::io::Result<()> {
    let (status, kind) = route(head);
    let head_only = head.starts_with("HEAD ");
    let (ctype, body) = if kind == "metrics" {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        )
    } else {
        ("text/plain; charset=utf-8", kind.to_string())
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        resp.push_str(&body);
    }
    stream.write_all(resp.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET /metrics HTTP/1.1\r\n\r\n").0, "200 OK");
        assert_eq!(route("GET /metrics?x=1 HTTP/1.1\r\n\r\n").0, "200 OK");
        assert_eq!(route("GET / HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(route("GET /metricsx HTTP/1.1\r\n\r\n").0, "404 Not Found");
        assert_eq!(
            route("POST /metrics HTTP/1.1\r\n\r\n").0,
            "405 Method Not Allowed"
        );
        assert_eq!(route("").0, "405 Method Not Allowed");
    }

    #[test]
    fn the_oldest_waiting_connection_is_evicted_and_a_complete_request_never_is() {
        let w = Waiting::default();
        let (a, mut evict_a) = w.join();
        let (b, evict_b) = w.join();
        let (c, mut evict_c) = w.join();
        assert!(a < b && b < c);
        // b's request is complete: it is answered, never evicted.
        assert!(w.take(b));
        assert!(w.evict_oldest());
        assert_eq!(
            evict_a.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert_eq!(evict_c.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        assert!(w.evict_oldest());
        assert_eq!(
            evict_c.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        );
        assert!(!w.evict_oldest(), "only b is left, and it is answering");
        drop(evict_b);
        // c completing its request after its eviction is still evicted.
        assert!(!w.take(c));
        assert!(!w.take(a));
    }
}
