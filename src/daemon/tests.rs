//! The daemon's logic on a recording kernel: decisions, rate limits, escalations, release
//! verdicts, reloads, and what a cycle does when a step fails. No root, no sockets: the
//! double serves scripted processes and sockets, applies effects as the kernel would and
//! records every call, and time moves only when a test moves it.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cwreap_linux::kernel::fake::{Call, FakeKernel, Fd, NETNS, Process, World};
use cwreap_linux::kernel::{SocketKey, key_of};
use cwreap_linux::netlink::DumpError;
use cwreap_linux::tcp;
use serde_json::Value;

use super::cycle_report::{CycleReport, ErrorKind, EscalationKind, Release};
use super::engine::{Daemon, RECONCILE_EVERY};
use super::metrics::Health;
use crate::shared::act::{Outcome, Reason};
use crate::shared::attribute::Holder;
use crate::shared::config::{self, Action, Config};

const API: i32 = 100;
const WEB: i32 = 200;
const LOCAL: &str = "10.0.0.1:8080";

fn cfg(yaml: &str) -> Config {
    config::parse(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// A policy: `top` lines, then the targets, each a `name: ...` block of YAML lines.
fn policy(top: &str, targets: &[&str]) -> String {
    let mut y = format!(
        "interval: 5s\ndry_run: false\nmetrics: {{listen: off}}\nlimits: {{max_reaps_per_cycle: 1000, max_reaps_per_minute: 100000}}\n{top}targets:\n"
    );
    for t in targets {
        let mut lines = t.lines();
        if let Some(first) = lines.next() {
            y.push_str(&format!("  - {first}\n"));
        }
        for l in lines {
            y.push_str(&format!("    {l}\n"));
        }
    }
    y
}

/// A shutdown target on one pid, due after `older_than`.
fn on_pid(name: &str, pid: i32, older_than: &str) -> String {
    format!("name: {name}\nmatch: {{pid: {pid}}}\nolder_than: {older_than}\naction: shutdown")
}

fn daemon(k: FakeKernel, yaml: &str) -> Daemon<FakeKernel> {
    Daemon::with_kernel(k, cfg(yaml), false, Health::default()).expect("daemon")
}

/// A writer that keeps what the daemon logs.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
    type Writer = Capture;
    fn make_writer(&'a self) -> Capture {
        self.clone()
    }
}

/// One cycle, with the JSON events it logged.
fn cycle_logged(d: &mut Daemon<FakeKernel>) -> (CycleReport, Vec<Value>) {
    let buf = Capture::default();
    let sub = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_max_level(tracing::Level::INFO)
        .with_writer(buf.clone())
        .finish();
    let stop = AtomicBool::new(false);
    let report = tracing::subscriber::with_default(sub, || d.cycle(&stop));
    let text = buf
        .0
        .lock()
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default();
    let events = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    (report, events)
}

fn cycle(d: &mut Daemon<FakeKernel>) -> CycleReport {
    d.cycle(&AtomicBool::new(false))
}

/// Move the double's clock on by `ms`, then run a cycle.
fn after_ms(d: &mut Daemon<FakeKernel>, ms: u64) -> CycleReport {
    d.kernel().advance(Duration::from_millis(ms));
    cycle(d)
}

/// Move the double's clock on, then run a cycle.
fn after(d: &mut Daemon<FakeKernel>, secs: u64) -> CycleReport {
    d.kernel().advance(Duration::from_secs(secs));
    cycle(d)
}

fn outcomes(r: &CycleReport, target: &str, action: Action, outcome: Outcome) -> usize {
    r.outcomes
        .get(&(target.to_owned(), action, outcome))
        .copied()
        .unwrap_or(0)
}

fn reaped(r: &CycleReport, target: &str) -> usize {
    outcomes(r, target, Action::Shutdown, Outcome::Reaped)
}

fn total(r: &CycleReport) -> usize {
    r.outcomes.values().sum()
}

/// A kernel with process `pid` named `comm`.
fn with_process(pid: i32, comm: &str) -> FakeKernel {
    let k = FakeKernel::new();
    k.spawn(Process::new(pid, comm));
    k
}

fn remote(i: u16) -> String {
    format!("10.0.0.9:{}", 50_000 + i)
}

fn messages<'a>(events: &'a [Value], message: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["message"] == message).collect()
}

// ---------------------------------------------------------------------------------------
// Decisions.

#[test]
fn a_socket_is_reaped_once_older_than_the_threshold_and_not_before() {
    let k = with_process(API, "api");
    let s = k.close_wait(API, 7, LOCAL, &remote(1));
    let inode = k.with(|w| w.sockets.get(&s).map_or(0, |x| x.diag.inode));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "30s")]));
    let r = cycle(&mut d);
    assert_eq!(r.candidates, 1);
    assert_eq!(total(&r), 0, "first seen now: 0 s old");
    assert_eq!(total(&after(&mut d, 29)), 0, "29 s old");
    let r = after(&mut d, 1);
    assert_eq!(reaped(&r, "api"), 1, "{:?}", r.outcomes);
    assert_eq!(d.kernel().shutdowns(), [(API, 7, inode)]);
    assert_eq!(d.kernel().state(s), Some(tcp::CLOSE));
    assert_eq!(total(&after(&mut d, 30)), 0, "left CLOSE_WAIT: never again");
}

#[test]
fn the_last_ack_age_counts_when_it_is_larger_than_first_sight() {
    let k = with_process(API, "api");
    let s = k.close_wait(API, 7, LOCAL, &remote(1));
    k.with(|w| {
        if let Some(x) = w.sockets.get_mut(&s) {
            x.diag.last_ack_recv_ms = Some(45_000);
        }
    });
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "30s")]));
    let r = cycle(&mut d);
    assert_eq!(reaped(&r, "api"), 1, "tcp_info says 45 s: {:?}", r.outcomes);
}

#[test]
fn dry_run_reports_each_socket_once_and_shuts_nothing_down() {
    let k = with_process(API, "api");
    k.close_wait_many(API, 10, 3, LOCAL);
    let y = policy("", &[&on_pid("api", API, "1s")]).replace("dry_run: false", "dry_run: true");
    let mut d = daemon(k, &y);
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(outcomes(&r, "api", Action::Shutdown, Outcome::DryRun), 3);
    assert_eq!(total(&after(&mut d, 2)), 0, "reported once");
    assert!(d.kernel().shutdowns().is_empty());
    assert_eq!(
        d.kernel()
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Duplicate { .. }))
            .count(),
        3,
        "a dry run still proves it can duplicate each socket"
    );
}

#[test]
fn the_dry_run_flag_overrides_an_enforcing_policy() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = Daemon::with_kernel(
        k,
        cfg(&policy("", &[&on_pid("api", API, "1s")])),
        true,
        Health::default(),
    )
    .expect("daemon");
    assert!(d.dry_run());
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(outcomes(&r, "api", Action::Shutdown, Outcome::DryRun), 1);
    assert!(d.kernel().shutdowns().is_empty());
}

#[test]
fn a_target_may_enforce_under_a_dry_run_policy() {
    let k = with_process(API, "api");
    k.spawn(Process::new(WEB, "web"));
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.close_wait(WEB, 7, LOCAL, &remote(2));
    let y = policy(
        "",
        &[
            &format!("{}\ndry_run: false", on_pid("api", API, "1s")),
            &on_pid("web", WEB, "1s"),
        ],
    )
    .replace("dry_run: false\nmetrics", "dry_run: true\nmetrics");
    let mut d = daemon(k, &y);
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(reaped(&r, "api"), 1, "{:?}", r.outcomes);
    assert_eq!(outcomes(&r, "web", Action::Shutdown, Outcome::DryRun), 1);
}

#[test]
fn exclusions_spare_peers_and_ports() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, "192.168.1.5:40000");
    k.close_wait(API, 8, LOCAL, "10.0.0.9:6379");
    k.close_wait(API, 9, LOCAL, "10.0.0.9:40001");
    let t = format!(
        "{}\nexclude: {{remote_cidrs: [192.168.0.0/16], remote_ports: [6379]}}",
        on_pid("api", API, "1s")
    );
    let mut d = daemon(k, &policy("", &[&t]));
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(reaped(&r, "api"), 1, "{:?}", r.outcomes);
    assert_eq!(d.kernel().shutdowns().len(), 1);
    assert_eq!(
        d.kernel().shutdowns()[0].1,
        9,
        "only the socket nothing excludes"
    );
}

#[test]
fn local_ports_select_a_servers_sockets_and_not_its_clients() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.close_wait(API, 8, "10.0.0.1:45000", "10.0.0.7:5432");
    let t = "name: api\nmatch: {pid: 100, local_ports: [8080]}\nolder_than: 1s\naction: shutdown";
    let mut d = daemon(k, &policy("", &[t]));
    let r = cycle(&mut d);
    assert_eq!(
        r.candidates, 1,
        "only the listener port's socket is the target's"
    );
    let r = after(&mut d, 2);
    assert_eq!(reaped(&r, "api"), 1);
    assert_eq!(d.kernel().shutdowns()[0].1, 7);
}

#[test]
fn two_targets_on_one_process_split_its_sockets_by_port() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, "10.0.0.1:8080", &remote(1));
    k.close_wait(API, 8, "10.0.0.1:9090", &remote(2));
    let a =
        "name: public\nmatch: {pid: 100, local_ports: [8080]}\nolder_than: 1s\naction: shutdown";
    let b = "name: admin\nmatch: {pid: 100}\nolder_than: 1s\naction: log";
    let mut d = daemon(k, &policy("", &[a, b]));
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(reaped(&r, "public"), 1, "{:?}", r.outcomes);
    assert_eq!(outcomes(&r, "admin", Action::Log, Outcome::Logged), 1);
}

#[test]
fn min_close_wait_waits_for_enough_sockets_of_the_process() {
    let k = with_process(API, "api");
    k.close_wait_many(API, 10, 2, LOCAL);
    let t = format!("{}\nmin_close_wait: 3", on_pid("api", API, "1s"));
    let mut d = daemon(k, &policy("", &[&t]));
    cycle(&mut d);
    assert_eq!(total(&after(&mut d, 2)), 0, "two are not enough");
    d.kernel().close_wait(API, 20, LOCAL, &remote(9));
    let r = after(&mut d, 2);
    assert_eq!(
        reaped(&r, "api"),
        2,
        "three now: the two old enough go {:?}",
        r.outcomes
    );
    assert_eq!(
        total(&after(&mut d, 5)),
        0,
        "the last one alone is below min_close_wait"
    );
}

