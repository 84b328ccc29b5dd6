//! The daemon's Prometheus endpoint against a real leaky server: scrape over loopback,
//! parse with a Prometheus text parser, and compare with what happened.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::metrics::{free_addr, http};
use crate::support::*;

fn free_port() -> u16 {
    free_addr().port()
}

fn scrape(addr: SocketAddr) -> Option<prometheus_parse::Scrape> {
    let (code, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    assert_eq!(code, 200);
    let lines = body.lines().map(|l| Ok(l.to_string()));
    Some(prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text"))
}

fn value(s: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| {
            x.metric == name
                && labels
                    .iter()
                    .all(|(k, v)| x.labels.get(k).is_some_and(|l| l == *v))
        })
        .and_then(|x| match x.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// Scrape until `pred` holds or `wait` passes; returns the last scrape.
fn scrape_until(
    addr: SocketAddr,
    wait: Duration,
    pred: impl Fn(&prometheus_parse::Scrape) -> bool,
) -> prometheus_parse::Scrape {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(s) = scrape(addr)
            && (pred(&s) || Instant::now() > deadline)
        {
            return s;
        }
        assert!(Instant::now() < deadline, "metrics endpoint never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn metrics_match_what_happened() {
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let mut clients = [fx.close_wait(0), fx.close_wait(0), fx.close_wait(0)];
    let _established = fx.connect(0);
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let _d = LoggedDaemon::start(
        "values",
        &format!(
            "interval: 300ms\ndry_run: false\nstill_held_after: 1s\nmetrics: {{listen: \"{addr}\"}}\ntargets:\n  - name: leaky\n    match: {{pid: {}}}\n    older_than: 1s\n    action: shutdown\n",
            fx.pid()
        ),
    );
    // Before the threshold: 3 held, none reaped.
    let s = scrape_until(addr, Duration::from_secs(10), |s| {
        value(s, "cwreap_close_wait_sockets", &[("target", "leaky")]) == Some(3.0)
    });
    assert_eq!(
        value(&s, "cwreap_close_wait_sockets", &[("target", "leaky")]),
        Some(3.0)
    );
    let open = value(&s, "cwreap_process_open_fds", &[("target", "leaky")]).expect("open fds");
    let limit = value(&s, "cwreap_process_fd_limit", &[("target", "leaky")]).expect("fd limit");
    let proc_open = fd_count(fx.pid()) as f64;
    assert!(
        (open - proc_open).abs() <= 2.0,
        "open fds {open} vs /proc {proc_open}"
    );
    assert!(limit >= open && limit > 0.0);
    assert!(value(&s, "cwreap_build_info", &[]).is_some());

    // After: all three reaped, and the fixture (which ignores HUP) still holds the fds.
    let s = scrape_until(addr, Duration::from_secs(15), |s| {
        value(
            s,
            "cwreap_fd_released_total",
            &[("target", "leaky"), ("result", "still_held")],
        ) == Some(3.0)
    });
    assert_eq!(
        value(
            &s,
            "cwreap_reaped_total",
            &[
                ("target", "leaky"),
                ("action", "shutdown"),
                ("outcome", "reaped")
            ]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(
            &s,
            "cwreap_fd_released_total",
            &[("target", "leaky"), ("result", "still_held")]
        ),
        Some(3.0)
    );
    assert_eq!(
        value(&s, "cwreap_close_wait_sockets", &[("target", "leaky")]),
        Some(0.0)
    );
    for (c, _) in clients.iter_mut() {
        assert!(reads_eof(c, Duration::from_secs(5)));
    }
    let cycles = value(&s, "cwreap_cycle_duration_seconds_count", &[]).expect("histogram count");
    assert!(cycles >= 2.0);
    let last = value(&s, "cwreap_last_cycle_timestamp_seconds", &[]).expect("last cycle");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!((now - last).abs() < 5.0, "last cycle {last} vs now {now}");
}

#[test]
fn only_get_metrics_is_served_and_slow_clients_do_not_stall_cycles() {
    let fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let _d = LoggedDaemon::start(
        "http",
        &format!(
            "interval: 200ms\nmetrics: {{listen: \"{addr}\"}}\ntargets:\n  - name: t\n    match: {{pid: {}}}\n    older_than: 1h\n",
            fx.pid()
        ),
    );
    let first = scrape_until(addr, Duration::from_secs(10), |_| true);
    let c0 = value(&first, "cwreap_cycle_duration_seconds_count", &[]).unwrap_or(0.0);

    for path in ["/", "/favicon.ico", "/metrics/extra", "/debug"] {
        let (code, _) = http(addr, &format!("GET {path} HTTP/1.1\r\n\r\n")).expect("answer");
        assert_eq!(code, 404, "{path}");
    }
    let (code, _) =
        http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n").expect("answer");
    assert_eq!(code, 405);

    // Clients that connect and never send, or send half a request, and stay.
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(addr).expect("connect"))
        .collect();
    for s in idle.iter_mut().take(10) {
        s.write_all(b"GET /met").expect("partial request");
    }
    // Cycles go on while they sit there, and the endpoint still answers: four more cycles
    // (a hang guard only bounds the wait; the count decides).
    let later = scrape_until(addr, Duration::from_secs(60), |t| {
        value(t, "cwreap_cycle_duration_seconds_count", &[]).unwrap_or(0.0) >= c0 + 4.0
    });
    let c1 = value(&later, "cwreap_cycle_duration_seconds_count", &[]).unwrap_or(0.0);
    assert!(c1 >= c0 + 4.0, "cycles stalled at {c1} (from {c0})");
    drop(idle);
}

#[test]
fn new_close_wait_counted_and_fd_usage_of_the_fullest_process() {
    // Two servers of one target, on loopback addresses of their own so the target's
    // cmdline regex matches nobody else.
    let me = std::process::id();
    let net = format!("127.{}.{}", 100 + (me >> 8) % 100, me % 256);
    let mut roomy = Fixture::start(&[&format!("{net}.1:0")], &[]);
    let mut tight = Fixture::start(&[&format!("{net}.2:0")], &[]);
    // The second one nearest its limit: few fds under a soft limit of 64.
    const TIGHT: f64 = 64.0;
    let out = Command::new("prlimit")
        .args(["--pid", &tight.pid().to_string(), "--nofile=64:64"])
        .output()
        .expect("run prlimit");
    assert!(out.status.success(), "prlimit: {out:?}");
    // Two CLOSE_WAIT before the daemon starts: found at its first look, not arrivals.
    let _before = [roomy.close_wait(0), roomy.close_wait(0)];
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let _d = LoggedDaemon::start(
        "arrivals",
        &format!(
            "interval: 200ms\nmetrics: {{listen: \"{addr}\"}}\ntargets:\n  - name: pair\n    match: {{cmdline: \"--listen {}\\\\.[12]:0\"}}\n    older_than: 1h\n    action: log\n",
            net.replace('.', "\\\\.")
        ),
    );
    let pair = [("target", "pair")];
    let s = scrape_until(addr, Duration::from_secs(10), |s| {
        value(s, "cwreap_close_wait_sockets", &pair) == Some(2.0)
    });
    assert_eq!(value(&s, "cwreap_close_wait_sockets", &pair), Some(2.0));
    assert_eq!(value(&s, "cwreap_close_wait_new_total", &pair), Some(0.0));
    let ratio = value(&s, "cwreap_process_fd_usage_ratio", &pair).expect("ratio");
    let want = fd_count(tight.pid()) as f64 / TIGHT;
    assert!(
        (ratio - want).abs() <= 2.0 / TIGHT,
        "fd usage ratio {ratio}, /proc says {want} for the tight server"
    );

    // Three arrive, in the tight one: counted once each, and its ratio grows.
    let _after = [
        tight.close_wait(0),
        tight.close_wait(0),
        tight.close_wait(0),
    ];
    let s = scrape_until(addr, Duration::from_secs(10), |s| {
        value(s, "cwreap_close_wait_sockets", &pair) == Some(5.0)
    });
    assert_eq!(value(&s, "cwreap_close_wait_sockets", &pair), Some(5.0));
    assert_eq!(value(&s, "cwreap_close_wait_new_total", &pair), Some(3.0));
    let ratio = value(&s, "cwreap_process_fd_usage_ratio", &pair).expect("ratio");
    let want = fd_count(tight.pid()) as f64 / TIGHT;
    assert!(
        (ratio - want).abs() <= 2.0 / TIGHT,
        "fd usage ratio {ratio}, /proc says {want} for the tight server"
    );
    // Later cycles see the same five: no more arrivals.
    let c0 = value(&s, "cwreap_cycle_duration_seconds_count", &[]).unwrap_or(0.0);
    let s = scrape_until(addr, Duration::from_secs(10), |s| {
        value(s, "cwreap_cycle_duration_seconds_count", &[]).unwrap_or(0.0) >= c0 + 3.0
    });
    assert_eq!(value(&s, "cwreap_close_wait_new_total", &pair), Some(3.0));
}

#[test]
fn alert_rules_are_valid_and_use_our_metrics() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config/cwreap.rules.yml");
    let text = std::fs::read_to_string(&path).expect("read rules");
    #[derive(serde::Deserialize)]
    struct File {
        groups: Vec<Group>,
    }
    #[derive(serde::Deserialize)]
    struct Group {
        rules: Vec<Rule>,
    }
    #[derive(serde::Deserialize)]
    struct Rule {
        alert: String,
        expr: String,
    }
    let file: File = serde_saphyr::from_str(&text).expect("rules file is YAML of the right shape");
    let rules: Vec<&Rule> = file.groups.iter().flat_map(|g| &g.rules).collect();
    let names: Vec<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    for want in [
        "CwreapCloseWaitGrowing",
        "CwreapFdUsageHigh",
        "CwreapReapedFdsStillHeld",
        "CwreapNotCycling",
        "CwreapFdLimitIn4h",
        "CwreapEmfileSoon",
        "CwreapFdUsageWarning",
        "CwreapEscalated",
    ] {
        assert!(names.contains(&want), "missing alert {want}");
    }
    // Every cwreap_* series an alert uses is one the daemon exports.
    let metrics = cwreap::daemon::metrics::Metrics::new();
    let mut report = cwreap::daemon::cycle_report::CycleReport::default();
    report.targets.insert(
        "t".into(),
        cwreap::daemon::cycle_report::TargetGauges {
            emfile_in_ms: Some(60_000),
            ..Default::default()
        },
    );
    report.escalations.insert(
        (
            "t".into(),
            cwreap::daemon::cycle_report::EscalationKind::Signal,
        ),
        1,
    );
    report.outcomes.insert(
        (
            "t".into(),
            cwreap::shared::config::Action::Shutdown,
            cwreap::shared::act::Outcome::Reaped,
        ),
        1,
    );
    report.releases.insert(
        ("t".into(), cwreap::daemon::cycle_report::Release::StillHeld),
        1,
    );
    report
        .errors
        .insert(cwreap::daemon::cycle_report::ErrorKind::Netlink, 1);
    metrics.observe(&report);
    let exported = metrics.render();
    let known = [
        "cwreap_close_wait_sockets",
        "cwreap_close_wait_oldest_seconds",
        "cwreap_reaped_total",
        "cwreap_fd_released_total",
        "cwreap_process_open_fds",
        "cwreap_process_fd_limit",
        "cwreap_process_fd_usage_ratio",
        "cwreap_close_wait_new_total",
        "cwreap_cycle_duration_seconds",
        "cwreap_cycle_errors_total",
        "cwreap_last_cycle_timestamp_seconds",
        "cwreap_build_info",
        "cwreap_emfile_forecast_seconds",
        "cwreap_fd_usage_warning",
        "cwreap_escalations_total",
    ];
    for r in &rules {
        for word in r
            .expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        {
            if word.starts_with("cwreap_") {
                assert!(known.contains(&word), "{}: unknown metric {word}", r.alert);
                let family = word.trim_end_matches("_total");
                assert!(exported.contains(family), "{word} is not exported");
            }
        }
    }
    // promtool, when present, has the last word (CI installs it).
    match Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&path)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool check rules failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => skip_or_fail(
            "promtool check rules",
            "promtool is not installed (apt-get install prometheus; .ci/run installs it)",
        ),
    }
    // And the alerts fire when they should, on synthetic series (cwreap.rules.test.yml).
    let tests = path.with_file_name("cwreap.rules.test.yml");
    match Command::new("promtool")
        .arg("test")
        .arg("rules")
        .arg(&tests)
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool test rules failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => skip_or_fail(
            "promtool test rules",
            "promtool is not installed (apt-get install prometheus; .ci/run installs it)",
        ),
    }
}

