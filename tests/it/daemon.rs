//! End-to-end tests of `cwreap run`, the policy daemon, on real leaky servers over loopback.
//! Each test runs its own fixture and selects it by pid, so tests never touch each other's
//! sockets; every claim is checked against the daemon's log, its audit file, sd_notify, `ss`
//! and what each client observes.

use std::collections::BTreeSet;
use std::fs::Permissions;
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::*;
use rustix::process::{Pid, Signal};
use serde_json::Value;

const V4: &str = "127.0.0.1:0";
const ACTION: &str = "close_wait action";

// ---------------------------------------------------------------------------------------
// Scratch files and the policy.

/// A policy for one test: short interval, metrics off, targets selected by pid.
struct Policy {
    interval: &'static str,
    dry_run: bool,
    log_format: &'static str,
    audit_log: Option<PathBuf>,
    limits: Option<String>,
    /// Short: these tests look at verdicts, not at the window (its own tests do).
    still_held_after: &'static str,
    targets: Vec<String>,
}

impl Policy {
    fn new(dry_run: bool) -> Policy {
        Policy {
            interval: "200ms",
            dry_run,
            log_format: "json",
            audit_log: None,
            limits: None,
            still_held_after: "1s",
            targets: Vec::new(),
        }
    }

    fn interval(mut self, interval: &'static str) -> Policy {
        self.interval = interval;
        self
    }

    fn text_log(mut self) -> Policy {
        self.log_format = "text";
        self
    }

    fn audit(mut self, path: PathBuf) -> Policy {
        self.audit_log = Some(path);
        self
    }

    fn limits(mut self, flow_map: &str) -> Policy {
        self.limits = Some(flow_map.to_owned());
        self
    }

    /// A `shutdown` target for `pid`; `extra` lines are target keys (`key: value`).
    fn target(mut self, name: &str, pid: i32, older_than: &str, extra: &[&str]) -> Policy {
        let mut t = format!(
            "  - name: {name}\n    match: {{pid: {pid}}}\n    older_than: {older_than}\n    action: shutdown\n"
        );
        for line in extra {
            t.push_str(&format!("    {line}\n"));
        }
        self.targets.push(t);
        self
    }

    fn yaml(&self) -> String {
        let mut y = format!(
            "interval: {}\ndry_run: {}\nlog_format: {}\nmetrics: {{listen: off}}\nstill_held_after: {}\n",
            self.interval, self.dry_run, self.log_format, self.still_held_after
        );
        if let Some(p) = &self.audit_log {
            y.push_str(&format!("audit_log: {}\n", p.display()));
        }
        if let Some(l) = &self.limits {
            y.push_str(&format!("limits: {l}\n"));
        }
        y.push_str("targets:\n");
        for t in &self.targets {
            y.push_str(t);
        }
        y
    }
}

// ---------------------------------------------------------------------------------------
// The daemon under test.

fn message_is(v: &Value, message: &str) -> bool {
    v["message"].as_str() == Some(message)
}

/// The action events about `pid`.
fn actions(events: &[Value], pid: i32) -> Vec<Value> {
    events
        .iter()
        .filter(|v| message_is(v, ACTION) && v["pid"].as_i64() == Some(i64::from(pid)))
        .cloned()
        .collect()
}

/// The fds of `pid` with an action event of this outcome.
fn fds_with(events: &[Value], pid: i32, outcome: &str) -> BTreeSet<i32> {
    actions(events, pid)
        .iter()
        .filter(|v| v["outcome"].as_str() == Some(outcome))
        .map(|v| field_i64(v, "fd") as i32)
        .collect()
}

/// Wait until `n` sockets of `pid` have an action event with `outcome`; return their fds.
fn wait_outcomes(d: &mut Running, pid: i32, outcome: &str, n: usize) -> BTreeSet<i32> {
    d.wait_events(
        &format!("{n} `{outcome}` action(s) on pid {pid}"),
        Duration::from_secs(10),
        |ev| {
            let fds = fds_with(ev, pid, outcome);
            (fds.len() >= n).then_some(fds)
        },
    )
}

/// `key=value` from a text log line (values may be quoted).
fn kv<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .map(|v| v.trim_matches('"'))
}

// ---------------------------------------------------------------------------------------
// sd_notify: the daemon's cycle clock (see [`Notify`]).

/// The number just before `suffix` in a STATUS text.
fn number_before(status: &str, suffix: &str) -> usize {
    let end = status
        .find(suffix)
        .unwrap_or_else(|| panic!("no `{suffix}` in status {status:?}"));
    let digits: String = status[..end]
        .chars()
        .rev()
        .take_while(char::is_ascii_digit)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number before `{suffix}` in {status:?}"))
}

/// (CLOSE_WAIT in targets, reaped this cycle, deferred by limits) from a STATUS text.
fn status_counts(status: &str) -> (usize, usize, usize) {
    (
        number_before(status, " CLOSE_WAIT in targets"),
        number_before(status, " reaped this cycle"),
        number_before(status, " deferred by limits"),
    )
}

// ---------------------------------------------------------------------------------------
// Clients and timing.

