//! The daemon under load: `cwreap run` in enforce mode against 20000 CLOSE_WAIT and 20000
//! ESTABLISHED loopback connections spread over ten leaky server processes.
//!
//! Size: always the full 20000 + 20000, in CI too, with two CPU-burning processes running
//! beside it the whole time: the machines here have 2 vCPUs, so the daemon gets a share of
//! a busy machine, as in production. Counts and conditions decide; clocks only guard
//! against a hang, as "no progress for a minute", never as a total time.
//!
//! Server ends are held by `cwreap-fixture server` processes (4000 connections each, one
//! 127.77.N.x address each so no destination comes near the ephemeral port range; N is
//! this run's, from its pid, so two runs on one host keep apart in `ss`). Client
//! ends are made here, then handed to `cwreap-fixture hold` processes by inheritance (a
//! process may hold at most 20000 fds here): no thread per connection anywhere. Every
//! client socket has SO_LINGER 0, so teardown resets everything at once.
//!
//! The run: the policy first says `older_than: 1h`, so the daemon tracks every socket
//! without acting (its gauge must count all of them). SIGHUP switches to `older_than: 1ms`:
//! every CLOSE_WAIT socket must be reaped, each with exactly one `reaped` action and no
//! other outcome, and no cycle error. VmRSS after cycle 10 and after cycle 100 must match
//! (the reaps, the release watch, then quiet cycles tracking 40000 socket fds). `ss` before
//! and after: not one ESTABLISHED or LISTEN socket changed, no CLOSE_WAIT is left, and
//! every peer of a reaped socket got its FIN.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cwreap_testkit::*;
use rustix::io::{FdFlags, fcntl_setfd};
use rustix::process::{Pid, Signal};

/// Connections per server process (CLOSE_WAIT and ESTABLISHED together).
const PER_SERVER: usize = 4000;
/// Connections made before waiting for the server to accept them (its backlog is finite).
const CHUNK: usize = 100;

/// CLOSE_WAIT and ESTABLISHED connections.
const CLOSE_WAIT: usize = 20_000;
const ESTABLISHED: usize = 20_000;

/// A child killed on drop (also when the test fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `cwreap-fixture hold` process holding client sockets it inherited; killed on drop.
struct Holder(Child);

impl Holder {
    fn adopt(conns: Vec<TcpStream>) -> Holder {
        for c in &conns {
            fcntl_setfd(c.as_fd(), FdFlags::empty()).expect("clear FD_CLOEXEC");
        }
        let child = Command::new(fixture_bin())
            .arg("hold")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn holder");
        drop(conns); // the holder has its copies
        Holder(child)
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `count` connections to `fx`, in chunks the server accepts before the next.
fn connect(fx: &mut Fixture, count: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let n = CHUNK.min(count - out.len());
        for _ in 0..n {
            let c = TcpStream::connect(fx.listen[0]).expect("connect");
            rustix::net::sockopt::set_socket_linger(&c, Some(Duration::ZERO)).expect("linger");
            out.push(c);
        }
        for _ in 0..n {
            fx.expect_line("accepted ");
        }
    }
    out
}

/// One line of `ss -tanH`: (state, local, peer).
type SsLine = (String, SocketAddr, SocketAddr);

/// This run's network, 127.77.N.0/24: N from our pid, 1 to 250, so a run elsewhere on the
/// host (another checkout's test suite) does not show up in our counts.
fn subnet() -> u32 {
    std::process::id() % 250 + 1
}

/// Every TCP socket touching our 127.77.N.0/24 addresses, but TIME-WAIT entries (the
/// kernel keeps those 60 s after a reaped connection, also from an earlier run).
fn ss_ours() -> BTreeSet<SsLine> {
    let prefix = format!("127.77.{}.", subnet());
    let out = Command::new("ss").args(["-tanH"]).output().expect("run ss");
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            let local: SocketAddr = c.get(3)?.parse().ok()?;
            let peer: SocketAddr = c.get(4)?.parse().unwrap_or(local);
            let ours = |a: &SocketAddr| a.to_string().starts_with(&prefix);
            (c[0] != "TIME-WAIT" && (ours(&local) || ours(&peer)))
                .then(|| (c[0].to_owned(), local, peer))
        })
        .collect()
}

