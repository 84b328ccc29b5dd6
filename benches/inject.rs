//! `cargo bench --bench inject`: how long `cwreap_linux::inject::close_in_target` stops a real
//! leaky server, for batches of 1, 100 and 1000 CLOSE_WAIT fds.
//!
//! Each repetition starts a fresh multi-threaded `cwreap-fixture server --threaded` (main
//! thread in nanosleep, a thread in accept, one reading stdin, and one per open
//! connection), gives it 8 open connections and half-closed ones, and closes N of those
//! inside it, in two layouts:
//!
//! * `run`: the N victims hold consecutive fd numbers (how leaks usually look), so they go
//!   in one injected close_range;
//! * `scattered`: 2N half-closed connections and every other one is a victim, so no two
//!   are adjacent and each needs its own injected close.
//!
//! The pause is the library's own measure, taken in the injection helper: first
//! PTRACE_INTERRUPT to last detach. Prints the median, minimum and maximum; the target is a
//! median under 5 ms for 100 fds (a miss prints MISS). The last column is the median of
//! the whole call as cwreap sees it, including starting the helper process (`cwreap
//! inject-helper`), which the target does not feel. Exits 1 if an injection fails or does
//! not close exactly its N. Needs root (ptrace and pidfd_getfd on another process).
//!
//! `cargo bench --bench inject -- --reps R --sizes 1,100,1000`

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::Command;
use std::time::{Duration, Instant};

use cwreap_linux::inject::{Victim, close_in_target};
use cwreap_linux::procfs::parse_socket_link;
use cwreap_linux::sys;
use cwreap_testkit::{LineChild, fixture_bin};

const OPEN_CONNECTIONS: usize = 8;
const TARGET_SIZE: usize = 100;
const TARGET_US: u64 = 5_000;
const CLOSE_WAIT: u8 = 8;

/// A fresh `cwreap-fixture server --threaded` and its address.
fn start_server() -> Result<(LineChild, SocketAddr), String> {
    let mut cmd = Command::new(fixture_bin());
    cmd.args(["server", "--listen", "127.0.0.1:0", "--threaded"]);
    let mut server =
        LineChild::spawn("the fixture", &mut cmd).map_err(|e| format!("start {cmd:?}: {e}"))?;
    let wait = Duration::from_secs(10);
    let addr = server.expect("listen ", wait)?;
    let addr = addr
        .parse()
        .map_err(|e| format!("the fixture's listen address {addr:?}: {e}"))?;
    server.expect("ready", wait)?;
    Ok((server, addr))
}

/// Every socket fd of `pid` in CLOSE_WAIT, identified as attribution would.
fn close_wait_victims(pid: i32) -> Result<Vec<Victim>, String> {
    let pidfd = sys::pidfd_open(pid).map_err(|e| format!("pidfd_open: {e}"))?;
    let dir = std::fs::read_dir(format!("/proc/{pid}/fd")).map_err(|e| e.to_string())?;
    let mut victims = Vec::new();
    for entry in dir.filter_map(Result::ok) {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(inode) = std::fs::read_link(entry.path())
            .ok()
            .and_then(|l| parse_socket_link(&l.to_string_lossy()))
        else {
            continue;
        };
        let Ok(dup) = sys::pidfd_getfd(pidfd.as_fd(), fd) else {
            continue;
        };
        if sys::tcp_state(dup.as_fd()).ok() != Some(CLOSE_WAIT) {
            continue;
        }
        let cookie = sys::socket_cookie(dup.as_fd()).map_err(|e| e.to_string())?;
        victims.push(Victim { fd, inode, cookie });
    }
    victims.sort_by_key(|v| v.fd);
    Ok(victims)
}