#[test]
fn the_log_action_reports_and_never_touches_a_socket() {
    let k = with_process(API, "api");
    let socks = k.close_wait_many(API, 10, 5, LOCAL);
    let t = "name: api\nmatch: {pid: 100}\nolder_than: 1s\naction: log";
    let y = policy("", &[t]).replace("max_reaps_per_cycle: 1000", "max_reaps_per_cycle: 1");
    let mut d = daemon(k, &y);
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(
        outcomes(&r, "api", Action::Log, Outcome::Logged),
        5,
        "never capped"
    );
    assert_eq!(r.deferred, 0);
    assert!(
        d.kernel()
            .calls()
            .iter()
            .all(|c| !matches!(c, Call::Duplicate { .. } | Call::Shutdown { .. })),
        "log duplicates nothing"
    );
    assert!(
        socks
            .iter()
            .all(|s| d.kernel().state(*s) == Some(tcp::CLOSE_WAIT))
    );
}

#[test]
fn never_acts_on_its_own_process_even_when_the_policy_names_it() {
    let me = i32::try_from(std::process::id()).expect("pid");
    let k = with_process(me, "cwreap");
    k.close_wait(me, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("me", me, "1s")]));
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(r.candidates, 0);
    assert!(r.outcomes.is_empty());
    assert!(
        !d.kernel().calls().contains(&Call::FdTable { pid: me }),
        "its fd table is not even read"
    );
}

#[test]
fn the_oldest_sockets_go_first_under_the_per_cycle_cap() {
    let k = with_process(API, "api");
    let old = k.close_wait_many(API, 10, 2, LOCAL);
    let mut d = daemon(
        k,
        &policy("", &[&on_pid("api", API, "5s")])
            .replace("max_reaps_per_cycle: 1000", "max_reaps_per_cycle: 2"),
    );
    cycle(&mut d);
    d.kernel().advance(Duration::from_secs(3));
    let young = d.kernel().close_wait_many(API, 20, 3, LOCAL);
    cycle(&mut d);
    let r = after(&mut d, 6);
    assert_eq!(reaped(&r, "api"), 2);
    assert_eq!(r.deferred, 3, "the rest waits");
    assert!(old.iter().all(|s| d.kernel().state(*s) == Some(tcp::CLOSE)));
    let r = after(&mut d, 5);
    assert_eq!((reaped(&r, "api"), r.deferred), (2, 1));
    let r = after(&mut d, 5);
    assert_eq!((reaped(&r, "api"), r.deferred), (1, 0));
    assert!(
        young
            .iter()
            .all(|s| d.kernel().state(*s) == Some(tcp::CLOSE))
    );
}

#[test]
fn the_per_minute_cap_holds_across_cycles_and_frees_after_a_minute() {
    let k = with_process(API, "api");
    k.close_wait_many(API, 10, 10, LOCAL);
    let mut d = daemon(
        k,
        &policy("", &[&on_pid("api", API, "1s")])
            .replace("max_reaps_per_minute: 100000", "max_reaps_per_minute: 4"),
    );
    cycle(&mut d);
    assert_eq!(reaped(&after(&mut d, 2), "api"), 4);
    assert_eq!(reaped(&after(&mut d, 5), "api"), 0, "4 this minute already");
    assert_eq!(reaped(&after(&mut d, 30), "api"), 0);
    let r = after(&mut d, 25);
    assert_eq!(
        reaped(&r, "api"),
        4,
        "a minute after the first reaps: {:?}",
        r
    );
    assert_eq!(r.deferred, 2);
}

#[test]
fn destroy_resets_through_sock_diag_and_reaches_unaccepted_connections() {
    let k = with_process(API, "api");
    k.listener(API, 3, "10.0.0.1:8080");
    let queued = k.unaccepted(API, LOCAL, &remote(1));
    let held = k.close_wait(API, 7, LOCAL, &remote(2));
    let t = "name: api\nmatch: {pid: 100}\nolder_than: 1s\naction: destroy";
    let mut d = daemon(k, &policy("", &[t]));
    let r = cycle(&mut d);
    assert_eq!(
        r.candidates, 2,
        "the queued one belongs to the listener's owner"
    );
    let r = after(&mut d, 2);
    assert_eq!(
        outcomes(&r, "api", Action::Destroy, Outcome::Reaped),
        2,
        "{:?}",
        r.outcomes
    );
    let destroyed: Vec<SocketKey> = d
        .kernel()
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Destroy { key } => Some(key),
            _ => None,
        })
        .collect();
    assert_eq!(destroyed.len(), 2);
    assert!(destroyed.contains(&queued) && destroyed.contains(&held));
    assert!(
        d.kernel().shutdowns().is_empty(),
        "destroy never duplicates"
    );
}

#[test]
fn shutdown_skips_a_connection_still_in_the_accept_queue() {
    let k = with_process(API, "api");
    k.listener(API, 3, "10.0.0.1:8080");
    k.unaccepted(API, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(outcomes(&r, "api", Action::Shutdown, Outcome::Skipped), 1);
    assert!(d.kernel().shutdowns().is_empty());
}

#[test]
fn an_unsupported_sock_destroy_is_said_once_and_not_tried_again() {
    let k = with_process(API, "api");
    k.close_wait_many(API, 10, 2, LOCAL);
    k.with(|w| w.faults.no_destroy = true);
    let t = "name: api\nmatch: {pid: 100}\nolder_than: 1s\naction: destroy";
    let mut d = daemon(k, &policy("", &[t]));
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(outcomes(&r, "api", Action::Destroy, Outcome::Error), 2);
    assert_eq!(r.errors.get(&ErrorKind::Act), Some(&2));
    let tried = |d: &Daemon<FakeKernel>| {
        d.kernel()
            .calls()
            .iter()
            .filter(|c| matches!(c, Call::Destroy { .. }))
            .count()
    };
    assert_eq!(
        tried(&d),
        1,
        "the second socket was not tried once the first said EOPNOTSUPP"
    );
}

// ---------------------------------------------------------------------------------------
// Faults between attribution and action, and failed steps.

fn exit_api(w: &mut World) {
    if let Some(p) = w.processes.get_mut(&API) {
        p.alive = false;
    }
}

#[test]
fn a_target_exiting_before_the_action_is_gone_and_the_next_cycle_runs() {
    let k = with_process(API, "api");
    k.spawn(Process::new(WEB, "web"));
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.close_wait(WEB, 7, LOCAL, &remote(2));
    let mut d = daemon(
        k,
        &policy("", &[&on_pid("api", API, "1s"), &on_pid("web", WEB, "1s")]),
    );
    cycle(&mut d);
    d.kernel()
        .with(|w| w.before_first_duplicate = Some(exit_api));
    d.kernel().advance(Duration::from_secs(2));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(
        outcomes(&r, "api", Action::Shutdown, Outcome::Gone),
        1,
        "{:?}",
        r.outcomes
    );
    assert_eq!(reaped(&r, "web"), 1);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let ev: Vec<&Value> = messages(&events, "close_wait action")
        .into_iter()
        .filter(|e| e["pid"] == API)
        .collect();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["outcome"], "gone");
    assert_eq!(ev[0]["detail"], "process exited");
    d.kernel().close_wait(WEB, 8, LOCAL, &remote(3));
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(
        reaped(&r, "web"),
        1,
        "the next cycles go on without the dead target"
    );
    assert!(r.errors.is_empty());
}

fn api_closes_fd_7(w: &mut World) {
    if let Some(p) = w.processes.get_mut(&API) {
        p.fds.remove(&7);
    }
}

#[test]
fn an_fd_closed_before_the_action_is_gone() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.close_wait(API, 8, LOCAL, &remote(2));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    d.kernel()
        .with(|w| w.before_first_duplicate = Some(api_closes_fd_7));
    d.kernel().advance(Duration::from_secs(2));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(
        outcomes(&r, "api", Action::Shutdown, Outcome::Gone),
        1,
        "{:?}",
        r.outcomes
    );
    assert_eq!(reaped(&r, "api"), 1);
    let gone = messages(&events, "close_wait action")
        .into_iter()
        .find(|e| e["fd"] == 7)
        .expect("fd 7 logged");
    assert_eq!(gone["detail"], "fd was closed by its owner");
}

fn api_reuses_fd_7_for_a_file(w: &mut World) {
    if let Some(p) = w.processes.get_mut(&API) {
        p.fds.insert(7, Fd::File);
    }
}

fn api_reuses_fd_7_for_another_socket(w: &mut World) {
    let Some(mut other) = w.sockets.values().next().cloned() else {
        return;
    };
    other.diag.inode = 4_000_000;
    other.diag.cookie = 999_999;
    other.diag.state = tcp::ESTABLISHED;
    w.sockets.insert(key_of(&other.diag), other);
    if let Some(p) = w.processes.get_mut(&API) {
        p.fds.insert(7, Fd::Socket(4_000_000));
    }
}

#[test]
fn an_fd_reused_for_a_non_socket_or_another_socket_is_changed_and_untouched() {
    for (hook, detail) in [
        (
            api_reuses_fd_7_for_a_file as fn(&mut World),
            "fd 7 is no longer a socket",
        ),
        (api_reuses_fd_7_for_another_socket, "inode"),
    ] {
        let k = with_process(API, "api");
        let s = k.close_wait(API, 7, LOCAL, &remote(1));
        k.close_wait(API, 8, LOCAL, &remote(2));
        let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
        cycle(&mut d);
        d.kernel().with(|w| w.before_first_duplicate = Some(hook));
        d.kernel().advance(Duration::from_secs(2));
        let (r, events) = cycle_logged(&mut d);
        assert_eq!(
            outcomes(&r, "api", Action::Shutdown, Outcome::Changed),
            1,
            "{detail}"
        );
        assert_eq!(reaped(&r, "api"), 1);
        let ev = messages(&events, "close_wait action")
            .into_iter()
            .find(|e| e["fd"] == 7)
            .expect("fd 7 logged");
        assert!(
            ev["detail"].as_str().is_some_and(|t| t.contains(detail)),
            "{ev}"
        );
        assert!(
            d.kernel().shutdowns().iter().all(|(_, fd, _)| *fd != 7),
            "nothing shut down through fd 7"
        );
        assert_eq!(d.kernel().state(s), Some(tcp::CLOSE_WAIT));
    }
}

#[test]
fn a_socket_that_left_close_wait_before_the_action_is_changed() {
    let k = with_process(API, "api");
    let s = k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    fn closes(w: &mut World) {
        for s in w.sockets.values_mut() {
            s.diag.state = tcp::CLOSE;
        }
    }
    d.kernel().with(|w| w.before_first_duplicate = Some(closes));
    let r = after(&mut d, 2);
    assert_eq!(outcomes(&r, "api", Action::Shutdown, Outcome::Changed), 1);
    assert!(d.kernel().shutdowns().is_empty());
    assert_eq!(d.kernel().state(s), Some(tcp::CLOSE));
}

#[test]
fn eperm_from_pidfd_getfd_is_an_error_naming_the_capability() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.with(|w| w.faults.duplicate.insert((API, 7), libc::EPERM));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    d.kernel().advance(Duration::from_secs(2));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(outcomes(&r, "api", Action::Shutdown, Outcome::Error), 1);
    assert_eq!(r.errors.get(&ErrorKind::Act), Some(&1));
    let failed = messages(&events, "action failed");
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("CAP_SYS_PTRACE")),
        "{}",
        failed[0]
    );
    assert_eq!(
        total(&after(&mut d, 5)),
        0,
        "an error is reported once per socket"
    );
}