/// How many of our sockets are in each state.
fn states(set: &BTreeSet<SsLine>) -> BTreeMap<&str, usize> {
    let mut by = BTreeMap::new();
    for (state, _, _) in set {
        *by.entry(state.as_str()).or_default() += 1;
    }
    by
}

fn in_state<'a>(set: &'a BTreeSet<SsLine>, state: &str) -> BTreeSet<&'a SsLine> {
    set.iter().filter(|(s, _, _)| s == state).collect()
}

/// The daemon's NOTIFY_SOCKET: counts STATUS= messages (one per cycle).
struct Notify {
    path: PathBuf,
    cycles: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Notify {
    fn bind(path: PathBuf) -> Notify {
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let cycles = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, halt) = (cycles.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !halt.load(Ordering::Relaxed) {
                if let Ok(len) = sock.recv(&mut buf)
                    && String::from_utf8_lossy(&buf[..len]).contains("STATUS=")
                {
                    n.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Notify { path, cycles, stop }
    }

    fn cycles(&self) -> usize {
        self.cycles.load(Ordering::Relaxed)
    }

    /// Until `n` cycles were seen. Fails only if no cycle at all comes for `STALL`.
    fn wait(&self, n: usize, log: impl Fn() -> String) {
        let mut last = (self.cycles(), Instant::now());
        while self.cycles() < n {
            let now = self.cycles();
            if now != last.0 {
                last = (now, Instant::now());
            }
            assert!(
                last.1.elapsed() < STALL,
                "no cycle for {STALL:?}, stuck at {now} of {n}; log:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Notify {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// How long without any progress counts as a hang.
const STALL: Duration = Duration::from_secs(90);

/// The daemon's log, folded for a failure message: every distinct event once with its
/// count, warnings and errors first, then the last lines as they came.
#[derive(Default)]
struct Folded {
    counts: BTreeMap<(bool, String), usize>,
    last: std::collections::VecDeque<String>,
}

impl Folded {
    fn push(&mut self, line: &str) {
        let v: Option<serde_json::Value> = serde_json::from_str(line).ok();
        let level = v.as_ref().and_then(|v| v["level"].as_str()).unwrap_or("?");
        let message = v
            .as_ref()
            .and_then(|v| v["message"].as_str())
            .unwrap_or(line)
            .to_owned();
        let serious = matches!(level, "WARN" | "ERROR");
        *self
            .counts
            .entry((!serious, format!("{level} {message}")))
            .or_default() += 1;
        self.last.push_back(line.to_owned());
        if self.last.len() > 10 {
            self.last.pop_front();
        }
    }

    fn render(&self, max: usize) -> String {
        let mut out: Vec<String> = self
            .counts
            .iter()
            .map(|((_, m), n)| format!("{n:>6} × {m}"))
            .collect();
        out.truncate(max.saturating_sub(self.last.len() + 1));
        out.push("last lines:".to_owned());
        out.extend(self.last.iter().cloned());
        out.join("\n")
    }
}

/// CPU-burning processes (`sh` busy loops), killed on drop.
struct Burners(Vec<Child>);

impl Burners {
    fn start(n: usize) -> Burners {
        Burners(
            (0..n)
                .map(|_| {
                    Command::new("sh")
                        .args(["-c", "while :; do :; done"])
                        .stdin(Stdio::null())
                        .spawn()
                        .expect("start a CPU burner")
                })
                .collect(),
        )
    }
}

impl Drop for Burners {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn policy(pids: &[i32], older_than: &str, metrics: SocketAddr) -> String {
    let mut y = format!(
        "interval: 100ms\ndry_run: false\nlog_format: json\nmetrics: {{listen: \"{metrics}\"}}\n\
limits: {{max_reaps_per_cycle: 1000000, max_reaps_per_minute: 1000000}}\ntargets:\n"
    );
    for (i, pid) in pids.iter().enumerate() {
        y.push_str(&format!(
            "  - name: srv{i}\n    match: {{pid: {pid}}}\n    older_than: {older_than}\n    action: shutdown\n"
        ));
    }
    y
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("daemon status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

fn scrape(addr: SocketAddr) -> String {
    use std::io::Write;
    let mut s = TcpStream::connect(addr).expect("metrics endpoint");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("metrics");
    text
}

/// Sum of every sample of `name` whose labels contain `needle`.
fn sum(text: &str, name: &str, needle: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn daemon_reaps_every_close_wait_under_load_and_its_memory_stays_flat() {
    let _alone = crate::alone();
    let started = Instant::now();
    // A busy 2-core machine: two processes burning CPU beside the whole run.
    let _burners = Burners::start(2);
    raise_nofile();
    let (cw, est) = (CLOSE_WAIT, ESTABLISHED);
    let servers = (cw + est).div_ceil(PER_SERVER);
    let (cw_each, est_each) = (cw / servers, est / servers);
    assert_eq!((cw_each * servers, est_each * servers), (cw, est));

    let mut fixtures = Vec::new();
    let mut holders = Vec::new();
    for i in 0..servers {
        let addr = format!("127.77.{}.{}:0", subnet(), i + 1);
        let mut fx = Fixture::start(&[addr.as_str()], &[]);
        let waiting = connect(&mut fx, cw_each);
        for c in &waiting {
            c.shutdown(Shutdown::Write).expect("half-close");
        }
        let mut conns = waiting;
        conns.extend(connect(&mut fx, est_each));
        holders.push(Holder::adopt(conns));
        fixtures.push(fx);
    }
    let pids: Vec<i32> = fixtures.iter().map(Fixture::pid).collect();
    let deadline = Instant::now() + STALL;
    // Settled: every server end in CLOSE_WAIT or ESTABLISHED, every half-closed client end
    // acknowledged (FIN-WAIT-2, not FIN-WAIT-1 any more).
    let settled: BTreeMap<&str, usize> = [
        ("CLOSE-WAIT", cw),
        ("ESTAB", 2 * est),
        ("FIN-WAIT-2", cw),
        ("LISTEN", servers),
    ]
    .into_iter()
    .collect();
    let before = loop {
        let s = ss_ours();
        if states(&s) == settled {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the fixture never settled: {:?}, want {settled:?}",
            states(&s)
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let setup = started.elapsed();

    let dir = std::env::temp_dir().join(format!("cwreap-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let cfg = dir.join("cwreap.yaml");
    let metrics: SocketAddr = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port");
    write_policy(&cfg, &policy(&pids, "1h", metrics));
    let notify = Notify::bind(dir.join("notify"));
    let mut daemon = Killed(
        Command::new(cwreap_bin())
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("NOTIFY_SOCKET", &notify.path)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cwreap run"),
    );
    let dpid = daemon.0.id() as i32;
    // Keep the log drained (one line per action), folded for failures: at most 50 lines.
    let folded = Arc::new(Mutex::new(Folded::default()));
    let actions = Arc::new(AtomicUsize::new(0));
    {
        let (folded, actions) = (folded.clone(), actions.clone());
        let stderr = daemon.0.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("\"close_wait action\"") && line.contains("\"outcome\":\"reaped\"")
                {
                    actions.fetch_add(1, Ordering::Relaxed);
                }
                folded.lock().expect("log lock").push(&line);
            }
        });
    }
    let log = || folded.lock().expect("log lock").render(50);

    // Tracking everything, acting on nothing.
    notify.wait(3, log);
    let text = scrape(metrics);
    assert_eq!(
        sum(&text, "cwreap_close_wait_sockets", "target=\"srv"),
        cw as f64,
        "the daemon sees every CLOSE_WAIT socket:\n{text}"
    );
    assert_eq!(sum(&text, "cwreap_reaped_total", ""), 0.0, "{text}");

    // Enforce: all of them are due now.
    write_policy(&cfg, &policy(&pids, "1ms", metrics));
    rustix::process::kill_process(Pid::from_raw(dpid).expect("pid"), Signal::HUP).expect("HUP");
    let reload_at = notify.cycles();
    let reload_time = started.elapsed();
    let mut progress = (-1.0, Instant::now());
    let reaped = loop {
        let text = scrape(metrics);
        let n = sum(&text, "cwreap_reaped_total", "outcome=\"reaped\"");
        if n >= cw as f64 {
            break text;
        }
        if n != progress.0 {
            progress = (n, Instant::now());
        }
        assert!(
            progress.1.elapsed() < STALL,
            "no reap for {STALL:?}, stuck at {n} of {cw}; log:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let reap_done = notify.cycles();
    let reap_time = started.elapsed() - reload_time;
    assert_eq!(
        sum(&reaped, "cwreap_reaped_total", ""),
        cw as f64,
        "every action a reap, none gone/changed/error:\n{reaped}\nlog:\n{}",
        log()
    );
    // Memory across cycles 10..100: the reaps, their release watch (one interval, at
    // least 1 s, so until about cycle 20) and 80 quiet cycles tracking 2 × N socket fds.
    notify.wait(10, log);
    let rss10 = rss_kib(dpid);
    notify.wait(100, log);
    let rss100 = rss_kib(dpid);
    let text = scrape(metrics);
    assert!(
        !text.contains("cwreap_cycle_errors_total{"),
        "cycle errors under load:\n{text}"
    );
    assert_eq!(sum(&text, "cwreap_close_wait_sockets", ""), 0.0, "{text}");
    assert_eq!(
        sum(&text, "cwreap_fd_released_total", "result=\"still_held\""),
        cw as f64,
        "the release watch saw every reaped fd (the fixtures ignore EPOLLHUP):\n{text}"
    );
    let after = ss_ours();
    drop(daemon);

    println!(
        "load: {cw} CLOSE_WAIT + {est} ESTABLISHED over {servers} servers; setup {:.1}s; \
SIGHUP (older_than 1h -> 1ms) after cycle {reload_at} at {:.1}s; all {cw} reaped by cycle \
{reap_done}, {:.1}s later; {} reaped action events logged; VmRSS after cycle 10: {rss10} KiB, \
after cycle 100: {rss100} KiB; total {:.1}s",
        setup.as_secs_f64(),
        reload_time.as_secs_f64(),
        reap_time.as_secs_f64(),
        actions.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
    );
    assert!(in_state(&after, "CLOSE-WAIT").is_empty(), "CLOSE_WAIT left");
    assert_eq!(
        in_state(&after, "ESTAB"),
        in_state(&before, "ESTAB"),
        "an ESTABLISHED socket changed"
    );
    assert_eq!(
        in_state(&after, "LISTEN"),
        in_state(&before, "LISTEN"),
        "a listener changed"
    );
    // Every peer of a CLOSE_WAIT socket got the FIN: none is left waiting in FIN-WAIT-2.
    assert!(
        in_state(&after, "FIN-WAIT-2").is_empty(),
        "{} peers never got a FIN",
        in_state(&after, "FIN-WAIT-2").len()
    );
    assert_eq!(
        actions.load(Ordering::Relaxed),
        cw,
        "one action event per socket"
    );
    assert!(
        rss100 <= rss10 + rss10 / 20 + 1024,
        "VmRSS grew from {rss10} KiB (cycle 10) to {rss100} KiB (cycle 100)"
    );

    drop(holders); // resets every connection (SO_LINGER 0)
    drop(fixtures);
    let _ = std::fs::remove_dir_all(&dir);
}