/// A client connecting from `source` (any loopback address), half-closed so the fixture's
/// end goes to CLOSE_WAIT. Returns the client and the server-side fd.
fn close_wait_from(fx: &mut Fixture, idx: usize, source: IpAddr) -> (TcpStream, i32) {
    use rustix::net::{AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    rustix::net::bind(&fd, &SocketAddr::new(source, 0)).expect("bind the source address");
    rustix::net::connect(&fd, &fx.listen[idx]).expect("connect to fixture");
    let client = TcpStream::from(fd);
    let server_fd = fx.accepted(client.local_addr().expect("client addr"));
    client.shutdown(Shutdown::Write).expect("half-close");
    let eof: i32 = fx.expect_line("eof ").parse().expect("eof fd");
    assert_eq!(eof, server_fd, "EOF on an unexpected fd");
    (client, server_fd)
}

fn fds_of(set: &BTreeSet<(i32, SocketAddr, SocketAddr)>) -> BTreeSet<i32> {
    set.iter().map(|(fd, _, _)| *fd).collect()
}

fn fd_set(conns: &[(TcpStream, i32)]) -> BTreeSet<i32> {
    conns.iter().map(|(_, fd)| *fd).collect()
}

fn assert_eof(conns: &mut [(TcpStream, i32)]) {
    for (client, fd) in conns.iter_mut() {
        assert!(
            reads_eof(client, Duration::from_secs(5)),
            "the client of fd {fd} got no EOF: it was not shut down"
        );
    }
}

fn assert_no_eof(conns: &mut [(TcpStream, i32)]) {
    // Over loopback a FIN arrives at once: one short wait covers every client.
    std::thread::sleep(Duration::from_millis(200));
    for (client, fd) in conns.iter_mut() {
        assert!(
            !reads_eof(client, Duration::from_millis(10)),
            "the client of fd {fd} got EOF: it was shut down"
        );
    }
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

fn audit_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("read the audit log")
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line not JSON ({e}): {l}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Dry run.

#[test]
#[ignore = "needs root: a dry run still proves permission: pidfd_getfd on the fixture's sockets (CAP_SYS_PTRACE)"]
fn dry_run_in_the_policy_reports_once_and_touches_nothing() {
    let scratch = Scratch::new("dry-policy", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let mut waiting: Vec<_> = (0..3).map(|_| fx.close_wait(0)).collect();
    let before = ss_close_wait(pid);
    assert_eq!(fds_of(&before), fd_set(&waiting));

    let cfg = scratch.path("cwreap.yaml");
    // The text format, as an operator reads it.
    let policy = Policy::new(true)
        .text_log()
        .target("fixture", pid, "1s", &[]);
    write_policy(&cfg, &policy.yaml());
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    let pid_s = pid.to_string();
    let is_action = |l: &&String| l.contains(ACTION) && kv(l, "pid") == Some(pid_s.as_str());
    d.wait_lines("three action lines", Duration::from_secs(10), |lines| {
        (lines.iter().filter(is_action).count() >= 3).then_some(())
    });
    // More cycles: each socket is reported once, not every cycle.
    notify.cycles(2);
    d.stop();

    let lines = d.lines();
    let acts: Vec<&String> = lines.iter().filter(is_action).collect();
    assert_eq!(acts.len(), 3, "one line per socket:\n{}", d.log());
    let mut seen = BTreeSet::new();
    for l in &acts {
        assert!(l.contains(" INFO "), "{l}");
        assert_eq!(kv(l, "target"), Some("fixture"), "{l}");
        assert_eq!(kv(l, "comm"), Some("cwreap-fixture"), "{l}");
        assert_eq!(kv(l, "action"), Some("shutdown"), "{l}");
        assert_eq!(kv(l, "outcome"), Some("dry_run"), "{l}");
        assert_eq!(kv(l, "dry_run"), Some("true"), "{l}");
        let fd: i32 = kv(l, "fd").and_then(|v| v.parse().ok()).expect("fd=");
        let local: SocketAddr = kv(l, "local").and_then(|v| v.parse().ok()).expect("local=");
        let remote: SocketAddr = kv(l, "remote")
            .and_then(|v| v.parse().ok())
            .expect("remote=");
        assert!(
            before.contains(&(fd, local, remote)),
            "not an ss socket: {l}"
        );
        let age: u64 = kv(l, "age_ms")
            .and_then(|v| v.parse().ok())
            .expect("age_ms=");
        assert!(age >= 1000, "acted before older_than: {l}");
        seen.insert(fd);
    }
    assert_eq!(seen, fds_of(&before), "every socket reported");
    assert_eq!(ss_close_wait(pid), before, "a dry run changed the sockets");
    assert_no_eof(&mut waiting);
}

#[test]
#[ignore = "needs root: a dry run still proves permission: pidfd_getfd on the fixture's sockets (CAP_SYS_PTRACE)"]
fn dry_run_flag_overrides_an_enforcing_policy() {
    let scratch = Scratch::new("dry-flag", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let mut waiting: Vec<_> = (0..3).map(|_| fx.close_wait(0)).collect();
    let before = ss_close_wait(pid);

    let cfg = scratch.path("cwreap.yaml");
    let audit = scratch.path("audit.jsonl");
    let policy = Policy::new(false)
        .audit(audit.clone())
        .target("fixture", pid, "1s", &[]);
    write_policy(&cfg, &policy.yaml());
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &["--dry-run"], &[notify.env()]);
    let started = d
        .events()
        .into_iter()
        .find(|v| message_is(v, "cwreap started"))
        .expect("start-up event");
    assert_eq!(started["dry_run"], Value::Bool(true), "{started}");

    let fds = wait_outcomes(&mut d, pid, "dry_run", 3);
    notify.cycles(2);
    d.stop();

    assert_eq!(fds, fd_set(&waiting));
    let acts = actions(&d.events(), pid);
    assert_eq!(acts.len(), 3, "{}", d.log());
    for a in &acts {
        assert_eq!(field_str(a, "outcome"), "dry_run", "{a}");
        assert_eq!(a["dry_run"], Value::Bool(true), "{a}");
    }
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), 3, "{lines:?}");
    for l in &lines {
        assert_eq!(field_str(l, "event"), "action");
        assert_eq!(field_str(l, "outcome"), "dry_run", "{l}");
        assert_eq!(l["dry_run"], Value::Bool(true), "{l}");
    }
    assert_eq!(ss_close_wait(pid), before, "--dry-run changed the sockets");
    assert_no_eof(&mut waiting);
}

// ---------------------------------------------------------------------------------------
// Enforcing.

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn enforce_reaps_only_sockets_past_older_than() {
    // The young sockets come 8 s after the old ones: from the cycle that reaps the old ones
    // to the one that could reap the young ones there are 8 s to stop the daemon, a margin
    // a busy machine keeps (the assertion below says so if it ever did not).
    let older_than = Duration::from_secs(10);
    let scratch = Scratch::new("enforce", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let mut established = fx.connect(0);
    let old_at = Instant::now();
    let mut old: Vec<_> = (0..3).map(|_| fx.close_wait(0)).collect();

    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(false).target("fixture", pid, "10s", &[]).yaml(),
    );
    let notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    sleep_until(old_at + Duration::from_secs(8));
    let young_at = Instant::now();
    let mut young: Vec<_> = (0..2).map(|_| fx.close_wait(0)).collect();

    let reaped = wait_outcomes(&mut d, pid, "reaped", 3);
    // Stop while the young ones are still under older_than.
    let young_age = young_at.elapsed();
    d.stop();
    assert!(
        young_age < older_than,
        "too slow: the young sockets were {young_age:?} old when the daemon stopped; log:\n{}",
        d.log()
    );

    assert_eq!(reaped, fd_set(&old));
    let acts = actions(&d.events(), pid);
    assert_eq!(
        acts.len(),
        3,
        "only the old sockets were acted on:\n{}",
        d.log()
    );
    for a in &acts {
        assert_eq!(field_str(a, "outcome"), "reaped", "{a}");
        assert_eq!(a["dry_run"], Value::Bool(false), "{a}");
        assert!(field_i64(a, "age_ms") >= 10_000, "reaped too young: {a}");
    }
    // The daemon saw the young sockets as candidates and left them alone.
    assert!(
        notify.statuses().iter().any(|s| status_counts(s).0 == 5),
        "no cycle saw all five sockets: {:?}",
        notify.statuses()
    );
    assert_eq!(fds_of(&ss_close_wait(pid)), fd_set(&young));
    assert_eof(&mut old);
    assert_no_eof(&mut young);
    assert!(echoes(&mut established.0), "ESTABLISHED connection broken");
    assert_eq!(ss_count(pid, "listening"), 1);
    let (mut fresh, _) = fx.connect(0);
    assert!(echoes(&mut fresh), "the listener no longer serves");
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn exclusions_spare_ports_and_peers_until_lifted() {
    let scratch = Scratch::new("exclude", 0o700);
    let mut fx = Fixture::start(&[V4, V4], &[]);
    let pid = fx.pid();
    let mut reapable = vec![fx.close_wait(0)];
    // Each of these is spared by exactly one exclusion.
    let by_local_port = fx.close_wait(1);
    let by_cidr = close_wait_from(&mut fx, 0, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    let by_remote_port = fx.close_wait(0);
    let remote_port = by_remote_port.0.local_addr().expect("client addr").port();
    let mut spared = vec![by_local_port, by_cidr, by_remote_port];
    let ss = ss_close_wait(pid);
    let cidr_fd = spared[1].1;
    assert!(
        ss.iter()
            .any(|(fd, _, peer)| *fd == cidr_fd && peer.ip() == IpAddr::from([127, 0, 0, 2])),
        "the client did not connect from 127.0.0.2: {ss:?}"
    );

    let cfg = scratch.path("cwreap.yaml");
    let exclude = format!(
        "exclude: {{local_ports: [{}], remote_cidrs: [127.0.0.2/32], remote_ports: [{remote_port}]}}",
        fx.listen[1].port()
    );
    write_policy(
        &cfg,
        &Policy::new(false)
            .target("fixture", pid, "1s", &[exclude.as_str()])
            .yaml(),
    );
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    let reaped = wait_outcomes(&mut d, pid, "reaped", 1);
    // All four were equally old: a few more cycles change nothing.
    notify.cycles(2);
    assert_eq!(reaped, fd_set(&reapable));
    assert_eq!(actions(&d.events(), pid).len(), 1, "{}", d.log());
    assert_eq!(fds_of(&ss_close_wait(pid)), fd_set(&spared));
    assert_eof(&mut reapable);
    assert_no_eof(&mut spared);

    // The same policy without the exclusions reaps them: they were spared for that alone.
    write_policy(
        &cfg,
        &Policy::new(false).target("fixture", pid, "1s", &[]).yaml(),
    );
    d.signal(Signal::HUP);
    let reaped = wait_outcomes(&mut d, pid, "reaped", 4);
    d.stop();
    assert_eq!(reaped, &fd_set(&reapable) | &fd_set(&spared));
    assert_eof(&mut spared);
    assert!(ss_close_wait(pid).is_empty());
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn match_local_ports_selects_sockets_by_listener() {
    let scratch = Scratch::new("match-ports", 0o700);
    let mut fx = Fixture::start(&[V4, V4], &[]);
    let pid = fx.pid();
    let mut selected = vec![fx.close_wait(0), fx.close_wait(0)];
    let mut other = vec![fx.close_wait(1), fx.close_wait(1)];

    let cfg = scratch.path("cwreap.yaml");
    let policy = format!(
        "interval: 200ms\ndry_run: false\nlog_format: json\nmetrics: {{listen: off}}\ntargets:\n  - name: fixture\n    match: {{pid: {pid}, local_ports: [{}]}}\n    older_than: 1s\n    action: shutdown\n",
        fx.listen[0].port()
    );
    write_policy(&cfg, &policy);
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    let reaped = wait_outcomes(&mut d, pid, "reaped", 2);
    notify.cycles(2);
    d.stop();
    assert_eq!(reaped, fd_set(&selected));
    assert_eq!(actions(&d.events(), pid).len(), 2, "{}", d.log());
    assert_eq!(fds_of(&ss_close_wait(pid)), fd_set(&other));
    assert_eof(&mut selected);
    assert_no_eof(&mut other);
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn min_close_wait_waits_for_enough_sockets() {
    let scratch = Scratch::new("min-cw", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let made = Instant::now();
    let mut conns: Vec<_> = (0..2).map(|_| fx.close_wait(0)).collect();

    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(false)
            .target("fixture", pid, "1s", &["min_close_wait: 3"])
            .yaml(),
    );
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    // Two cycles that start after both sockets passed older_than.
    sleep_until(made + Duration::from_millis(1100));
    let statuses = notify.cycles(2);
    d.stop();
    assert!(
        actions(&d.events(), pid).is_empty(),
        "acted below min_close_wait:\n{}",
        d.log()
    );
    for s in &statuses {
        assert_eq!(status_counts(s), (2, 0, 0), "{s}");
    }
    assert_eq!(ss_close_wait(pid).len(), 2);
    assert_no_eof(&mut conns);

    // A third one, as old as older_than: a restarted daemon (ages come from the kernel)
    // finds three and reaps them all.
    let third_at = Instant::now();
    conns.push(fx.close_wait(0));
    sleep_until(third_at + Duration::from_millis(1100));
    let mut d = Running::start(&cfg, &[], &[]);
    let reaped = wait_outcomes(&mut d, pid, "reaped", 3);
    d.stop();
    assert_eq!(reaped, fd_set(&conns));
    assert_eof(&mut conns);
    assert!(ss_close_wait(pid).is_empty());
}

// ---------------------------------------------------------------------------------------
// Rate limits.

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn max_reaps_per_cycle_spreads_reaps_over_cycles() {
    let scratch = Scratch::new("per-cycle", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let mut conns: Vec<_> = (0..5).map(|_| fx.close_wait(0)).collect();
    // All five past older_than before the first cycle.
    std::thread::sleep(Duration::from_millis(300));

    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(false)
            .limits("{max_reaps_per_cycle: 2}")
            .target("fixture", pid, "200ms", &[])
            .yaml(),
    );
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    wait_outcomes(&mut d, pid, "reaped", 5);
    notify.cycles(1);
    d.stop();

    // Per cycle, as the daemon reported it: 2 + 2 + 1, the rest deferred each time.
    let per_cycle: Vec<(usize, usize)> = notify
        .statuses()
        .iter()
        .map(|s| status_counts(s))
        .filter(|(_, reaped, _)| *reaped > 0)
        .map(|(_, reaped, deferred)| (reaped, deferred))
        .collect();
    assert_eq!(
        per_cycle,
        vec![(2, 3), (2, 1), (1, 0)],
        "{:?}",
        notify.statuses()
    );
    let warned: Vec<i64> = d
        .events()
        .iter()
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("rate limit reached"))
        })
        .inspect(|v| assert_eq!(v["level"], "WARN", "{v}"))
        .map(|v| field_i64(v, "deferred"))
        .collect();
    assert_eq!(warned, vec![3, 1], "{}", d.log());
    assert_eq!(actions(&d.events(), pid).len(), 5);
    assert_eof(&mut conns);
    assert!(ss_close_wait(pid).is_empty());
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn max_reaps_per_minute_caps_reaps_across_cycles() {
    let scratch = Scratch::new("per-minute", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let mut conns: Vec<_> = (0..5).map(|_| fx.close_wait(0)).collect();
    // All five past older_than before the first cycle.
    std::thread::sleep(Duration::from_millis(300));

    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(false)
            .limits("{max_reaps_per_minute: 3}")
            .target("fixture", pid, "200ms", &[])
            .yaml(),
    );
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    let reaped = wait_outcomes(&mut d, pid, "reaped", 3);
    notify.cycles(3);
    d.stop();

    let acts = actions(&d.events(), pid);
    assert_eq!(acts.len(), 3, "three per minute, no more:\n{}", d.log());
    // One cycle reaps three and defers two; every later one defers the same two.
    let counts: Vec<(usize, usize, usize)> =
        notify.statuses().iter().map(|s| status_counts(s)).collect();
    let first = counts
        .iter()
        .position(|c| c.1 > 0)
        .unwrap_or_else(|| panic!("no cycle reaped: {counts:?}"));
    assert_eq!(counts[first], (5, 3, 2), "{counts:?}");
    assert!(counts.len() - first > 2, "{counts:?}");
    for c in &counts[first + 1..] {
        assert_eq!(*c, (2, 0, 2), "{counts:?}");
    }
    assert!(
        d.events().iter().any(|v| v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("rate limit reached"))
            && v["deferred"] == 2),
        "no rate limit warning:\n{}",
        d.log()
    );
    let left = fds_of(&ss_close_wait(pid));
    assert_eq!(left.len(), 2);
    assert!(left.is_disjoint(&reaped));
    let (mut done, mut waiting): (Vec<_>, Vec<_>) =
        conns.drain(..).partition(|(_, fd)| reaped.contains(fd));
    assert_eq!(fd_set(&waiting), left);
    assert_eof(&mut done);
    assert_no_eof(&mut waiting);
}

// ---------------------------------------------------------------------------------------
// Reporting.

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn audit_log_has_one_line_per_action() {
    let scratch = Scratch::new("audit", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let mut conns: Vec<_> = (0..3).map(|_| fx.close_wait(0)).collect();
    let before = ss_close_wait(pid);
    let out = cwreap(&["scan", "--pid", &pid.to_string(), "--json"]);
    let inodes: Vec<(i64, i64)> = json_lines(&out)
        .iter()
        .map(|r| (field_i64(r, "fd"), field_i64(r, "inode")))
        .collect();
    assert_eq!(inodes.len(), 3);

    let cfg = scratch.path("cwreap.yaml");
    let audit = scratch.path("audit.jsonl");
    write_policy(
        &cfg,
        &Policy::new(false)
            .audit(audit.clone())
            .target("fixture", pid, "1s", &[])
            .yaml(),
    );
    let t0 = unix_now();
    let mut d = Running::start(&cfg, &[], &[]);
    wait_outcomes(&mut d, pid, "reaped", 3);
    d.wait_events("three fd_release events", Duration::from_secs(10), |ev| {
        (ev.iter()
            .filter(|v| v["result"].is_string() && v["pid"] == pid)
            .count()
            >= 3)
            .then_some(())
    });
    d.stop();
    let t1 = unix_now();

    let mode = std::fs::metadata(&audit).expect("audit file").mode() & 0o777;
    assert_eq!(mode, 0o600, "audit log mode {mode:o}");
    let lines = audit_lines(&audit);
    let action_keys: BTreeSet<&str> = [
        "ts",
        "event",
        "target",
        "pid",
        "fd",
        "unaccepted",
        "netns",
        "comm",
        "inode",
        "local",
        "remote",
        "age_ms",
        "age_max_ms",
        "age_source",
        "action",
        "outcome",
        "dry_run",
        "reason",
        "error",
    ]
    .into_iter()
    .collect();
    let mut acted = BTreeSet::new();
    for l in lines.iter().filter(|l| l["event"] == "action") {
        let keys: BTreeSet<&str> = l
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, action_keys, "{l}");
        let ts = l["ts"].as_f64().expect("ts");
        assert!(t0 <= ts && ts <= t1, "ts {ts} outside [{t0}, {t1}]");
        assert_eq!(field_str(l, "target"), "fixture");
        assert_eq!(field_i64(l, "pid"), i64::from(pid));
        assert_eq!(field_str(l, "comm"), "cwreap-fixture");
        let fd = field_i64(l, "fd");
        let local: SocketAddr = field_str(l, "local").parse().expect("local");
        let remote: SocketAddr = field_str(l, "remote").parse().expect("remote");
        assert!(
            before.contains(&(fd as i32, local, remote)),
            "not an ss socket: {l}"
        );
        assert!(
            inodes.contains(&(fd, field_i64(l, "inode"))),
            "inode differs from scan's: {l}"
        );
        assert!(field_i64(l, "age_ms") >= 1000, "{l}");
        assert_eq!(field_str(l, "action"), "shutdown");
        assert_eq!(field_str(l, "outcome"), "reaped");
        assert_eq!(l["dry_run"], Value::Bool(false));
        assert!(l["reason"].is_null() && l["error"].is_null(), "{l}");
        assert!(acted.insert(fd as i32), "two action lines for fd {fd}");
    }
    assert_eq!(acted, fds_of(&before), "one action line per reaped socket");
    let released: BTreeSet<i32> = lines
        .iter()
        .filter(|l| l["event"] == "fd_release")
        .map(|l| {
            assert_eq!(field_str(l, "result"), "still_held", "{l}");
            field_i64(l, "fd") as i32
        })
        .collect();
    assert_eq!(released, acted);
    // Before the first action, an intent record of every socket the cycle would change.
    let first_action = lines
        .iter()
        .position(|l| l["event"] == "action")
        .expect("an action line");
    let intents: BTreeSet<(i64, i64)> = lines[..first_action]
        .iter()
        .filter(|l| l["event"] == "intent")
        .map(|l| {
            assert_eq!(field_str(l, "action"), "shutdown", "{l}");
            (field_i64(l, "fd"), field_i64(l, "inode"))
        })
        .collect();
    assert_eq!(intents, inodes.iter().copied().collect(), "{lines:?}");
    assert_eq!(
        lines.len(),
        9,
        "only intent, action and fd_release lines: {lines:?}"
    );
    assert_eof(&mut conns);
    assert!(ss_close_wait(pid).is_empty());
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn fd_release_says_released_or_still_held() {
    let scratch = Scratch::new("release", 0o700);
    let mut closer = Fixture::start(&[V4], &["--on-hup", "close"]);
    let mut leaker = Fixture::start(&[V4], &[]);
    let mut c = closer.close_wait(0);
    let mut l = leaker.close_wait(0);
    let leaked_inode = fd_inode(leaker.pid(), l.1).expect("leaker's socket");

    let cfg = scratch.path("cwreap.yaml");
    let audit = scratch.path("audit.jsonl");
    write_policy(
        &cfg,
        &Policy::new(false)
            .audit(audit.clone())
            .target("closer", closer.pid(), "1s", &[])
            .target("leaker", leaker.pid(), "1s", &[])
            .yaml(),
    );
    let mut d = Running::start(&cfg, &[], &[]);
    let is_release = |v: &Value| v["result"].is_string() && v["waited_ms"].is_u64();
    d.wait_events("both fd_release events", Duration::from_secs(10), |ev| {
        (ev.iter().filter(|v| is_release(v)).count() >= 2).then_some(())
    });
    d.stop();

    assert!(reads_eof(&mut c.0, Duration::from_secs(5)));
    assert!(reads_eof(&mut l.0, Duration::from_secs(5)));
    let events = d.events();
    let release_of = |pid: i32| -> Value {
        let all: Vec<&Value> = events
            .iter()
            .filter(|v| is_release(v) && v["pid"] == pid)
            .collect();
        assert_eq!(all.len(), 1, "{all:?}");
        all[0].clone()
    };
    let r = release_of(closer.pid());
    assert_eq!(
        (
            r["level"].as_str(),
            r["message"].as_str(),
            r["result"].as_str()
        ),
        (
            Some("INFO"),
            Some("owner released the fd"),
            Some("released")
        ),
        "{r}"
    );
    assert_eq!(field_i64(&r, "fd"), i64::from(c.1));
    let r = release_of(leaker.pid());
    assert_eq!(r["level"], "WARN", "{r}");
    assert!(
        field_str(&r, "message").starts_with("owner still holds the fd"),
        "{r}"
    );
    assert_eq!(field_str(&r, "result"), "still_held");
    assert_eq!(field_i64(&r, "fd"), i64::from(l.1));
    assert!(field_i64(&r, "waited_ms") >= 1000, "grace under 1 s: {r}");

    let audit_release: Vec<(String, i64, String)> = audit_lines(&audit)
        .iter()
        .filter(|v| v["event"] == "fd_release")
        .map(|v| {
            (
                field_str(v, "target").to_owned(),
                field_i64(v, "pid"),
                field_str(v, "result").to_owned(),
            )
        })
        .collect();
    let mut audit_release = audit_release;
    audit_release.sort();
    assert_eq!(
        audit_release,
        vec![
            (
                "closer".to_owned(),
                i64::from(closer.pid()),
                "released".to_owned()
            ),
            (
                "leaker".to_owned(),
                i64::from(leaker.pid()),
                "still_held".to_owned()
            ),
        ]
    );
    // And it is so: the closer let go of its fd, the leaker still holds the socket.
    assert_eq!(
        closer.maybe_line("released ", Duration::from_secs(5)),
        Some(c.1.to_string())
    );
    assert_eq!(fd_inode(closer.pid(), c.1), None);
    assert_eq!(fd_inode(leaker.pid(), l.1), Some(leaked_inode));
}

// ---------------------------------------------------------------------------------------
// Signals and reloads.

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn sighup_applies_a_new_policy_to_sockets_already_reported() {
    let scratch = Scratch::new("hup-ok", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let mut conns: Vec<_> = (0..2).map(|_| fx.close_wait(0)).collect();

    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(true).target("fixture", pid, "1s", &[]).yaml(),
    );
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    let reported = wait_outcomes(&mut d, pid, "dry_run", 2);
    notify.cycles(2);
    assert_eq!(reported, fd_set(&conns));
    assert!(fds_with(&d.events(), pid, "reaped").is_empty());
    assert_eq!(ss_close_wait(pid).len(), 2);
    assert_no_eof(&mut conns);

    // The operator reviewed the dry run and now enforces.
    write_policy(
        &cfg,
        &Policy::new(false).target("fixture", pid, "1s", &[]).yaml(),
    );
    d.signal(Signal::HUP);
    d.wait_events("the reload", Duration::from_secs(5), |ev| {
        ev.iter()
            .any(|v| message_is(v, "config reloaded") && v["level"] == "INFO")
            .then_some(())
    });
    let reaped = wait_outcomes(&mut d, pid, "reaped", 2);
    d.stop();
    assert_eq!(reaped, fd_set(&conns));
    assert_eof(&mut conns);
    assert!(ss_close_wait(pid).is_empty());
}

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE), and refuses a group-writable policy only when run as root"]
fn sighup_with_a_bad_policy_keeps_the_old_one() {
    let scratch = Scratch::new("hup-bad", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let mut first = vec![fx.close_wait(0)];

    let cfg = scratch.path("cwreap.yaml");
    let good = Policy::new(false).target("fixture", pid, "1s", &[]).yaml();
    write_policy(&cfg, &good);
    let mut d = Running::start(&cfg, &[], &[]);
    wait_outcomes(&mut d, pid, "reaped", 1);
    assert_eof(&mut first);

    let rejections = |ev: &[Value]| -> Vec<String> {
        ev.iter()
            .filter(|v| {
                message_is(v, "config reload rejected; keeping the previous config")
                    && v["level"] == "ERROR"
            })
            .map(|v| field_str(v, "error").to_owned())
            .collect()
    };
    // An unknown key, and dry_run: true that must not leak into the running policy.
    let bad = Policy::new(true).target("fixture", pid, "1s", &[]).yaml() + "frobnicate: 1\n";
    let bad_line = bad.lines().count();
    write_policy(&cfg, &bad);
    d.signal(Signal::HUP);
    let errors = d.wait_events("the rejection", Duration::from_secs(5), |ev| {
        let r = rejections(ev);
        (!r.is_empty()).then_some(r)
    });
    let want = format!("{}:{bad_line}:1: unknown key `frobnicate`", cfg.display());
    assert!(
        errors[0].starts_with(&want),
        "{errors:?} should start with {want}"
    );
    let mut second = vec![fx.close_wait(0)];
    let fds = wait_outcomes(&mut d, pid, "reaped", 2);
    assert!(
        fds.contains(&second[0].1),
        "still enforcing after the rejection"
    );
    assert_eof(&mut second);

    // A valid policy in a group-writable file is refused as well.
    write_policy(
        &cfg,
        &Policy::new(true).target("fixture", pid, "1s", &[]).yaml(),
    );
    std::fs::set_permissions(&cfg, Permissions::from_mode(0o664)).expect("chmod 664");
    d.signal(Signal::HUP);
    let errors = d.wait_events("the second rejection", Duration::from_secs(5), |ev| {
        let r = rejections(ev);
        (r.len() >= 2).then_some(r)
    });
    assert!(errors[1].contains("writable by group"), "{errors:?}");
    let mut third = vec![fx.close_wait(0)];
    let fds = wait_outcomes(&mut d, pid, "reaped", 3);
    d.stop();
    assert!(
        fds.contains(&third[0].1),
        "still enforcing after the second rejection"
    );
    assert_eof(&mut third);
    assert!(
        fds_with(&d.events(), pid, "dry_run").is_empty(),
        "{}",
        d.log()
    );
    assert!(!d.log().contains("config reloaded"), "{}", d.log());
}

#[test]
fn sd_notify_ready_status_watchdog_and_reloading() {
    let scratch = Scratch::new("notify", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let _conns: Vec<_> = (0..2).map(|_| fx.close_wait(0)).collect();
    let cfg = scratch.path("cwreap.yaml");
    // One cycle a second, the watchdog at 400 ms: only the pings between cycles keep it fed.
    write_policy(
        &cfg,
        &Policy::new(true)
            .interval("1s")
            .target("fixture", pid, "1h", &[])
            .yaml(),
    );
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::spawn(
        &cfg,
        &[],
        &[notify.env(), ("WATCHDOG_USEC", "400000".into())],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let first = notify.next(deadline).expect("no message from the daemon");
    assert_eq!(first.trim(), "READY=1", "READY=1 comes first");

    // 2.5 s: at least two cycles (one a second), the watchdog fed in between, while
    // connections enter and leave CLOSE_WAIT every 20 ms, as on a busy host: with events,
    // each wakes the daemon between cycles to read them, and none may put a ping off.
    let churning = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let churn = {
        let churning = churning.clone();
        std::thread::spawn(move || {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            let addr = l.local_addr().expect("address");
            let mut made = 0;
            while churning.load(std::sync::atomic::Ordering::Relaxed) {
                let c = TcpStream::connect(addr).expect("connect");
                let (s, _) = l.accept().expect("accept");
                c.shutdown(Shutdown::Write).expect("half-close");
                std::thread::sleep(Duration::from_millis(20));
                drop(s);
                drop(c);
                made += 1;
            }
            made
        })
    };
    std::thread::sleep(Duration::from_millis(2500));
    churning.store(false, std::sync::atomic::Ordering::Relaxed);
    let made = churn.join().expect("the churn thread");
    assert!(made >= 50, "only {made} connections churned");
    let all = notify.all();
    let after_ready = &all[1..];
    let statuses = notify.statuses();
    assert!(statuses.len() >= 2, "{after_ready:?}");
    for s in &statuses {
        assert_eq!(status_counts(s), (2, 0, 0), "{s}");
    }
    let is_ping = |m: &str| m.lines().any(|l| l == "WATCHDOG=1");
    // Each cycle ends with STATUS= then WATCHDOG=1.
    for (i, (_, m)) in after_ready.iter().enumerate() {
        if status_of(m).is_some()
            && let Some((_, next)) = after_ready.get(i + 1)
        {
            assert!(
                is_ping(next),
                "no WATCHDOG=1 right after {m:?}: {after_ready:?}"
            );
        }
    }
    // While it sleeps until the next cycle, it pings every WATCHDOG_USEC / 2. (How long a
    // cycle itself may take is what the watchdog is there to judge.)
    let mut gaps = Vec::new();
    let mut last_ping: Option<Instant> = None;
    for (t, m) in after_ready {
        if status_of(m).is_some() {
            last_ping = None;
        } else if is_ping(m) {
            if let Some(p) = last_ping {
                gaps.push(*t - p);
            }
            last_ping = Some(*t);
        }
    }
    assert!(gaps.len() >= 4, "too few WATCHDOG=1: {after_ready:?}");
    let longest = gaps.iter().max().expect("gaps");
    assert!(
        *longest < Duration::from_millis(400),
        "a {longest:?} gap between WATCHDOG=1 would trip a 400 ms watchdog: {gaps:?}"
    );

    notify.skip();
    d.signal(Signal::HUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    let reloading = loop {
        let m = notify.next(deadline).expect("no RELOADING=1");
        if m.lines().any(|l| l == "RELOADING=1") {
            break m;
        }
    };
    assert!(
        reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{reloading:?}"
    );
    loop {
        let m = notify.next(deadline).expect("no READY=1 after the reload");
        if m.lines().any(|l| l == "READY=1") {
            break;
        }
    }
    d.stop();
}

#[test]
fn sigterm_and_sigint_stop_the_daemon_with_status_0() {
    let scratch = Scratch::new("stop", 0o700);
    let fx = Fixture::start(&[V4], &[]);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(false)
            .interval("1s")
            .target("fixture", fx.pid(), "1s", &[])
            .yaml(),
    );
    // At once (while the first cycle runs), and while it sleeps after a cycle.
    for (sig, name, after_a_cycle) in [
        (Signal::TERM, "SIGTERM", false),
        (Signal::TERM, "SIGTERM", true),
        (Signal::INT, "SIGINT", false),
        (Signal::INT, "SIGINT", true),
    ] {
        let mut notify = Notify::bind(scratch.path(&format!("notify-{name}-{after_a_cycle}")));
        let mut d = Running::start(&cfg, &[], &[notify.env()]);
        if after_a_cycle {
            notify.cycles(1);
        }
        let sent = Instant::now();
        d.signal(sig);
        // A hang guard, not the requirement: `cargo bench --bench scale` reports the time
        // to exit (under a second).
        let status = d
            .wait_exit(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("still running 5 s after {name}; log:\n{}", d.log()));
        let took = sent.elapsed();
        assert_eq!(
            status.code(),
            Some(0),
            "{name}: {status}; log:\n{}",
            d.log()
        );
        println!("{name}: exited in {took:?}");
        assert!(
            d.events().iter().any(|v| v["signal"] == name
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("stopping"))),
            "{}",
            d.log()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Start-up and `check`.

/// A policy with a typo on line 5, column 5.
fn typo_policy() -> &'static str {
    "interval: 200ms\ndry_run: false\ntargets:\n  - name: fixture\n    older_then: 1s\n    match: {pid: 1}\n"
}

#[test]
fn bad_policy_at_start_exits_2_with_file_line_col() {
    let scratch = Scratch::new("bad-start", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(&cfg, typo_policy());
    let mut d = Running::spawn(&cfg, &[], &[]);
    let status = d
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("a bad policy did not stop start-up; log:\n{}", d.log()));
    assert_eq!(status.code(), Some(2), "{}", d.log());
    let want = format!(
        "cwreap: {}:5:5: unknown key `older_then` in target `fixture`; did you mean `older_than`?",
        cfg.display()
    );
    assert!(d.lines().contains(&want), "want {want:?} in:\n{}", d.log());
    assert!(!d.log().contains("cwreap started"), "{}", d.log());
}

#[test]
fn check_prints_the_effective_policy_or_the_error() {
    let scratch = Scratch::new("check", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(false)
            .target("fixture", 4242, "90s", &["min_close_wait: 3"])
            .yaml(),
    );
    let path = cfg.display().to_string();
    let out = cwreap(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert_eq!(
        text.lines().next(),
        Some(format!("{path}: OK").as_str()),
        "{text}"
    );
    for line in [
        "interval: \"200ms\"",
        "dry_run: false",
        "log_format: json",
        "  max_reaps_per_cycle: 100",
        "  listen: \"off\"",
        "  - name: \"fixture\"",
        "      pid: 4242",
        "    older_than: \"1m 30s\"",
        "    min_close_wait: 3",
        "    action: shutdown",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }

    write_policy(&cfg, typo_policy());
    let out = cwreap(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).starts_with(&format!("cwreap: {path}:5:5: unknown key `older_then`")),
        "{}",
        stderr(&out)
    );
    assert!(!stdout(&out).contains("OK"), "{}", stdout(&out));
}

#[test]
fn interval_floor_and_metrics_off_as_the_readme_writes_it() {
    let scratch = Scratch::new("floors", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    let path = cfg.display().to_string();
    let body = "targets:\n  - name: t\n    match: {pid: 4242}\n    older_than: 1m\n";

    // Below the floor: refused by run and by check, exit 2, the floor named at the value.
    write_policy(&cfg, &format!("interval: 99ms\nmetrics: off\n{body}"));
    let want = format!(
        "cwreap: {path}:1:11: `interval`: `99ms` is below the floor of 100ms; a shorter \
         interval would keep a core busy"
    );
    let mut d = Running::spawn(&cfg, &[], &[]);
    let status = d
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("interval: 99ms was accepted; log:\n{}", d.log()));
    assert_eq!(status.code(), Some(2), "{}", d.log());
    assert!(d.lines().contains(&want), "want {want:?} in:\n{}", d.log());
    assert!(!d.log().contains("cwreap started"), "{}", d.log());
    let out = cwreap(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert_eq!(stderr(&out).trim_end(), want);

    // `metrics: off`, as the README shows it, and the floor itself: fine.
    write_policy(&cfg, &format!("interval: 100ms\nmetrics: off\n{body}"));
    let out = cwreap(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.lines().any(|l| l == "  listen: \"off\""), "{text}");
    assert!(text.lines().any(|l| l == "interval: \"100ms\""), "{text}");
    // The block form still works.
    write_policy(&cfg, &format!("metrics: {{listen: off}}\n{body}"));
    let out = cwreap(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn check_warns_about_a_target_an_earlier_one_shadows() {
    let scratch = Scratch::new("shadow", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    let path = cfg.display().to_string();
    write_policy(
        &cfg,
        "metrics: off\ntargets:\n  - name: all\n    match: {comm: ^api$}\n    older_than: 1h\n    \
         action: log\n  - name: admin\n    match: {comm: ^api$, local_ports: [9090]}\n    \
         older_than: 1m\n    action: shutdown\n  - name: web\n    match: {comm: ^web$}\n    \
         older_than: 1m\n",
    );
    let out = cwreap(&["check", "--config", &path]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "a warning is not an error: {}",
        stderr(&out)
    );
    let warnings: Vec<String> = stderr(&out).lines().map(str::to_owned).collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].starts_with(&format!(
            "{path}:7:5: warning: target `admin` never acts: target `all` (line 3) comes first"
        )),
        "{warnings:?}"
    );
    assert!(
        stdout(&out).contains("# WARNING: target `admin` never acts"),
        "{}",
        stdout(&out)
    );
}

#[test]
#[ignore = "needs root: cwreap refuses a group-writable policy only when it runs as root"]
fn group_writable_policy_is_refused() {
    let scratch = Scratch::new("group-writable", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(false).target("fixture", 4242, "1s", &[]).yaml(),
    );
    std::fs::set_permissions(&cfg, Permissions::from_mode(0o664)).expect("chmod 664");
    let path = cfg.display().to_string();

    let mut d = Running::spawn(&cfg, &[], &[]);
    let status = d
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("a group-writable policy was accepted; log:\n{}", d.log()));
    assert_eq!(status.code(), Some(2), "{}", d.log());
    let log = d.log();
    assert!(
        log.contains(&format!("cwreap: {path}: refusing the policy"))
            && log.contains("writable by group (mode 0664)")
            && log.contains("chmod 600"),
        "{log}"
    );
    assert!(!log.contains("cwreap started"), "{log}");

    let out = cwreap(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("writable by group"),
        "{}",
        stderr(&out)
    );

    // The same file, fixed, is fine.
    std::fs::set_permissions(&cfg, Permissions::from_mode(0o600)).expect("chmod 600");
    let out = cwreap(&["check", "--config", &path]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------------------
// fd headroom.

#[test]
fn fd_headroom_warns_at_80_and_95_percent_once_each() {
    let scratch = Scratch::new("headroom", 0o700);
    let mut fx = Fixture::start(&[V4], &[]);
    let pid = fx.pid();
    let limit = 20u64;
    rustix::process::prlimit(
        Some(Pid::from_raw(pid).expect("pid")),
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(limit),
            maximum: Some(limit),
        },
    )
    .expect("lower the fixture's RLIMIT_NOFILE");
    let open = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fixture fds")
            .count() as u64
    };
    let mut conns = Vec::new();
    while open() < limit * 80 / 100 - 1 {
        conns.push(fx.connect(0));
    }
    assert_eq!(open(), limit * 80 / 100 - 1, "one fd under 80 %");

    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &Policy::new(false).target("fixture", pid, "1h", &[]).yaml(),
    );
    let mut notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::start(&cfg, &[], &[notify.env()]);
    notify.cycles(2);
    let warnings = |ev: &[Value]| -> Vec<Value> {
        ev.iter()
            .filter(|v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("process is close to its fd limit"))
                    && v["pid"] == pid
            })
            .cloned()
            .collect()
    };
    assert!(
        warnings(&d.events()).is_empty(),
        "warned under 80 %:\n{}",
        d.log()
    );

    conns.push(fx.connect(0)); // 16 of 20: 80 %
    let w = d.wait_events("the 80 % warning", Duration::from_secs(5), |ev| {
        warnings(ev).first().cloned()
    });
    assert_eq!(w["level"], "WARN", "{w}");
    assert_eq!(w["threshold_pct"], 80, "{w}");
    assert_eq!(w["fd_limit"], limit, "{w}");
    assert_eq!(w["open_fds"], 16, "{w}");
    notify.cycles(2);
    assert_eq!(
        warnings(&d.events()).len(),
        1,
        "warned twice at 80 %:\n{}",
        d.log()
    );

    while open() < limit * 95 / 100 {
        conns.push(fx.connect(0));
    }
    let w = d.wait_events("the 95 % warning", Duration::from_secs(5), |ev| {
        warnings(ev).get(1).cloned()
    });
    d.stop();
    assert_eq!(w["threshold_pct"], 95, "{w}");
    assert_eq!(w["open_fds"], 19, "{w}");
    assert_eq!(warnings(&d.events()).len(), 2, "{}", d.log());
}
