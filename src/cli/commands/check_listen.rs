//! `check`: whether `run` could bind `metrics.listen`. The address must be free (or held
//! by a running cwreap's metrics endpoint: the daemon being checked against, which keeps
//! its listener across a reload), and a privileged port needs CAP_NET_BIND_SERVICE, which
//! the shipped unit does not grant.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use cwreap_linux::sys::{self, Capability};

/// How long the endpoint found at the address gets to say it is cwreap's.
const PROBE: Duration = Duration::from_secs(2);

/// Why `run` could not listen on `addr`; None when it could.
pub fn problem(addr: SocketAddr) -> Option<String> {
    let start = sys::unprivileged_port_start();
    if addr.port() != 0 && addr.port() < start && !daemon_may_bind_privileged() {
        return Some(format!(
            "metrics.listen {addr}: port {} is privileged (below net.ipv4.ip_unprivileged_port_start = {start}) and the daemon runs without CAP_NET_BIND_SERVICE (the shipped unit runs it as a transient user without it), so `cwreap run` cannot bind it; pick a port of {start} or more",
            addr.port()
        ));
    }
    match TcpListener::bind(addr) {
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            if is_cwreap(addr) {
                None
            } else {
                Some(format!(
                    "metrics.listen {addr}: the address is in use by another program (not a running cwreap), so `cwreap run` cannot bind it; find it with `ss -ltnp 'sport = :{}'`, or pick a free address, or set `metrics: {{listen: off}}`",
                    addr.port()
                ))
            }
        }
        Err(e) => Some(format!(
            "metrics.listen {addr}: `cwreap run` could not listen there ({e}); pick another address or set `metrics: {{listen: off}}`"
        )),
    }
}

/// The daemon's own right to bind a privileged port. As root, `check` speaks for the
/// shipped unit (a transient user without CAP_NET_BIND_SERVICE); as another user, for a
/// daemon run by that user, with the capabilities `check` has.
fn daemon_may_bind_privileged() -> bool {
    sys::euid() != 0 && Capability::NetBindService.held()
}

/// Whether what listens at `addr` answers `GET /metrics` as cwreap does.
fn is_cwreap(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, PROBE) else {
        return false;
    };
    if s.set_read_timeout(Some(PROBE)).is_err() || s.set_write_timeout(Some(PROBE)).is_err() {
        return false;
    }
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: cwreap\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = Vec::new();
    let _ = s.take(4 * 1024 * 1024).read_to_end(&mut body);
    String::from_utf8_lossy(&body).contains("\ncwreap_build_info{")
}