#[test]
fn an_unreadable_fd_table_is_counted_every_cycle_and_others_are_still_reaped() {
    let k = with_process(API, "api");
    k.spawn(Process::new(WEB, "web"));
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.close_wait(WEB, 7, LOCAL, &remote(2));
    k.with(|w| w.faults.fd_table.insert(API, libc::EACCES));
    let mut d = daemon(
        k,
        &policy("", &[&on_pid("api", API, "1s"), &on_pid("web", WEB, "1s")]),
    );
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(r.errors.get(&ErrorKind::Proc), Some(&1));
    assert_eq!(
        messages(
            &events,
            "cannot read the fd table of some target processes (permission denied; CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH are needed)"
        )
        .len(),
        1
    );
    let r = after(&mut d, 2);
    assert_eq!(r.errors.get(&ErrorKind::Proc), Some(&1), "every cycle");
    assert_eq!(reaped(&r, "web"), 1);
    assert_eq!(total(&r), 1, "nothing of the unreadable target");
}

#[test]
fn a_target_vanishing_during_the_walk_is_counted_and_logged() {
    let k = with_process(API, "api");
    k.spawn(Process::new(WEB, "web"));
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.close_wait(WEB, 7, LOCAL, &remote(2));
    k.with(|w| w.faults.fd_table.insert(API, libc::ENOENT));
    let mut d = daemon(
        k,
        &policy("", &[&on_pid("api", API, "1s"), &on_pid("web", WEB, "1s")]),
    );
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(r.errors.get(&ErrorKind::Proc), Some(&1));
    let logged = messages(
        &events,
        "target processes exited while their fd tables were read; skipped this cycle",
    );
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0]["processes"], 1);
    d.kernel().with(|w| w.faults.fd_table.clear());
    let r = after(&mut d, 2);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(reaped(&r, "api") + reaped(&r, "web"), 2);
}

#[test]
fn a_failed_dump_acts_on_nothing_and_the_next_cycle_reaps() {
    let k = with_process(API, "api");
    let s = k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    d.kernel()
        .with(|w| w.faults.dumps.push_back(DumpError::Interrupted(5)));
    d.kernel().advance(Duration::from_secs(2));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(r.errors.get(&ErrorKind::Netlink), Some(&1));
    assert!(r.outcomes.is_empty(), "acted on an inconsistent view");
    let logged = messages(&events, "sock_diag dump failed; retrying next cycle");
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0]["level"], "ERROR");
    assert!(
        logged[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("NLM_F_DUMP_INTR"))
    );
    let r = cycle(&mut d);
    assert!(r.errors.is_empty());
    assert_eq!(reaped(&r, "api"), 1, "first sight survived the failure");
    assert_eq!(d.kernel().state(s), Some(tcp::CLOSE));
}

#[test]
fn a_namespace_that_cannot_be_entered_is_counted_and_the_rest_goes_on() {
    let k = with_process(API, "api");
    let mut other = Process::new(WEB, "web");
    other.netns = NETNS + 1;
    k.spawn(other);
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.close_wait(WEB, 7, LOCAL, &remote(2));
    k.with(|w| {
        w.faults
            .netns
            .insert(NETNS + 1, "setns needs CAP_SYS_ADMIN".into())
    });
    let mut d = daemon(
        k,
        &policy("", &[&on_pid("api", API, "1s"), &on_pid("web", WEB, "1s")]),
    );
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(r.errors.get(&ErrorKind::Netns), Some(&1));
    assert_eq!(
        messages(&events, "network namespace skipped this cycle").len(),
        1
    );
    let r = after(&mut d, 2);
    assert_eq!(reaped(&r, "api"), 1);
    assert_eq!(reaped(&r, "web"), 0, "its sockets were never seen");
}

#[test]
fn an_unreadable_process_list_is_a_proc_error_and_nothing_else() {
    let k = FakeKernel::new();
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    let r = cycle(&mut d);
    assert!(r.errors.is_empty(), "no target process is not an error");
    assert_eq!(r.candidates, 0);
    assert!(
        d.kernel().calls().contains(&Call::Cover {
            pids: Vec::new(),
            own: false
        }),
        "no namespace to watch"
    );
}

#[test]
fn a_shutdown_racing_the_peer_is_gone_not_an_error() {
    let k = with_process(API, "api");
    let s = k.close_wait(API, 7, LOCAL, &remote(1));
    let inode = k.with(|w| w.sockets.get(&s).map_or(0, |x| x.diag.inode));
    k.with(|w| w.faults.shutdown.insert(inode, libc::ENOTCONN));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(outcomes(&r, "api", Action::Shutdown, Outcome::Gone), 1);
    assert!(r.errors.is_empty());
}

#[test]
fn a_stop_request_ends_the_cycle_before_the_next_action() {
    let k = with_process(API, "api");
    k.close_wait_many(API, 10, 5, LOCAL);
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    d.kernel().advance(Duration::from_secs(2));
    let r = d.cycle(&AtomicBool::new(true));
    assert_eq!(total(&r), 0, "stopped: no action started");
    assert!(d.kernel().shutdowns().is_empty());
}

const STALLED: &str = "reading the command line of these processes did not return in time (their memory map is locked); they are skipped until it does";

/// A process whose command line is `cmdline`, holding one CLOSE_WAIT socket on fd 7.
fn holding(k: &FakeKernel, pid: i32, comm: &str, cmdline: &str, stalls: bool) {
    let mut p = Process::new(pid, comm);
    p.cmdline = cmdline.to_owned();
    p.cmdline_stalls = stalls;
    k.spawn(p);
    k.close_wait(pid, 7, LOCAL, &remote(u16::try_from(pid).unwrap_or(0)));
}

#[test]
fn a_command_line_that_does_not_read_in_time_skips_that_process_only() {
    let k = FakeKernel::new();
    holding(&k, API, "api", "api --serve", false);
    holding(&k, WEB, "web", "web --serve", true);
    let target = "name: serve\nmatch: {cmdline: '--serve'}\nolder_than: 1s\naction: shutdown";
    let mut d = daemon(k, &policy("", &[target]));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(
        r.candidates, 1,
        "the stalled process is skipped, the other one is not"
    );
    assert_eq!(r.errors.get(&ErrorKind::StalledRead), Some(&1));
    let said = messages(&events, STALLED);
    assert_eq!(said.len(), 1, "{events:?}");
    assert_eq!(said[0]["pids"], format!("[{WEB}]"));
    // Counted every cycle, said once; the other process's socket is reaped when due.
    d.kernel().advance(Duration::from_secs(1));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(r.errors.get(&ErrorKind::StalledRead), Some(&1));
    assert!(
        messages(&events, STALLED).is_empty(),
        "said again: {events:?}"
    );
    assert_eq!(reaped(&r, "serve"), 1);
    assert_eq!(d.kernel().shutdowns().len(), 1);
    assert!(d.kernel().shutdowns().iter().all(|(pid, _, _)| *pid == API));
    // Once it reads again, it is matched again and nothing is counted.
    d.kernel().with(|w| {
        if let Some(p) = w.processes.get_mut(&WEB) {
            p.cmdline_stalls = false;
        }
    });
    let r = after(&mut d, 1);
    assert_eq!(r.errors.get(&ErrorKind::StalledRead), None);
    assert_eq!(
        reaped(&r, "serve"),
        1,
        "the other process's socket, due now"
    );
}

#[test]
fn a_command_line_is_read_only_once_every_cheaper_criterion_accepts_the_process() {
    let k = FakeKernel::new();
    holding(&k, API, "api", "api --serve", false);
    holding(&k, WEB, "web", "web --serve", true);
    let target =
        "name: serve\nmatch: {comm: api, cmdline: '--serve'}\nolder_than: 1s\naction: shutdown";
    let mut d = daemon(k, &policy("", &[target]));
    d.kernel().clear_calls();
    let r = cycle(&mut d);
    let reads: Vec<i32> = d
        .kernel()
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::Cmdline { pid } => Some(pid),
            _ => None,
        })
        .collect();
    assert_eq!(reads, [API], "only the process the name accepts");
    assert_eq!(r.errors.get(&ErrorKind::StalledRead), None);
    assert_eq!(r.candidates, 1);
}

// ---------------------------------------------------------------------------------------
// Discovery and attribution across cycles.

#[test]
fn a_snapshot_first_then_changes_and_a_reconciling_snapshot_every_ten_minutes() {
    let k = with_process(API, "api");
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    let kinds = |d: &Daemon<FakeKernel>| -> Vec<&'static str> {
        d.kernel()
            .calls()
            .iter()
            .filter_map(|c| match c {
                Call::Snapshot => Some("snapshot"),
                Call::Changes => Some("changes"),
                _ => None,
            })
            .collect()
    };
    cycle(&mut d);
    after(&mut d, 5);
    after(&mut d, 5);
    assert_eq!(kinds(&d), ["snapshot", "changes", "changes"]);
    d.kernel().advance(RECONCILE_EVERY);
    cycle(&mut d);
    assert_eq!(kinds(&d).last(), Some(&"snapshot"));
}

#[test]
fn only_the_targets_namespaces_are_watched() {
    let k = with_process(API, "api");
    k.spawn(Process::new(WEB, "web"));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    assert!(d.kernel().calls().contains(&Call::Cover {
        pids: vec![API],
        own: false
    }));
}

#[test]
fn a_steady_cycle_reads_no_fd_table_until_the_fd_count_changes() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    let reads = |d: &Daemon<FakeKernel>| {
        d.kernel()
            .calls()
            .iter()
            .filter(|c| **c == Call::FdTable { pid: API })
            .count()
    };
    cycle(&mut d);
    assert_eq!(reads(&d), 1);
    for _ in 0..5 {
        after(&mut d, 5);
    }
    assert_eq!(reads(&d), 1, "nothing changed: the cache answered");
    d.kernel().close_wait(API, 8, LOCAL, &remote(2));
    let r = after(&mut d, 5);
    assert_eq!(reads(&d), 2, "one more fd: read again");
    assert_eq!(r.candidates, 2);
}

#[test]
fn a_new_socket_on_a_reused_fd_number_is_found_although_the_count_did_not_move() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    cycle(&mut d);
    // The process closes fd 7 and gets the number back for a new connection: same count.
    d.kernel().close_fd(API, 7);
    d.kernel().close_wait(API, 7, LOCAL, &remote(2));
    let r = after(&mut d, 5);
    assert_eq!(r.candidates, 1, "attributed through a second read: {r:?}");
}

