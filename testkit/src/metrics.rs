//! The daemon's Prometheus endpoint seen from outside: a free port for it, raw HTTP, and
//! samples read from the text it serves.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A loopback address with a port nobody listens on (for `metrics: {listen: ...}`).
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
}

/// One raw HTTP exchange: (status code, body); None if the endpoint does not answer.
pub fn http(addr: SocketAddr, request: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(request.as_bytes()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let code = resp.split_whitespace().nth(1)?.parse().ok()?;
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The text of `GET /metrics`; None unless it answers 200.
pub fn scrape(addr: SocketAddr) -> Option<String> {
    match http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")? {
        (200, body) => Some(body),
        _ => None,
    }
}

/// The value of the sample `series` (name and labels exactly as served).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of every sample of the family `name` whose line contains `needle` (all of them
/// for `""`); an unlabelled sample counts too.
pub fn sum(text: &str, name: &str, needle: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
