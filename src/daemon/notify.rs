//! sd_notify that never blocks. The service manager's socket queue is short
//! (net.unix.max_dgram_qlen, often 10): a blocking send to a socket nobody drains would hang
//! the daemon for good, SIGTERM included. Every message goes out with a non-blocking send;
//! one that cannot be sent at once (a full queue, a socket gone) is dropped, counted
//! (`cwreap_notify_dropped_total`) and reported at most once a minute. NOTIFY_SOCKET may
//! name a path or an abstract socket (`@name`).

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use sd_notify::NotifyState;
use tracing::warn;

const WARN_EVERY: Duration = Duration::from_secs(60);

pub(super) struct Notifier {
    /// The socket and where to send, when NOTIFY_SOCKET names a usable socket.
    to: Option<(UnixDatagram, SocketAddr)>,
    dropped: Counter,
    last_warning: Mutex<Option<Instant>>,
}

impl Notifier {
    /// The sender for NOTIFY_SOCKET, if set (otherwise sending does nothing).
    pub(super) fn from_env(dropped: Counter) -> Notifier {
        let to = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let addr = address(path.as_encoded_bytes());
            let sock = UnixDatagram::unbound().and_then(|s| {
                s.set_nonblocking(true)?;
                Ok(s)
            });
            match (sock, addr) {
                (Ok(sock), Ok(addr)) => Some((sock, addr)),
                (Err(e), _) | (_, Err(e)) => {
                    warn!(error = %e, socket = %path.to_string_lossy(), "NOTIFY_SOCKET unusable; sd_notify messages are dropped");
                    None
                }
            }
        });
        Notifier {
            to,
            dropped,
            last_warning: Mutex::new(None),
        }
    }

    /// Send `states` as one datagram, without waiting. False when it was dropped.
    pub(super) fn send(&self, states: &[NotifyState<'_>]) -> bool {
        let Some((sock, addr)) = &self.to else {
            return true;
        };
        let mut msg = String::new();
        for s in states {
            msg.push_str(&s.to_string());
            msg.push('\n');
        }
        let error = match sock.send_to_addr(msg.as_bytes(), addr) {
            Ok(n) if n == msg.len() => return true,
            Ok(n) => format!("sent {n} of {} bytes", msg.len()),
            Err(e) => e.to_string(),
        };
        self.dropped.inc();
        if let Ok(mut last) = self.last_warning.lock()
            && last.is_none_or(|t| t.elapsed() >= WARN_EVERY)
        {
            *last = Some(Instant::now());
            warn!(error = %error, dropped_total = self.dropped.get(),
                "sd_notify message dropped: the notify socket does not take it now (reported at most once a minute)");
        }
        false
    }
}

/// NOTIFY_SOCKET as an address: `@name` is abstract, anything else a path.
fn address(value: &[u8]) -> std::io::Result<SocketAddr> {
    match value.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(value),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_socket_drops_and_counts_instead_of_blocking() {
        let name = format!("cwreap-notify-test-{}", std::process::id());
        let server = UnixDatagram::bind_addr(
            &SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract name"),
        )
        .expect("bind");
        let dropped = Counter::default();
        let n = Notifier {
            to: Some((
                UnixDatagram::unbound().expect("socket"),
                address(format!("@{name}").as_bytes()).expect("address"),
            )),
            dropped: dropped.clone(),
            last_warning: Mutex::new(None),
        };
        if let Some((s, _)) = &n.to {
            s.set_nonblocking(true).expect("nonblocking");
        }
        // Far more than any queue holds: every send returns at once.
        let sent = (0..1000)
            .filter(|_| n.send(&[NotifyState::Watchdog]))
            .count();
        assert!(sent >= 1, "nothing was sent");
        assert_eq!(sent as u64 + dropped.get(), 1000);
        assert!(
            dropped.get() > 0,
            "a never drained socket took 1000 datagrams"
        );
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).expect("recv");
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
    }
}