#[test]
fn sockets_that_left_close_wait_are_forgotten_and_a_new_one_on_the_same_key_is_new() {
    let k = with_process(API, "api");
    let s = k.close_wait(API, 7, LOCAL, &remote(1));
    let y = policy("", &[&on_pid("api", API, "1s")]).replace("dry_run: false", "dry_run: true");
    let mut d = daemon(k, &y);
    cycle(&mut d);
    assert_eq!(total(&after(&mut d, 2)), 1);
    // It leaves CLOSE_WAIT (the owner closed it), and the tracker forgets it.
    d.kernel().close_fd(API, 7);
    let r = after(&mut d, 2);
    assert_eq!(r.close_wait, 0);
    assert_eq!(d.kernel().state(s), None);
}

#[test]
fn gauges_count_sockets_ages_fds_limits_and_arrivals() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(50).limits(1000, 4096));
    k.close_wait_many(API, 10, 2, LOCAL);
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    let r = cycle(&mut d);
    let g = r.targets.get("api").copied().expect("gauges");
    assert_eq!((g.close_wait, g.open_fds, g.fd_limit), (2, 52, 1000));
    assert_eq!(
        g.new_close_wait, 0,
        "the first look finds, it does not see arrive"
    );
    d.kernel().close_wait(API, 30, LOCAL, &remote(7));
    let r = after(&mut d, 40);
    let g = r.targets.get("api").copied().expect("gauges");
    assert_eq!(
        (g.close_wait, g.new_close_wait, g.oldest_ms),
        (3, 1, 40_000)
    );
    assert_eq!(g.fullest, (53, 1000));
    assert_eq!(
        r.status_line(),
        "3 CLOSE_WAIT in targets (3 host-wide), 0 reaped this cycle, 0 deferred by limits"
    );
}

// ---------------------------------------------------------------------------------------
// Release verdicts.

#[test]
fn an_owner_that_closes_on_hangup_releases_the_fd() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").closes_on_hup());
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    assert_eq!(reaped(&after(&mut d, 2), "api"), 1);
    assert_eq!(d.releases_pending(), 1);
    let r = after(&mut d, 1);
    assert_eq!(r.releases.get(&("api".into(), Release::Released)), Some(&1));
    assert_eq!(d.releases_pending(), 0);
}

#[test]
fn an_owner_that_keeps_the_fd_is_still_held_after_the_window_and_not_before() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    // interval 5s: the window is 3 intervals or 30 s, whichever is longer: 30 s.
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    after(&mut d, 2);
    for _ in 0..5 {
        let r = after(&mut d, 5);
        assert!(
            r.releases.is_empty(),
            "looked at again, no verdict before 30 s"
        );
        assert_eq!(d.releases_pending(), 1);
    }
    let (r, events) = {
        d.kernel().advance(Duration::from_secs(5));
        cycle_logged(&mut d)
    };
    assert_eq!(
        r.releases.get(&("api".into(), Release::StillHeld)),
        Some(&1)
    );
    let warned = events
        .iter()
        .find(|e| e["result"] == "still_held")
        .expect("still_held logged");
    assert_eq!(warned["waited_ms"], 30_000);
    assert!(
        after(&mut d, 30).releases.is_empty(),
        "one verdict per socket"
    );
}

#[test]
fn an_owner_that_closes_on_its_next_heartbeat_is_released_not_still_held() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    let y = policy("", &[&on_pid("api", API, "1s")]).replace("interval: 5s", "interval: 2s");
    let mut d = daemon(k, &y);
    cycle(&mut d);
    after(&mut d, 2);
    // The app closes its fds on a 10 s heartbeat: well past one interval, within the window.
    for _ in 0..4 {
        assert!(after(&mut d, 2).releases.is_empty());
    }
    d.kernel().close_fd(API, 7);
    let r = after(&mut d, 2);
    assert_eq!(r.releases.get(&("api".into(), Release::Released)), Some(&1));
    assert_eq!(r.releases.get(&("api".into(), Release::StillHeld)), None);
}

#[test]
fn an_owner_that_exits_before_letting_go_is_gone_not_released() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    after(&mut d, 2);
    d.kernel().exit(API);
    let r = after(&mut d, 5);
    assert_eq!(r.releases.get(&("api".into(), Release::Gone)), Some(&1));
    assert_eq!(r.releases.get(&("api".into(), Release::Released)), None);
    assert_eq!(d.releases_pending(), 0);
}

// ---------------------------------------------------------------------------------------
// Escalations.

fn escalating(pid: i32, escalate: &str) -> String {
    format!(
        "name: api\nmatch: {{pid: {pid}}}\nolder_than: 1h\naction: shutdown\nescalate: {escalate}"
    )
}

fn setnofiles(k: &FakeKernel) -> Vec<(i32, u64, u64)> {
    k.calls()
        .into_iter()
        .filter_map(|c| match c {
            Call::SetNofile { pid, soft, hard } => Some((pid, soft, hard)),
            _ => None,
        })
        .collect()
}

#[test]
fn the_fd_limit_is_raised_once_to_the_hard_limit() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(1000).limits(1100, 8192));
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(
        k,
        &policy("", &[&escalating(API, "{raise_fd_limit_at: 80%}")]),
    );
    let r = cycle(&mut d);
    assert_eq!(
        r.escalations
            .get(&("api".into(), EscalationKind::RaiseFdLimit)),
        Some(&1)
    );
    assert_eq!(setnofiles(d.kernel()), [(API, 8192, 8192)]);
    for _ in 0..3 {
        after(&mut d, 5);
    }
    assert_eq!(setnofiles(d.kernel()).len(), 1, "once per process");
}

#[test]
fn a_process_that_lowers_its_hard_limit_just_before_the_raise_keeps_it() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(1000).limits(1100, 8192));
    k.close_wait(API, 7, LOCAL, &remote(1));
    // Between cwreap's read and its write, the process lowers its hard limit to 1500.
    let lowered = cwreap_linux::procfs::Limits {
        soft: Some(1100),
        hard: Some(1500),
    };
    k.with(|w| w.faults.nofile_changes.insert(API, lowered));
    let mut d = daemon(
        k,
        &policy("", &[&escalating(API, "{raise_fd_limit_at: 80%}")]),
    );
    let (r, events) = cycle_logged(&mut d);
    assert!(r.escalations.is_empty(), "nothing raised");
    let limits = d.kernel().with(|w| w.processes.get(&API).map(|p| p.limits));
    assert_eq!(limits, Some(lowered), "its own limits stand");
    let said = messages(
        &events,
        "the process changed its fd limits since they were read; they stay as it set them and nothing is raised",
    );
    assert_eq!(said.len(), 1, "{events:?}");
    assert_eq!(said[0]["hard"], "1500");
    // Settled for this process: not tried again behind its back.
    for _ in 0..3 {
        after(&mut d, 5);
    }
    assert_eq!(setnofiles(d.kernel()).len(), 1, "once per process");
}

/// The same race where the daemon lacks CAP_SYS_RESOURCE: its write would raise the
/// lowered hard limit back, so the kernel refuses it (EPERM). The limits changed: skipped,
/// said as such, not an error naming a capability.
#[test]
fn a_hard_limit_lowered_just_before_a_refused_raise_is_a_change_not_an_error() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(1000).limits(1100, 8192));
    k.close_wait(API, 7, LOCAL, &remote(1));
    let lowered = cwreap_linux::procfs::Limits {
        soft: Some(1100),
        hard: Some(1500),
    };
    k.with(|w| {
        w.faults.nofile_changes.insert(API, lowered);
        w.faults.set_nofile.insert(API, libc::EPERM);
    });
    let mut d = daemon(
        k,
        &policy("", &[&escalating(API, "{raise_fd_limit_at: 80%}")]),
    );
    let (r, events) = cycle_logged(&mut d);
    assert!(r.escalations.is_empty(), "nothing raised");
    assert_eq!(r.errors.get(&ErrorKind::Escalate), None, "{events:?}");
    assert!(
        messages(&events, "escalation failed").is_empty(),
        "{events:?}"
    );
    let limits = d.kernel().with(|w| w.processes.get(&API).map(|p| p.limits));
    assert_eq!(limits, Some(lowered), "its own limits stand");
    let said = messages(
        &events,
        "the process changed its fd limits since they were read; they stay as it set them and nothing is raised",
    );
    assert_eq!(said.len(), 1, "{events:?}");
    assert_eq!(said[0]["hard"], "1500");
    for _ in 0..3 {
        after(&mut d, 5);
    }
    assert_eq!(setnofiles(d.kernel()).len(), 1, "once per process");
}

#[test]
fn a_soft_limit_of_1024_or_less_is_never_raised() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(1000).limits(1024, 8192));
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(
        k,
        &policy("", &[&escalating(API, "{raise_fd_limit_at: 80%}")]),
    );
    let (r, events) = cycle_logged(&mut d);
    assert!(r.escalations.is_empty());
    assert!(setnofiles(d.kernel()).is_empty());
    let said = messages(
        &events,
        "an fd-limit raise is due; the fd limit is not raised",
    );
    assert_eq!(said.len(), 1);
    assert!(said[0]["why"].as_str().is_some_and(|w| w.contains("1024")));
    after(&mut d, 5);
    assert!(setnofiles(d.kernel()).is_empty());
}

#[test]
fn a_signal_goes_once_at_the_threshold_through_the_pin() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(950).limits(1000, 1000));
    k.close_wait_many(API, 10, 3, LOCAL);
    let mut d = daemon(k, &policy("", &[&escalating(API, "{signal_at: 95%}")]));
    let r = cycle(&mut d);
    assert_eq!(
        r.escalations.get(&("api".into(), EscalationKind::Signal)),
        Some(&1)
    );
    assert_eq!(d.kernel().signals(), [(API, libc::SIGTERM)]);
    assert!(
        d.kernel()
            .with(|w| w.processes.get(&API).is_some_and(|p| !p.alive))
    );
}

#[test]
fn a_process_that_survives_its_signal_is_not_signalled_again() {
    let k = FakeKernel::new();
    let mut p = Process::new(API, "api").files(950).limits(1000, 1000);
    p.dies_on.clear();
    k.spawn(p);
    k.close_wait_many(API, 10, 3, LOCAL);
    let mut d = daemon(k, &policy("", &[&escalating(API, "{signal_at: 95%}")]));
    cycle(&mut d);
    for _ in 0..5 {
        after(&mut d, 5);
    }
    assert_eq!(d.kernel().signals().len(), 1);
}