/// One measurement: a fresh server, `n` victims in the given layout; returns the pause in
/// µs, the number of threads stopped, and the whole call in µs.
fn measure(n: usize, scattered: bool) -> Result<(u64, usize, u64), String> {
    let half_closed = if scattered { 2 * n } else { n };
    let (server, addr) = start_server()?;
    let pid = server.pid();
    let mut clients = Vec::with_capacity(half_closed + OPEN_CONNECTIONS);
    for _ in 0..OPEN_CONNECTIONS {
        clients.push(TcpStream::connect(addr).map_err(|e| e.to_string())?);
    }
    for _ in 0..half_closed {
        let c = TcpStream::connect(addr).map_err(|e| e.to_string())?;
        c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        clients.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let victims: Vec<Victim> = loop {
        let v = close_wait_victims(pid)?;
        if v.len() == half_closed {
            break if scattered {
                v.into_iter().step_by(2).collect()
            } else {
                v
            };
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {half_closed} sockets reached CLOSE_WAIT",
                v.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pidfd = sys::pidfd_open(pid).map_err(|e| e.to_string())?;
    let helper = cwreap_testkit::pause::helper();
    let t0 = Instant::now();
    let report =
        close_in_target(&helper, pid, pidfd.as_fd(), &victims).map_err(|e| e.to_string())?;
    let call_us = u64::try_from(t0.elapsed().as_micros()).unwrap_or(u64::MAX);
    if report.closed.len() != n || !report.skipped.is_empty() {
        return Err(format!(
            "closed {} of {n}; skipped {:?}",
            report.closed.len(),
            report.skipped.iter().take(3).collect::<Vec<_>>()
        ));
    }
    if report.fds_before - report.fds_after != n {
        return Err(format!(
            "fd count went from {} to {}, not down by {n}",
            report.fds_before, report.fds_after
        ));
    }
    Ok((report.pause_us, report.threads, call_us))
}

fn parse_args() -> Result<(usize, Vec<usize>), String> {
    let mut reps = 7;
    let mut sizes = vec![1, 100, 1000];
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => {
                reps = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&r| r > 0)
                    .ok_or("--reps needs a positive number")?;
            }
            "--sizes" => {
                sizes = it
                    .next()
                    .ok_or("--sizes needs a list like 1,100,1000")?
                    .split(',')
                    .map(|s| s.parse().map_err(|_| format!("bad size {s}")))
                    .collect::<Result<_, _>>()?;
            }
            // cargo bench passes --bench to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok((reps, sizes))
}

fn main() {
    let (reps, sizes) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "inject bench: {e}\nusage: cargo bench --bench inject -- [--reps R] [--sizes 1,100,1000]"
            );
            std::process::exit(2);
        }
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!("inject bench: needs root (ptrace and pidfd_getfd on another process)");
        std::process::exit(2);
    }
    println!("close_in_target on `cwreap-fixture server --threaded` ({reps} repetitions)");
    println!(
        "{:>6}  {:>9}  {:>8}  {:>10}  {:>8}  {:>8}  {:>7}  {:>8}",
        "fds", "layout", "threads", "median µs", "min µs", "max µs", "µs/fd", "call µs"
    );
    let mut failed = false;
    let cases = sizes
        .iter()
        .flat_map(|&n| [(n, false), (n, true)])
        .filter(|&(n, scattered)| n > 1 || !scattered);
    for (n, scattered) in cases {
        let layout = if scattered { "scattered" } else { "run" };
        let mut pauses = Vec::with_capacity(reps);
        let mut calls = Vec::with_capacity(reps);
        let mut threads = 0;
        for _ in 0..reps {
            match measure(n, scattered) {
                Ok((us, t, call)) => {
                    pauses.push(us);
                    calls.push(call);
                    threads = t;
                }
                Err(e) => {
                    eprintln!("inject bench: {n} fds ({layout}): {e}");
                    failed = true;
                }
            }
        }
        if pauses.is_empty() {
            continue;
        }
        pauses.sort_unstable();
        calls.sort_unstable();
        let median = pauses[pauses.len() / 2];
        let call_median = calls[calls.len() / 2];
        let verdict = match n {
            TARGET_SIZE if median < TARGET_US => "  ok (target < 5 ms)",
            TARGET_SIZE => "  MISS (target < 5 ms)",
            _ => "",
        };
        println!(
            "{n:>6}  {layout:>9}  {threads:>8}  {median:>10}  {:>8}  {:>8}  {:>7.1}  {call_median:>8}{verdict}",
            pauses[0],
            pauses[pauses.len() - 1],
            median as f64 / n.max(1) as f64
        );
    }
    if failed {
        std::process::exit(1);
    }
}