/// The fds of `target`'s `reaped` actions in the audit log.
fn reaped_fds(audit: &[serde_json::Value], target: &str) -> std::collections::BTreeSet<i64> {
    audit
        .iter()
        .filter(|a| a["event"] == "action" && a["target"] == target && a["outcome"] == "reaped")
        .filter_map(|a| a["fd"].as_i64())
        .collect()
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn two_targets_on_one_process_split_by_port_each_count_and_reap_their_own() {
    // One process, three ports: 2 sockets for `api`, 3 for `admin`, 4 for nobody.
    let mut fx = Fixture::start(&["127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"], &[]);
    let (api, admin, other) = (
        fx.listen[0].port(),
        fx.listen[1].port(),
        fx.listen[2].port(),
    );
    let mut clients: Vec<(usize, TcpStream, i32)> = Vec::new();
    for (idx, n) in [(0, 2), (1, 3), (2, 4)] {
        for _ in 0..n {
            let (c, fd) = fx.close_wait(idx);
            clients.push((idx, c, fd));
        }
    }
    let fds_of = |idx: usize| -> std::collections::BTreeSet<i64> {
        clients
            .iter()
            .filter(|(i, _, _)| *i == idx)
            .map(|(_, _, fd)| i64::from(*fd))
            .collect()
    };
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let policy = |older_than: &str| {
        format!(
            "interval: 200ms\ndry_run: false\nlog_format: json\nmetrics: {{listen: \"{addr}\"}}\n\
             audit_log: {{dir}}/audit.jsonl\ntargets:\n\
             \x20 - name: api\n    match: {{pid: {pid}, local_ports: [{api}]}}\n    older_than: {older_than}\n    action: shutdown\n\
             \x20 - name: admin\n    match: {{pid: {pid}, local_ports: [{admin}]}}\n    older_than: {older_than}\n    action: shutdown\n",
            pid = fx.pid()
        )
    };
    let mut d = LoggedDaemon::start("two-targets", &policy("1h"));
    // Before the threshold: each gauge counts its own sockets, none of the 4 others.
    let gauge = |s: &prometheus_parse::Scrape, t: &str| {
        value(s, "cwreap_close_wait_sockets", &[("target", t)])
    };
    let s = d.wait_for("both gauges", |_| {
        let s = scrape(addr)?;
        (gauge(&s, "api").is_some() && gauge(&s, "admin").is_some()).then_some(s)
    });
    assert_eq!(gauge(&s, "api"), Some(2.0), "{}", d.log());
    assert_eq!(gauge(&s, "admin"), Some(3.0), "{}", d.log());
    for t in ["api", "admin"] {
        let oldest = value(&s, "cwreap_close_wait_oldest_seconds", &[("target", t)]);
        assert!(oldest.is_some_and(|v| v >= 0.0), "{t}: {oldest:?}");
        // Open fds and the fd limit stay per process: both targets see the whole process.
        let open = value(&s, "cwreap_process_open_fds", &[("target", t)]).expect("open fds");
        assert!(open >= 9.0 + 3.0, "{t}: {open} open fds");
    }
    assert_eq!(
        value(&s, "cwreap_process_open_fds", &[("target", "api")]),
        value(&s, "cwreap_process_open_fds", &[("target", "admin")])
    );

    // Now old enough: both targets act, each on its own port only.
    d.reload(&policy("1s"));
    let s = d.wait_for("5 reaps in the metrics", |_| {
        let s = scrape(addr)?;
        let reaped = |t| {
            value(
                &s,
                "cwreap_reaped_total",
                &[("target", t), ("action", "shutdown"), ("outcome", "reaped")],
            )
            .unwrap_or(0.0)
        };
        (reaped("api") + reaped("admin") >= 5.0).then_some(s)
    });
    let reaped = |t| {
        value(
            &s,
            "cwreap_reaped_total",
            &[("target", t), ("action", "shutdown"), ("outcome", "reaped")],
        )
    };
    assert_eq!(reaped("api"), Some(2.0), "{}", d.log());
    assert_eq!(reaped("admin"), Some(3.0), "{}", d.log());
    let audit = d.audit();
    assert_eq!(reaped_fds(&audit, "api"), fds_of(0), "{}", d.log());
    assert_eq!(reaped_fds(&audit, "admin"), fds_of(1), "{}", d.log());
    for (idx, c, fd) in &mut clients {
        if *idx < 2 {
            assert!(
                reads_eof(c, Duration::from_secs(10)),
                "fd {fd} not shut down"
            );
        }
    }
    // The gauges follow: nothing left in either target, and the 4 others untouched.
    let s = d.wait_for("both gauges at 0", |_| {
        let s = scrape(addr)?;
        (gauge(&s, "api") == Some(0.0) && gauge(&s, "admin") == Some(0.0)).then_some(s)
    });
    assert!(
        value(&s, "cwreap_cycle_errors_total", &[]).is_none(),
        "{}",
        d.log()
    );
    assert_eq!(ss_close_wait_on_port(api) + ss_close_wait_on_port(admin), 0);
    assert_eq!(
        ss_close_wait_on_port(other),
        4,
        "a socket of no target was touched"
    );
    for (idx, c, fd) in &mut clients {
        if *idx == 2 {
            assert!(
                !reads_eof(c, Duration::from_millis(50)),
                "fd {fd} of no target was shut down"
            );
        }
    }
}

/// How one scrape with a client timeout ended.
#[derive(Debug, Default)]
struct Scrapes {
    /// A complete 200 answer (Content-Length bytes of metrics text) within the timeout.
    answered: usize,
    /// The server closed the connection before a complete answer.
    closed: usize,
    /// No complete answer within the timeout (connect, write or read).
    timed_out: usize,
}

/// `GET /metrics` with `limit` for the whole exchange, connect included.
fn scrape_within(addr: SocketAddr, limit: Duration, tally: &mut Scrapes) {
    use std::io::Read;
    let deadline = Instant::now() + limit;
    let Ok(mut s) = TcpStream::connect_timeout(&addr, limit) else {
        tally.timed_out += 1;
        return;
    };
    if s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .is_err()
    {
        tally.closed += 1;
        return;
    }
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            tally.timed_out += 1;
            return;
        }
        s.set_read_timeout(Some(left)).expect("set a read timeout");
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock) => {
                tally.timed_out += 1;
                return;
            }
            Err(_) => break, // reset: judged by what came before it
        }
    }
    let text = String::from_utf8_lossy(&resp);
    let complete = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|n| n.trim().parse::<usize>().ok());
        head.starts_with("HTTP/1.1 200 ")
            && length == Some(body.len())
            && body.contains("cwreap_build_info")
    });
    if complete {
        tally.answered += 1;
    } else {
        tally.closed += 1;
    }
}