#[test]
fn a_reused_pid_starts_afresh_and_is_signalled_only_through_its_own_pin() {
    let k = FakeKernel::new();
    let mut p = Process::new(API, "api").files(950).limits(1000, 1000);
    p.dies_on.clear();
    k.spawn(p);
    k.close_wait_many(API, 10, 3, LOCAL);
    // Selected by name: a newcomer with the pid is a target too (one named by pid is not).
    let by_name =
        escalating(API, "{signal_at: 95%}").replace(&format!("pid: {API}"), "comm: ^api$");
    let mut d = daemon(k, &policy("", &[&by_name]));
    cycle(&mut d);
    assert_eq!(d.kernel().signals().len(), 1);
    // The process exits; a newcomer takes its pid, with the same load.
    d.kernel().exit(API);
    let mut newcomer = Process::new(API, "api").files(950).limits(1000, 1000);
    newcomer.start_time += 7;
    newcomer.dies_on.clear();
    d.kernel().spawn(newcomer);
    d.kernel().close_wait_many(API, 10, 3, LOCAL);
    after(&mut d, 5);
    let pins = d
        .kernel()
        .calls()
        .iter()
        .filter(|c| **c == Call::OpenProcess { pid: API })
        .count();
    assert!(pins >= 2, "the newcomer was pinned afresh");
    assert_eq!(
        d.kernel().signals().len(),
        2,
        "the newcomer is another process: it gets its own single signal"
    );
    assert!(
        d.kernel()
            .with(|w| w.processes.get(&API).is_some_and(|p| p.alive)),
        "and the signal reached the live newcomer through its own pin"
    );
}

#[test]
fn escalations_have_a_budget_of_their_own_and_go_before_the_reaps() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(950).limits(1000, 1000));
    k.spawn(Process::new(WEB, "web"));
    k.close_wait_many(API, 10, 3, LOCAL);
    k.close_wait_many(WEB, 10, 4, LOCAL);
    let y = policy(
        "",
        &[
            &escalating(API, "{signal_at: 95%}"),
            &on_pid("web", WEB, "1s"),
        ],
    )
    .replace("max_reaps_per_minute: 100000", "max_reaps_per_minute: 4");
    let mut d = daemon(k, &y);
    let r = cycle(&mut d);
    assert_eq!(d.kernel().signals().len(), 1);
    assert_eq!((r.deferred, r.escalations_deferred), (0, 0));
    let r = after(&mut d, 2);
    assert_eq!(
        reaped(&r, "web"),
        4,
        "the signal took none of the reaps' four"
    );
    assert_eq!(r.deferred, 0);
}

#[test]
fn a_signal_goes_out_in_the_first_cycle_its_condition_holds_though_reaps_saturate_the_limit() {
    let k = FakeKernel::new();
    k.spawn(Process::new(WEB, "web"));
    k.close_wait_many(WEB, 10, 40, LOCAL);
    k.spawn(Process::new(API, "api").files(900).limits(1000, 1000));
    k.close_wait_many(API, 100, 3, LOCAL);
    let y = policy(
        "",
        &[
            &on_pid("web", WEB, "1s"),
            &escalating(API, "{signal_at: 95%}"),
        ],
    )
    .replace("max_reaps_per_cycle: 1000", "max_reaps_per_cycle: 4");
    let mut d = daemon(k, &y);
    cycle(&mut d);
    let r = after(&mut d, 2);
    assert_eq!(
        (reaped(&r, "web"), r.deferred),
        (4, 36),
        "the reaps are saturated"
    );
    assert!(d.kernel().signals().is_empty(), "below 95 %");
    // The process reaches 95 % while the reaps keep taking their whole budget.
    d.kernel().with(|w| {
        if let Some(p) = w.processes.get_mut(&API) {
            for i in 0..50 {
                p.fds.insert(5000 + i, Fd::File);
            }
        }
    });
    let r = after(&mut d, 2);
    assert_eq!(reaped(&r, "web"), 4);
    assert_eq!(d.kernel().signals(), [(API, libc::SIGTERM)], "at once");
    let first = d
        .kernel()
        .calls()
        .iter()
        .position(|c| matches!(c, Call::Signal { .. }));
    let shutdown = d
        .kernel()
        .calls()
        .iter()
        .rposition(|c| matches!(c, Call::Shutdown { .. }));
    assert!(
        first < shutdown,
        "the signal went before this cycle's reaps"
    );
}

#[test]
fn an_escalation_past_its_budget_is_deferred_said_once_and_goes_when_there_is_room() {
    let k = FakeKernel::new();
    for pid in [API, WEB] {
        k.spawn(Process::new(pid, "api").files(960).limits(1000, 1000));
        k.close_wait_many(pid, 10, 3, LOCAL);
    }
    let t = "name: api\nmatch: {comm: api}\nolder_than: 1h\naction: shutdown\nescalate: {signal_at: 95%}";
    let y = policy("", &[t]).replace(
        "max_reaps_per_minute: 100000}",
        "max_reaps_per_minute: 100000, max_escalations_per_minute: 1}",
    );
    let mut d = daemon(k, &y);
    let deferred = "escalation due but deferred: limits.max_escalations_per_minute is used up; it goes out in the first cycle with room";
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(d.kernel().signals(), [(API, libc::SIGTERM)]);
    assert_eq!(r.escalations_deferred, 1);
    let said = messages(&events, deferred);
    assert_eq!(said.len(), 1, "{events:?}");
    assert_eq!(said[0]["pid"], WEB);
    d.kernel().advance(Duration::from_secs(30));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!((r.escalations_deferred, d.kernel().signals().len()), (1, 1));
    assert!(messages(&events, deferred).is_empty(), "said once");
    d.kernel().advance(Duration::from_secs(30));
    let r = cycle(&mut d);
    assert_eq!(r.escalations_deferred, 0);
    assert_eq!(
        d.kernel().signals(),
        [(API, libc::SIGTERM), (WEB, libc::SIGTERM)]
    );
}

#[test]
fn a_dry_run_escalation_leaves_the_real_one_armed_for_when_the_policy_enforces() {
    for escalate in ["{signal_at: 95%}", "{raise_fd_limit_at: 80%}"] {
        let k = FakeKernel::new();
        let mut p = Process::new(API, "api").files(1500).limits(1500, 8192);
        p.dies_on.clear();
        k.spawn(p);
        k.close_wait_many(API, 10, 3, LOCAL);
        let enforcing = policy("", &[&escalating(API, escalate)]);
        let dry = enforcing.replace("dry_run: false", "dry_run: true");
        let mut d = daemon(k, &dry);
        // The README's flow: a dry run first; what would have happened is recorded once.
        let (_, events) = cycle_logged(&mut d);
        let would: Vec<&Value> = messages(&events, "escalation");
        assert_eq!(would.len(), 1, "{escalate}: {events:?}");
        assert_eq!(would[0]["outcome"], "dry_run");
        after(&mut d, 5);
        assert!(d.kernel().signals().is_empty() && setnofiles(d.kernel()).is_empty());
        // Then `dry_run: false` and SIGHUP: exactly one real escalation, not more.
        d.reload(cfg(&enforcing)).expect("reload");
        for _ in 0..4 {
            after(&mut d, 5);
        }
        let real = d.kernel().signals().len() + setnofiles(d.kernel()).len();
        assert_eq!(real, 1, "{escalate}: one real escalation after the reload");
        // And back to a dry run: the dry one is not repeated either.
        d.reload(cfg(&dry)).expect("reload");
        let (_, events) = cycle_logged(&mut d);
        assert!(messages(&events, "escalation").is_empty(), "{events:?}");
    }
}

#[test]
fn signal_before_emfile_fires_on_the_forecast_before_any_percentage() {
    let k = FakeKernel::new();
    let mut p = Process::new(API, "api").files(100).limits(256, 256);
    p.dies_on.clear();
    k.spawn(p);
    k.close_wait_many(API, 10, 3, LOCAL);
    let mut d = daemon(
        k,
        &policy("", &[&escalating(API, "{signal_before_emfile: 20s}")]),
    );
    // 5 fds/s, sampled every 2 s: 10 fds per cycle. 256 is reached at 100 + 5t = 256,
    // t = 31.2 s; the forecast falls within 20 s once the process passes 156 fds.
    let grow = |d: &mut Daemon<FakeKernel>, n: i32| {
        d.kernel().with(|w| {
            if let Some(p) = w.processes.get_mut(&API) {
                let at = 10_000 + i32::try_from(p.fds.len()).unwrap_or(0);
                for i in 0..n {
                    p.fds.insert(at + i, Fd::File);
                }
            }
        });
    };
    cycle(&mut d);
    let mut signalled_at = None;
    for step in 1..=15 {
        grow(&mut d, 10);
        after_ms(&mut d, 2000);
        let open = d
            .kernel()
            .with(|w| w.processes.get(&API).map_or(0, |p| p.fds.len()));
        if !d.kernel().signals().is_empty() {
            signalled_at = Some((step, open));
            break;
        }
    }
    let (step, open) = signalled_at.expect("signalled");
    assert!(open < 256, "before EMFILE ({open} fds)");
    // (256 - open) / 5 fds/s ≤ 20 s at the first cycle that sees it, and not one cycle before.
    assert!(
        256 - open <= 100 && 256 - (open - 10) > 100,
        "at {open} fds, step {step}"
    );
    assert_eq!(d.kernel().signals(), [(API, libc::SIGTERM)]);
}

#[test]
fn a_percentage_the_leak_outruns_in_one_interval_is_warned_about_once() {
    let k = FakeKernel::new();
    let mut p = Process::new(API, "api").files(100).limits(256, 256);
    p.dies_on.clear();
    k.spawn(p);
    k.close_wait_many(API, 10, 3, LOCAL);
    // 95 % of 256 leaves 12 fds; at 5 fds/s a 5 s interval uses 25.
    let mut d = daemon(k, &policy("", &[&escalating(API, "{signal_at: 95%}")]));
    let text = "this leak uses up the headroom above a percentage threshold within one interval, so the escalation can come after EMFILE; use a forecast (`signal_before_emfile` / `raise_before_emfile`), a lower percentage or a shorter interval";
    let mut said = Vec::new();
    for _ in 0..4 {
        d.kernel().with(|w| {
            if let Some(p) = w.processes.get_mut(&API) {
                let at = 10_000 + i32::try_from(p.fds.len()).unwrap_or(0);
                for i in 0..25 {
                    p.fds.insert(at + i, Fd::File);
                }
            }
        });
        d.kernel().advance(Duration::from_secs(5));
        let (_, events) = cycle_logged(&mut d);
        said.extend(messages(&events, text).into_iter().cloned());
    }
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0]["threshold"], "signal_at");
    assert_eq!(said[0]["headroom_fds"], 12);
}

#[test]
fn escalations_in_a_dry_run_send_nothing() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(990).limits(1100, 8192));
    k.close_wait_many(API, 10, 3, LOCAL);
    let y = policy(
        "",
        &[&escalating(API, "{raise_fd_limit_at: 80%, signal_at: 90%}")],
    )
    .replace("dry_run: false", "dry_run: true");
    let mut d = daemon(k, &y);
    cycle(&mut d);
    after(&mut d, 5);
    assert!(d.kernel().signals().is_empty());
    assert!(setnofiles(d.kernel()).is_empty());
}

