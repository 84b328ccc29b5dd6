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
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cwreap_testkit::metrics::{self, sum};
use cwreap_testkit::ss::Ss;
use cwreap_testkit::*;
use rustix::io::{FdFlags, fcntl_setfd};
use rustix::process::{Pid, Signal};

/// Connections per server process (CLOSE_WAIT and ESTABLISHED together).
const PER_SERVER: usize = 4000;

/// CLOSE_WAIT and ESTABLISHED connections.
const CLOSE_WAIT: usize = 20_000;
const ESTABLISHED: usize = 20_000;

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
    let ours = |a: &SocketAddr| a.to_string().starts_with(&prefix);
    Ss::new()
        .without_processes()
        .run()
        .into_iter()
        .filter_map(|s| {
            let peer = s.peer.unwrap_or(s.local);
            (s.state != "TIME-WAIT" && (ours(&s.local) || ours(&peer)))
                .then_some((s.state, s.local, peer))
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

/// Until the daemon has said `n` STATUS= messages (one per cycle). Fails only if no cycle
/// at all comes for `STALL`.
fn wait_cycles(notify: &Notify, n: usize, log: impl Fn() -> String) {
    let mut last = (notify.statuses().len(), Instant::now());
    while notify.statuses().len() < n {
        let now = notify.statuses().len();
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

/// How long without any progress counts as a hang.
const STALL: Duration = Duration::from_secs(90);

/// `n` CPU-burning processes (`sh` busy loops), killed on drop.
fn burners(n: usize) -> Vec<Killed> {
    (0..n)
        .map(|_| {
            Killed(
                Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .stdin(Stdio::null())
                    .spawn()
                    .expect("start a CPU burner"),
            )
        })
        .collect()
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

fn scrape(addr: SocketAddr) -> String {
    metrics::scrape(addr).expect("the metrics endpoint answers")
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn daemon_reaps_every_close_wait_under_load_and_its_memory_stays_flat() {
    let _alone = crate::alone();
    let started = Instant::now();
    // A busy 2-core machine: two processes burning CPU beside the whole run.
    let _burners = burners(2);
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
        let waiting = fx.connect_many(cw_each);
        for c in &waiting {
            c.shutdown(Shutdown::Write).expect("half-close");
        }
        let mut conns = waiting;
        conns.extend(fx.connect_many(est_each));
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
    let metrics = metrics::free_addr();
    write_policy(&cfg, &policy(&pids, "1h", metrics));
    let notify = Notify::bind(dir.join("notify"));
    let daemon = Running::spawn(&cfg, &[], &[notify.env()]);
    let dpid = daemon.pid().as_raw_nonzero().get();
    let log = || daemon.log();

    // Tracking everything, acting on nothing.
    wait_cycles(&notify, 3, log);
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
    let reload_at = notify.statuses().len();
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
    let reap_done = notify.statuses().len();
    let reap_time = started.elapsed() - reload_time;
    assert_eq!(
        sum(&reaped, "cwreap_reaped_total", ""),
        cw as f64,
        "every action a reap, none gone/changed/error:\n{reaped}\nlog:\n{}",
        log()
    );
    // Memory across cycles 10..100: the reaps, their release watch (one interval, at
    // least 1 s, so until about cycle 20) and 80 quiet cycles tracking 2 × N socket fds.
    wait_cycles(&notify, 10, log);
    let rss10 = rss_kib(dpid);
    wait_cycles(&notify, 100, log);
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
    let actions = daemon
        .lines()
        .iter()
        .filter(|l| l.contains("\"close_wait action\"") && l.contains("\"outcome\":\"reaped\""))
        .count();
    drop(daemon);

    println!(
        "load: {cw} CLOSE_WAIT + {est} ESTABLISHED over {servers} servers; setup {:.1}s; \
SIGHUP (older_than 1h -> 1ms) after cycle {reload_at} at {:.1}s; all {cw} reaped by cycle \
{reap_done}, {:.1}s later; {} reaped action events logged; VmRSS after cycle 10: {rss10} KiB, \
after cycle 100: {rss100} KiB; total {:.1}s",
        setup.as_secs_f64(),
        reload_time.as_secs_f64(),
        reap_time.as_secs_f64(),
        actions,
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
    assert_eq!(actions, cw, "one action event per socket");
    assert!(
        rss100 <= rss10 + rss10 / 20 + 1024,
        "VmRSS grew from {rss10} KiB (cycle 10) to {rss100} KiB (cycle 100)"
    );

    drop(holders); // resets every connection (SO_LINGER 0)
    drop(fixtures);
    let _ = std::fs::remove_dir_all(&dir);
}