/// An attacker that keeps `n` idle connections to `addr` open, reopening each as soon as
/// the server closes it, until `stop`. Returns (connections open now, reopened so far).
struct Attacker {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    open: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    reopened: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Attacker {
    fn start(addr: SocketAddr, n: usize) -> Attacker {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let open = Arc::new(AtomicUsize::new(0));
        let reopened = Arc::new(AtomicUsize::new(0));
        let (s, o, r) = (stop.clone(), open.clone(), reopened.clone());
        let thread = std::thread::spawn(move || {
            use rustix::event::{PollFd, PollFlags, Timespec};
            use std::io::Read;
            let mut conns: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
            let mut ever = vec![false; n];
            let tick = Timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            while !s.load(Ordering::Relaxed) {
                for (i, c) in conns.iter_mut().enumerate() {
                    if c.is_none()
                        && let Ok(t) = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                    {
                        t.set_nonblocking(true).expect("nonblocking");
                        if ever[i] {
                            r.fetch_add(1, Ordering::Relaxed);
                        }
                        ever[i] = true;
                        *c = Some(t);
                    }
                }
                o.store(conns.iter().flatten().count(), Ordering::Relaxed);
                // Sleep until the server closes one of them.
                let mut fds: Vec<PollFd> = conns
                    .iter()
                    .flatten()
                    .map(|t| PollFd::new(t, PollFlags::IN | PollFlags::RDHUP))
                    .collect();
                let _ = rustix::event::poll(&mut fds, Some(&tick));
                drop(fds);
                for c in conns.iter_mut() {
                    let closed = c.as_mut().is_some_and(|t| {
                        !matches!(t.read(&mut [0u8; 1]),
                            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    });
                    if closed {
                        *c = None;
                    }
                }
            }
        });
        Attacker {
            stop,
            open,
            reopened,
            thread: Some(thread),
        }
    }

    fn open(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn reopened(&self) -> usize {
        self.reopened.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stop, closing every connection.
    fn stop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().expect("the attacker thread ends");
        }
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn idle_connections_holding_every_slot_do_not_keep_scrapes_out() {
    const ATTACKERS: usize = 100;
    const SCRAPES: usize = 48;
    const ENOUGH: usize = 45;
    let addr = free_addr();
    let mut d = LoggedDaemon::start(
        "scrape-flood",
        &format!(
            "interval: 200ms\nmetrics: {{listen: \"{addr}\"}}\ntargets:\n  - name: nobody\n    match: {{cmdline: \"^no program has this command line$\"}}\n    older_than: 1h\n    action: log\n"
        ),
    );
    d.wait_for("the first scrape", |_| {
        crate::support::metrics::scrape(addr)
    });

    // More idle connections than the endpoint serves at once, reopened as soon as closed.
    let mut attacker = Attacker::start(addr, ATTACKERS);
    d.wait_for(
        "the attacker's connections, some closed by a full server",
        |_| (attacker.open() + 2 >= ATTACKERS && attacker.reopened() > 0).then_some(()),
    );
    let reopened0 = attacker.reopened();
    let mut tally = Scrapes::default();
    for _ in 0..SCRAPES {
        scrape_within(addr, Duration::from_secs(1), &mut tally);
        std::thread::sleep(Duration::from_millis(200));
    }
    let reopened = attacker.reopened() - reopened0;
    attacker.stop();
    eprintln!("scrapes under the attack: {tally:?}; the attacker reopened {reopened}");

    // The endpoint was full throughout: the server kept closing the attacker's connections.
    assert!(
        reopened >= SCRAPES,
        "the attacker reopened only {reopened} connections: the endpoint was not full\n{}",
        d.log()
    );
    assert!(
        tally.answered >= ENOUGH,
        "only {} of {SCRAPES} scrapes got an answer while idle connections held the slots: {tally:?}\n{}",
        tally.answered,
        d.log()
    );
    // Room was made by closing idle connections, and the metrics say so.
    let text = d.wait_for("a scrape after the attack", |_| {
        crate::support::metrics::scrape(addr)
    });
    let evicted =
        crate::support::metrics::sample(&text, "cwreap_metrics_connections_evicted_total")
            .expect("the eviction counter");
    assert!(evicted >= 1.0, "no eviction counted:\n{text}");
    let refused =
        crate::support::metrics::sample(&text, "cwreap_metrics_refused_connections_total")
            .expect("the refusal counter");
    assert!(
        refused >= evicted,
        "refused {refused} (evictions included) < evicted {evicted}"
    );
    assert!(
        text.contains("# HELP cwreap_metrics_connections_evicted "),
        "the eviction counter has no help text:\n{text}"
    );
    assert!(!d.lines().join("\n").contains("panicked"), "{}", d.log());
}