#[test]
fn min_close_wait_gates_escalations() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(990).limits(1000, 1000));
    k.close_wait_many(API, 10, 2, LOCAL);
    let t = format!("{}\nmin_close_wait: 3", escalating(API, "{signal_at: 95%}"));
    let mut d = daemon(k, &policy("", &[&t]));
    cycle(&mut d);
    assert!(
        d.kernel().signals().is_empty(),
        "a full process that does not leak enough"
    );
    d.kernel().close_wait(API, 30, LOCAL, &remote(5));
    after(&mut d, 5);
    assert_eq!(d.kernel().signals().len(), 1);
}

#[test]
fn sockets_shut_down_but_still_held_count_as_leaking() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(940).limits(1000, 1000));
    k.close_wait_many(API, 10, 2, LOCAL);
    let t = "name: api\nmatch: {pid: 100}\nolder_than: 1s\naction: shutdown\nmin_close_wait: 2\nescalate: {signal_at: 95%}";
    let mut d = daemon(k, &policy("", &[t]));
    cycle(&mut d);
    assert_eq!(reaped(&after(&mut d, 2), "api"), 2);
    // The owner keeps both fds: still_held after the window (30 s).
    let r = after(&mut d, 30);
    assert_eq!(
        r.releases.get(&("api".into(), Release::StillHeld)),
        Some(&2)
    );
    // Now near its limit with no CLOSE_WAIT socket left: the two held ones make the leak.
    d.kernel().with(|w| {
        if let Some(p) = w.processes.get_mut(&API) {
            for i in 0..20 {
                p.fds.insert(5000 + i, Fd::File);
            }
        }
    });
    after(&mut d, 5);
    assert_eq!(d.kernel().signals(), [(API, libc::SIGTERM)]);
}

#[test]
fn a_failed_raise_is_an_escalate_error_naming_the_capability() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(1000).limits(1100, 8192));
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.with(|w| w.faults.set_nofile.insert(API, libc::EPERM));
    let mut d = daemon(
        k,
        &policy("", &[&escalating(API, "{raise_fd_limit_at: 80%}")]),
    );
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(r.errors.get(&ErrorKind::Escalate), Some(&1));
    let failed = messages(&events, "escalation failed");
    assert!(
        failed[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("CAP_SYS_RESOURCE"))
    );
}

// ---------------------------------------------------------------------------------------
// Reloads.

#[test]
fn a_reload_to_enforce_reaps_what_the_dry_run_reported() {
    let k = with_process(API, "api");
    let socks = k.close_wait_many(API, 10, 2, LOCAL);
    let enforce = policy("", &[&on_pid("api", API, "1s")]);
    let dry = enforce.replace("dry_run: false", "dry_run: true");
    let mut d = daemon(k, &dry);
    cycle(&mut d);
    assert_eq!(
        outcomes(&after(&mut d, 2), "api", Action::Shutdown, Outcome::DryRun),
        2
    );
    d.reload(cfg(&enforce)).expect("reload");
    assert!(!d.dry_run());
    let r = after(&mut d, 5);
    assert_eq!(reaped(&r, "api"), 2, "{:?}", r.outcomes);
    assert!(
        socks
            .iter()
            .all(|s| d.kernel().state(*s) == Some(tcp::CLOSE))
    );
}

#[test]
fn a_reload_that_drops_a_target_drops_its_gauges_and_actions() {
    let k = with_process(API, "api");
    k.spawn(Process::new(WEB, "web"));
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.close_wait(WEB, 7, LOCAL, &remote(2));
    let both = policy("", &[&on_pid("api", API, "1h"), &on_pid("web", WEB, "1s")]);
    let mut d = daemon(k, &both);
    let r = cycle(&mut d);
    assert_eq!(r.targets.len(), 2);
    d.reload(cfg(&policy("", &[&on_pid("api", API, "1h")])))
        .expect("reload");
    let r = after(&mut d, 2);
    assert_eq!(r.targets.keys().collect::<Vec<_>>(), ["api"]);
    assert!(r.outcomes.is_empty(), "web is no target any more");
}

#[test]
fn a_reload_whose_audit_log_cannot_be_opened_changes_nothing() {
    let k = with_process(API, "api");
    let before = policy("", &[&on_pid("api", API, "1h")]);
    let mut d = daemon(k, &before);
    let bad = policy(
        "audit_log: /proc/cwreap-no-such-dir/audit.jsonl\n",
        &[&on_pid("api", API, "1s")],
    );
    assert!(d.reload(cfg(&bad)).is_err());
    assert_eq!(
        d.cfg().targets[0].older_than,
        Duration::from_secs(3600),
        "the old policy stays"
    );
}

// ---------------------------------------------------------------------------------------
// The audit log.

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("unit-scratch")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn audit_records(path: &std::path::Path, d: &Daemon<FakeKernel>) -> Vec<Value> {
    let _ = d.auditor().log().flush(Duration::from_secs(5));
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn every_action_has_an_intent_before_it_and_a_record_after() {
    let dir = scratch("audit-intent");
    let path = dir.join("audit.jsonl");
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api"));
    k.close_wait_many(API, 10, 3, LOCAL);
    let y = policy(
        &format!("audit_log: {}\n", path.display()),
        &[&on_pid("api", API, "1s")],
    );
    let mut d = daemon(k, &y);
    cycle(&mut d);
    after(&mut d, 2);
    let recs = audit_records(&path, &d);
    let events: Vec<&str> = recs.iter().filter_map(|r| r["event"].as_str()).collect();
    assert_eq!(
        events,
        ["intent", "intent", "intent", "action", "action", "action"]
    );
    for r in &recs[3..] {
        assert_eq!(r["outcome"], "reaped");
        assert_eq!(r["target"], "api");
        assert!(r["reason"].is_null());
    }
    let mut intents: Vec<u64> = recs[..3]
        .iter()
        .filter_map(|r| r["inode"].as_u64())
        .collect();
    let mut actions: Vec<u64> = recs[3..]
        .iter()
        .filter_map(|r| r["inode"].as_u64())
        .collect();
    intents.sort_unstable();
    actions.sort_unstable();
    assert_eq!(intents, actions, "each acted socket was announced");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dry_runs_write_actions_without_intents_and_reasons_are_codes() {
    let dir = scratch("audit-dry");
    let path = dir.join("audit.jsonl");
    let k = with_process(API, "api");
    k.listener(API, 3, "10.0.0.1:8080");
    k.unaccepted(API, LOCAL, &remote(1));
    k.close_wait(API, 7, LOCAL, &remote(2));
    let y = policy(
        &format!("audit_log: {}\n", path.display()),
        &[&on_pid("api", API, "1s")],
    )
    .replace("dry_run: false", "dry_run: true");
    let mut d = daemon(k, &y);
    cycle(&mut d);
    after(&mut d, 2);
    let recs = audit_records(&path, &d);
    assert!(recs.iter().all(|r| r["event"] == "action"), "{recs:?}");
    let skipped = recs
        .iter()
        .find(|r| r["outcome"] == "skipped")
        .expect("skipped");
    assert_eq!(
        skipped["reason"],
        Reason::Unaccepted(crate::shared::act::Via::Policy).code()
    );
    assert!(
        skipped["fd"].is_null(),
        "an unaccepted connection has no fd"
    );
    assert!(recs.iter().any(|r| r["outcome"] == "dry_run"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn release_verdicts_and_escalations_are_audited() {
    let dir = scratch("audit-release");
    let path = dir.join("audit.jsonl");
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(950).limits(1000, 1000));
    k.close_wait_many(API, 10, 2, LOCAL);
    let t = "name: api\nmatch: {pid: 100}\nolder_than: 1s\naction: shutdown\nescalate: {signal_at: 99%}";
    let y = policy(&format!("audit_log: {}\n", path.display()), &[t]);
    let mut d = daemon(k, &y);
    cycle(&mut d);
    after(&mut d, 2);
    after(&mut d, 30);
    let recs = audit_records(&path, &d);
    let releases: Vec<&Value> = recs.iter().filter(|r| r["event"] == "fd_release").collect();
    assert_eq!(releases.len(), 2);
    assert!(
        releases
            .iter()
            .all(|r| r["result"] == "still_held" && r["waited_ms"] == 30_000)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cycle_errors_and_outcomes_become_metrics() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.with(|w| w.faults.duplicate.insert((API, 7), libc::EPERM));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    let m = super::metrics::Metrics::new();
    m.observe(&cycle(&mut d));
    m.observe(&after(&mut d, 2));
    let text = m.render();
    for sample in [
        "cwreap_reaped_total{target=\"api\",action=\"shutdown\",outcome=\"error\"} 1",
        "cwreap_cycle_errors_total{kind=\"act\"} 1",
        "cwreap_close_wait_sockets{target=\"api\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == sample),
            "no `{sample}` in:\n{text}"
        );
    }
}

#[test]
fn keys_of_the_double_are_the_keys_the_daemon_tracks() {
    let k = with_process(API, "api");
    let s = k.close_wait(API, 7, LOCAL, &remote(1));
    let diag = k
        .with(|w| w.sockets.get(&s).map(|x| x.diag.clone()))
        .expect("socket");
    assert_eq!(key_of(&diag), s);
    assert_eq!(s.0, NETNS);
}

// ---------------------------------------------------------------------------------------
// Dead held sockets and honest ages.

fn reset_by_peer(w: &mut World) {
    for s in w.sockets.values_mut() {
        if s.diag.state == tcp::CLOSE_WAIT {
            s.diag.state = tcp::CLOSE;
        }
    }
}

#[test]
fn a_close_wait_socket_that_dies_while_held_is_a_dead_held_socket_until_closed() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    let r = cycle(&mut d);
    assert_eq!(r.targets["api"].dead_held, 0);
    // The peer's RST (keepalive, after its FIN_WAIT2 timed out): CLOSE, out of every dump.
    d.kernel().with(reset_by_peer);
    let (r, events) = {
        d.kernel().advance(Duration::from_secs(5));
        cycle_logged(&mut d)
    };
    assert_eq!(r.close_wait, 0);
    assert_eq!(r.targets["api"].dead_held, 1);
    let found = messages(
        &events,
        "dead held socket: the connection ended, the process still holds its fd (only close() or a restart frees it)",
    );
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["reaped_by"], "peer");
    assert_eq!(found[0]["fd"], 7);
    assert_eq!(after(&mut d, 5).targets["api"].dead_held, 1, "still held");
    d.kernel().close_fd(API, 7);
    assert_eq!(after(&mut d, 5).targets["api"].dead_held, 0, "closed: gone");
}

#[test]
fn sockets_dead_before_the_daemon_started_are_found_at_its_first_cycle() {
    let k = with_process(API, "api");
    k.dead(API, 7, LOCAL);
    k.dead(API, 8, LOCAL);
    k.never_connected(API, 9);
    k.other_socket(API, 10, false);
    k.listener(API, 3, "10.0.0.1:8080");
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    let r = cycle(&mut d);
    assert_eq!(
        r.targets["api"].dead_held, 2,
        "never connected, unix and listener are not dead"
    );
    d.kernel().clear_calls();
    after(&mut d, 5);
    assert!(
        !d.kernel()
            .calls()
            .iter()
            .any(|c| matches!(c, Call::Duplicate { .. })),
        "no socket left CLOSE_WAIT: nothing is probed again until the reconciliation"
    );
}

#[test]
fn a_socket_cwreap_shut_down_that_the_owner_keeps_is_dead_held_reaped_by_cwreap() {
    let k = with_process(API, "api");
    k.close_wait(API, 7, LOCAL, &remote(1));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
    cycle(&mut d);
    assert_eq!(reaped(&after(&mut d, 2), "api"), 1);
    d.kernel().advance(Duration::from_secs(5));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(r.targets["api"].dead_held, 1);
    let found = events
        .iter()
        .find(|e| e["reaped_by"].is_string())
        .expect("logged");
    assert_eq!(found["reaped_by"], "cwreap");
}

#[test]
fn dead_held_sockets_count_toward_escalations() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(950).limits(1000, 1000));
    for fd in 10..13 {
        k.dead(API, fd, LOCAL);
    }
    let t = "name: api\nmatch: {pid: 100}\nolder_than: 1h\naction: shutdown\nmin_close_wait: 3\nescalate: {signal_at: 95%}";
    let mut d = daemon(k, &policy("", &[t]));
    let r = cycle(&mut d);
    assert_eq!(r.close_wait, 0, "not one CLOSE_WAIT socket");
    assert_eq!(
        d.kernel().signals(),
        [(API, libc::SIGTERM)],
        "three dead held ones leak"
    );
}

#[test]
fn exact_ages_from_an_event_source_are_used_and_named() {
    let dir = scratch("audit-exact");
    let path = dir.join("audit.jsonl");
    let k = with_process(API, "api");
    k.with(|w| w.exact_ages = true);
    k.close_wait(API, 7, LOCAL, &remote(1));
    k.advance(Duration::from_secs(40));
    let y = policy(
        &format!("audit_log: {}\n", path.display()),
        &[&on_pid("api", API, "30s")],
    );
    let mut d = daemon(k, &y);
    let r = cycle(&mut d);
    assert_eq!(
        reaped(&r, "api"),
        1,
        "40 s in CLOSE_WAIT, known exactly at the first look"
    );
    let recs = audit_records(&path, &d);
    let action = recs
        .iter()
        .find(|r| r["event"] == "action")
        .expect("action");
    assert_eq!(action["age_source"], "event");
    assert_eq!(action["age_ms"], 40_000);
    assert_eq!(action["age_max_ms"], 40_000);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn without_events_the_first_look_only_knows_the_last_ack_and_says_so() {
    let dir = scratch("audit-estimate");
    let path = dir.join("audit.jsonl");
    let k = with_process(API, "api");
    let s = k.close_wait(API, 7, LOCAL, &remote(1));
    k.with(|w| {
        if let Some(x) = w.sockets.get_mut(&s) {
            x.diag.last_ack_recv_ms = Some(35_000);
            x.diag.last_data_recv_ms = Some(90_000);
            x.diag.keepalive = true;
        }
    });
    let y = policy(
        &format!("audit_log: {}\n", path.display()),
        &[&on_pid("api", API, "30s")],
    );
    let mut d = daemon(k, &y);
    cycle(&mut d);
    let recs = audit_records(&path, &d);
    let action = recs
        .iter()
        .find(|r| r["event"] == "action")
        .expect("action");
    assert_eq!(action["age_source"], "last_ack");
    assert_eq!(action["age_ms"], 35_000);
    assert_eq!(action["age_max_ms"], 90_000);
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------
// Every policy `check` accepts runs.

/// A small deterministic generator (xorshift64*), so a failure names its seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        let n = u64::try_from(from.len()).unwrap_or(1);
        from[usize::try_from(self.next() % n).unwrap_or(0)]
    }
    fn maybe(&mut self) -> bool {
        self.next().is_multiple_of(2)
    }
    /// Mostly a valid value, one time in eight an invalid one.
    fn value<'a>(&mut self, valid: &[&'a str], invalid: &[&'a str]) -> &'a str {
        if self.next().is_multiple_of(8) {
            self.pick(invalid)
        } else {
            self.pick(valid)
        }
    }
}

/// A policy drawn from the values the grammar takes, extremes included.
fn random_policy(g: &mut Gen) -> String {
    let mut y = String::new();
    if g.maybe() {
        let iv = g.value(
            &["100ms", "1s", "30s", "1h", "1d", "23h59m59s"],
            &["2d", "300000000000y", "0s", "99ms"],
        );
        y.push_str(&format!("interval: {iv}\n"));
    }
    if g.maybe() {
        y.push_str(&format!("dry_run: {}\n", g.pick(&["true", "false"])));
    }
    if g.maybe() {
        let a = g.value(&["1", "100", "10000000"], &["4294967295", "0"]);
        let b = g.value(&["1", "600", "10000000"], &["99999999999"]);
        y.push_str(&format!(
            "limits: {{max_reaps_per_cycle: {a}, max_reaps_per_minute: {b}}}\n"
        ));
    }
    y.push_str("metrics: {listen: off}\ntargets:\n");
    for i in 0..=(g.next() % 3) {
        let older = g.value(
            &["1ms", "1s", "10m", "365d", "1y"],
            &["366d", "0s", "500000000y"],
        );
        let criterion = g.value(
            &[
                "comm: api",
                "comm: '^a.*'",
                "pid: 100",
                "uid: 0",
                "exe: '(a|b)+'",
                "local_ports: [8080]",
            ],
            &["cmdline: '\\w{400}'", "pid: 0", "local_ports: []"],
        );
        y.push_str(&format!(
            "  - name: t{i}\n    match: {{{criterion}}}\n    older_than: {older}\n"
        ));
        if g.maybe() {
            y.push_str(&format!(
                "    action: {}\n",
                g.pick(&["log", "shutdown", "destroy"])
            ));
        }
        if g.maybe() {
            let m = g.value(&["1", "2", "10000000"], &["18446744073709551615"]);
            y.push_str(&format!("    min_close_wait: {m}\n"));
        }
        if g.maybe() {
            let r = g.value(&["50%", "80%", "100%"], &["101%", "0%"]);
            let s = g.pick(&["90%", "95%", "100%"]);
            y.push_str(&format!(
                "    escalate: {{raise_fd_limit_at: {r}, signal_at: {s}}}\n"
            ));
        }
    }
    y
}

#[test]
fn every_policy_check_accepts_runs_three_cycles() {
    let mut accepted = 0;
    let mut refused = 0;
    for seed in 1..=400u64 {
        let mut g = Gen(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let yaml = random_policy(&mut g);
        let Ok(cfg) = config::parse(&yaml, "random.yaml") else {
            refused += 1;
            continue;
        };
        accepted += 1;
        let k = FakeKernel::new();
        k.spawn(Process::new(API, "api").files(900).limits(1000, 2000));
        k.listener(API, 3, "10.0.0.1:8080");
        k.close_wait_many(API, 10, 5, "10.0.0.1:8080");
        k.dead(API, 40, "10.0.0.1:8080");
        let interval = cfg.interval;
        let mut d = Daemon::with_kernel(k, cfg, false, Health::default())
            .unwrap_or_else(|e| panic!("seed {seed}: {e}\n{yaml}"));
        for _ in 0..3 {
            let r = d.cycle(&AtomicBool::new(false));
            assert!(r.duration < Duration::from_secs(5), "seed {seed}\n{yaml}");
            d.kernel().advance(interval);
        }
    }
    assert!(
        accepted > 50 && refused > 50,
        "both kinds drawn: {accepted} accepted, {refused} refused"
    );
}

// ---------------------------------------------------------------------------------------
// fd usage: the warning's hysteresis and the EMFILE forecast.

/// Give process `pid` exactly `n` open fds that are not sockets (fds 100 on).
fn set_files(k: &FakeKernel, pid: i32, n: usize) {
    k.with(|w| {
        if let Some(p) = w.processes.get_mut(&pid) {
            p.fds.retain(|_, f| !matches!(f, Fd::File));
            for i in 0..n {
                p.fds.insert(100 + i32::try_from(i).unwrap_or(0), Fd::File);
            }
        }
    });
}

#[test]
fn the_fd_usage_warning_is_set_above_80_and_cleared_only_below_70_one_line_per_crossing() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(50).limits(100, 100));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    let warned = "process is close to its fd limit (RLIMIT_NOFILE): accept() will fail with EMFILE";
    let cleared = "process is back below 70 % of its fd limit: the fd-usage warning is cleared";
    let metrics = super::metrics::Metrics::new();
    let (mut warnings, mut clears, mut states) = (0, 0, Vec::new());
    // fds swinging around 80 % of the limit, then below 70 %, then up again.
    for n in [50, 79, 80, 78, 81, 72, 79, 80, 70, 69, 75, 79, 80] {
        set_files(d.kernel(), API, n);
        d.kernel().advance(Duration::from_secs(5));
        let (r, events) = cycle_logged(&mut d);
        warnings += messages(&events, warned).len();
        clears += messages(&events, cleared).len();
        let g = r.targets.get("api").copied().expect("gauges");
        states.push(g.fd_warning);
        metrics.observe(&r);
        let gauge = format!(
            "cwreap_fd_usage_warning{{target=\"api\"}} {}",
            u8::from(g.fd_warning)
        );
        assert!(metrics.render().contains(&gauge), "at {n}: {gauge}");
    }
    assert_eq!(
        states,
        [
            false, false, true, true, true, true, true, true, true, false, false, false, true
        ]
    );
    assert_eq!((warnings, clears), (2, 1), "one line per crossing");
}

#[test]
fn the_emfile_forecast_is_the_soonest_over_the_targets_processes() {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api").files(100).limits(1000, 1000));
    k.spawn(Process::new(WEB, "api").files(100).limits(4000, 4000));
    let t = "name: api\nmatch: {comm: api}\nolder_than: 1h\naction: shutdown";
    let mut d = daemon(k, &policy("", &[t]));
    let forecast = |r: &CycleReport| r.targets.get("api").and_then(|g| g.emfile_in_ms);
    assert_eq!(forecast(&cycle(&mut d)), None, "one sample: no forecast");
    d.kernel().advance(Duration::from_secs(5));
    assert_eq!(forecast(&cycle(&mut d)), None, "flat: no forecast");
    // API leaks 2 fds/s, WEB 4 fds/s with four times the room: API runs out first.
    for i in 1..=5usize {
        set_files(d.kernel(), API, 100 + 10 * i);
        set_files(d.kernel(), WEB, 100 + 20 * i);
        d.kernel().advance(Duration::from_secs(5));
        let r = cycle(&mut d);
        // API: the fds left at its growth since the first sample (10·i fds in 5·(i+1) s).
        let i = i as f64;
        let expect_ms = (1000.0 - (100.0 + 10.0 * i)) / (10.0 * i / (5.0 * (i + 1.0))) * 1000.0;
        let got = forecast(&r).expect("a forecast") as f64;
        assert!(
            (got - expect_ms).abs() <= 1.0,
            "cycle {i}: {got} ms, not {expect_ms}"
        );
    }
    let metrics = super::metrics::Metrics::new();
    let r = after(&mut d, 5);
    metrics.observe(&r);
    assert!(
        metrics
            .render()
            .contains("cwreap_emfile_forecast_seconds{target=\"api\"} "),
        "{}",
        metrics.render()
    );
}

#[test]
fn a_pid_the_policy_names_is_the_process_it_named_until_a_reload() {
    let k = with_process(API, "api");
    let yaml = policy("", &[&on_pid("api", API, "30s")]);
    let mut d = daemon(k, &yaml);
    cycle(&mut d);
    // The process exits and a later one gets its pid, holding a CLOSE_WAIT socket.
    d.kernel().exit(API);
    let mut later = Process::new(API, "api");
    later.start_time += 1;
    d.kernel().spawn(later);
    d.kernel().close_wait(API, 9, LOCAL, &remote(1));
    let (r, events) = cycle_logged(&mut d);
    assert_eq!(r.candidates, 0, "{r:?}");
    let said = "the process the policy names by this pid exited, and the pid now names another process: it is not a target by that pid (reload the policy to name it)";
    assert_eq!(messages(&events, said).len(), 1, "{events:?}");
    let (r, events) = {
        d.kernel().advance(Duration::from_secs(31));
        cycle_logged(&mut d)
    };
    assert_eq!(total(&r), 0, "{:?}", r.outcomes);
    assert!(messages(&events, said).is_empty(), "said once: {events:?}");
    assert!(d.kernel().shutdowns().is_empty());
    // A reload names the pid again: the process that has it now.
    d.reload(cfg(&yaml)).expect("reload");
    assert_eq!(cycle(&mut d).candidates, 1);
    let r = after(&mut d, 31);
    assert_eq!(reaped(&r, "api"), 1, "{r:?}");
}

/// A kernel reporting events with exact ages and a host-wide listing, with process API.
fn with_events(pid: i32) -> FakeKernel {
    let k = with_process(pid, "api");
    k.with(|w| {
        w.events = true;
        w.exact_ages = true;
        w.listing = true;
    });
    k
}

#[test]
fn with_events_a_quiet_cycle_ages_the_kept_candidates_until_one_is_due() {
    let k = with_events(API);
    k.close_wait_many(API, 10, 3, LOCAL);
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "30s")]));
    let r = cycle(&mut d);
    assert!(!r.quiet, "the first cycle is a full one");
    assert_eq!(r.candidates, 3);
    // Nothing changes: the kept candidates are aged again, exactly.
    let r = after(&mut d, 10);
    assert!(r.quiet, "{r:?}");
    assert_eq!(r.candidates, 3);
    assert_eq!(r.targets["api"].oldest_ms, 10_000);
    assert_eq!(r.targets["api"].close_wait, 3);
    let r = after_ms(&mut d, 19_999);
    assert!(r.quiet);
    assert_eq!(total(&r), 0, "29.999 s old");
    // Due: a full cycle decides, at the threshold and not a cycle later.
    let r = after_ms(&mut d, 1);
    assert!(!r.quiet);
    assert_eq!(reaped(&r, "api"), 3, "{:?}", r.outcomes);
    // The reaps are events: the next cycle is a full one, then quiet again.
    assert!(!cycle(&mut d).quiet);
    assert!(cycle(&mut d).quiet);
}

#[test]
fn with_events_any_change_makes_the_next_cycle_a_full_one() {
    let k = with_events(API);
    k.close_wait_many(API, 10, 2, LOCAL);
    let yaml = policy("", &[&on_pid("api", API, "1h")]);
    let mut d = daemon(k, &yaml);
    cycle(&mut d);
    assert!(cycle(&mut d).quiet);
    // A new CLOSE_WAIT socket.
    d.kernel().close_wait(API, 20, LOCAL, &remote(9));
    let r = cycle(&mut d);
    assert!(!r.quiet);
    assert_eq!(r.candidates, 3);
    assert!(cycle(&mut d).quiet);
    // A target's open fd count moved (a socket accepted from the queue may be its new
    // owner's fd, with no event).
    d.kernel().other_socket(API, 30, false);
    assert!(!cycle(&mut d).quiet);
    assert!(cycle(&mut d).quiet);
    // A reload.
    d.reload(cfg(&yaml)).expect("reload");
    assert!(!cycle(&mut d).quiet);
    assert!(cycle(&mut d).quiet);
    // Another target process.
    d.kernel().spawn(Process::new(WEB, "web"));
    let two = policy("", &[&on_pid("api", API, "1h"), &on_pid("web", WEB, "1h")]);
    d.reload(cfg(&two)).expect("reload");
    assert!(!cycle(&mut d).quiet);
    assert!(cycle(&mut d).quiet);
    d.kernel().exit(WEB);
    assert!(!cycle(&mut d).quiet, "a target gone");
    // Polling never keeps candidates.
    let k = with_process(API, "api");
    k.close_wait_many(API, 10, 2, LOCAL);
    let mut d = daemon(k, &yaml);
    cycle(&mut d);
    assert!(!cycle(&mut d).quiet);
}

#[test]
fn with_events_sockets_reported_in_a_dry_run_keep_cycles_quiet() {
    let k = with_events(API);
    k.close_wait_many(API, 10, 2, LOCAL);
    let target = format!("{}\ndry_run: true", on_pid("api", API, "5s"));
    let mut d = daemon(k, &policy("", &[&target]));
    cycle(&mut d);
    let r = after(&mut d, 5);
    assert!(!r.quiet);
    assert_eq!(outcomes(&r, "api", Action::Shutdown, Outcome::DryRun), 2);
    // Reported once, still in CLOSE_WAIT: nothing left to be due.
    for _ in 0..3 {
        let r = after(&mut d, 60);
        assert!(r.quiet, "{r:?}");
        assert_eq!(total(&r), 0);
        assert_eq!(r.candidates, 2);
    }
}

// ---------------------------------------------------------------------------------------
// Between cycles, with events.

fn fd_reads(d: &Daemon<FakeKernel>, pid: i32) -> usize {
    d.kernel()
        .calls()
        .iter()
        .filter(|c| **c == Call::FdTable { pid })
        .count()
}

#[test]
fn between_cycles_a_new_socket_is_known_with_its_owner_and_exact_entry() {
    let k = with_events(API);
    k.close_wait_many(API, 10, 2, LOCAL);
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    assert!(
        d.detect().entered.is_empty(),
        "nothing before the first cycle"
    );
    cycle(&mut d);
    assert!(cycle(&mut d).quiet);
    let reads = fd_reads(&d, API);
    d.kernel().advance(Duration::from_millis(300));
    let key = d.kernel().close_wait(API, 20, LOCAL, &remote(9));
    d.kernel().advance(Duration::from_millis(4));
    let seen = d.detect();
    assert_eq!(seen.entered.len(), 1, "{seen:?}");
    assert_eq!(seen.entered[0].0, key);
    assert_eq!(seen.entered[0].1, vec![Holder { pid: API, fd: 20 }]);
    assert_eq!(seen.latencies, vec![Duration::from_millis(4)], "{seen:?}");
    assert_eq!(
        fd_reads(&d, API),
        reads + 1,
        "its table read once: its count moved"
    );
    // Nothing more queued: nothing more read.
    let again = d.detect();
    assert!(again.entered.is_empty() && again.left == 0, "{again:?}");
    assert_eq!(fd_reads(&d, API), reads + 1);
    // The next cycle is a full one, finds it arrived, aged from the event, and reads no
    // table again.
    d.kernel().advance(Duration::from_secs(1));
    let r = cycle(&mut d);
    assert!(!r.quiet);
    assert_eq!(r.candidates, 3);
    let g = r.targets.get("api").copied().expect("gauges");
    assert_eq!((g.close_wait, g.new_close_wait), (3, 1));
    assert_eq!(fd_reads(&d, API), reads + 1);
    assert!(cycle(&mut d).quiet);
}

#[test]
fn between_cycles_a_socket_that_leaves_is_gone_by_the_next_cycle_and_others_stay_unowned() {
    let k = with_events(API);
    k.close_wait_many(API, 10, 3, LOCAL);
    k.spawn(Process::new(WEB, "web"));
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "30s")]));
    cycle(&mut d);
    d.kernel().close_fd(API, 10);
    // A socket of a process no target names, in the same namespace.
    let stranger = d.kernel().close_wait(WEB, 5, LOCAL, &remote(8));
    let seen = d.detect();
    assert_eq!(seen.left, 1, "{seen:?}");
    assert_eq!(seen.entered.len(), 1, "{seen:?}");
    assert_eq!(seen.entered[0].0, stranger);
    assert!(seen.entered[0].1.is_empty(), "no target holds it");
    assert!(seen.latencies.is_empty(), "no owner: no latency");
    let r = after(&mut d, 30);
    assert!(!r.quiet);
    assert_eq!(reaped(&r, "api"), 2, "{:?}", r.outcomes);
    let shut = d.kernel().shutdowns();
    assert_eq!(shut.len(), 2, "{shut:?}");
    assert!(
        shut.iter().all(|s| s.0 == API && s.1 != 10),
        "neither the closed fd nor the stranger: {shut:?}"
    );
}

#[test]
fn polling_reads_nothing_between_cycles() {
    let k = with_process(API, "api");
    k.close_wait_many(API, 10, 2, LOCAL);
    let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1h")]));
    cycle(&mut d);
    d.kernel().close_wait(API, 20, LOCAL, &remote(9));
    let before = d.kernel().calls().len();
    let seen = d.detect();
    assert!(seen.entered.is_empty() && !seen.failed, "{seen:?}");
    assert_eq!(d.kernel().calls().len(), before, "not one call");
}

#[test]
fn a_connection_skipped_in_the_accept_queue_is_reaped_once_accepted() {
    for events in [false, true] {
        let k = if events {
            with_events(API)
        } else {
            with_process(API, "api")
        };
        k.listener(API, 3, "10.0.0.1:8080");
        let queued = k.unaccepted(API, LOCAL, &remote(1));
        let mut d = daemon(k, &policy("", &[&on_pid("api", API, "1s")]));
        cycle(&mut d);
        let r = after(&mut d, 2);
        assert_eq!(
            outcomes(&r, "api", Action::Shutdown, Outcome::Skipped),
            1,
            "{r:?}"
        );
        let r = after(&mut d, 2);
        assert_eq!(total(&r), 0, "skipped once, not every cycle: {r:?}");
        d.kernel().accept(queued, API, 12);
        let r = after(&mut d, 2);
        assert_eq!(reaped(&r, "api"), 1, "events {events}: {r:?}");
        assert_eq!(d.kernel().shutdowns().len(), 1);
        assert_eq!(d.kernel().shutdowns()[0].1, 12);
        let r = after(&mut d, 2);
        assert_eq!(total(&r), 0, "once: {r:?}");
    }
}
