//! The commands on a recording kernel: what scan, reap and explain ask of the system and
//! what they print, without root. The real kernel's side is in the integration tests.

use cwreap_linux::kernel::Clock;
use cwreap_linux::kernel::fake::{Call, FakeKernel, Process};
use cwreap_linux::tcp;
use serde_json::Value;

use super::common::Status;
use super::explain::explain_on;
use super::reap::reap_on;
use super::scan::scan_on;
use crate::cli::args::{Cli, Command};
use clap::Parser;

const API: i32 = 4100;

fn parse(args: &[&str]) -> Command {
    let mut argv = vec!["cwreap"];
    argv.extend_from_slice(args);
    Cli::try_parse_from(argv)
        .expect("valid command line")
        .command
}

/// A kernel with one server holding three CLOSE_WAIT sockets on :8080, one of them
/// reported by tcp_info 90 s since the peer's last ACK.
fn server() -> FakeKernel {
    let k = FakeKernel::new();
    k.spawn(Process::new(API, "api"));
    k.listener(API, 3, "10.0.0.1:8080");
    let socks = k.close_wait_many(API, 10, 3, "10.0.0.1:8080");
    k.with(|w| {
        if let Some(s) = w.sockets.get_mut(&socks[0]) {
            s.diag.last_ack_recv_ms = Some(90_000);
        }
    });
    k
}

fn lines(out: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn duplicated(k: &FakeKernel) -> usize {
    k.calls()
        .iter()
        .filter(|c| matches!(c, Call::Duplicate { .. } | Call::OpenProcess { .. }))
        .count()
}

#[test]
fn scan_lists_every_close_wait_socket_with_its_owner_and_touches_nothing() {
    let mut k = server();
    let Command::Scan(args) = parse(&["scan", "--json"]) else {
        panic!("not scan");
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let st = scan_on(&mut k, &args, false, &mut out, &mut err).expect("scan");
    assert_eq!(st, Status::Ok);
    let rows = lines(&out);
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["pid"] == API && r["comm"] == "api"));
    assert!(
        rows.iter().all(|r| r["direction"] == "in"),
        "a listener on :8080: server ends"
    );
    let mut fds: Vec<i64> = rows.iter().filter_map(|r| r["fd"].as_i64()).collect();
    fds.sort_unstable();
    assert_eq!(fds, [10, 11, 12]);
    assert_eq!(duplicated(&k), 0, "scan never pins or duplicates");
    assert!(k.calls().contains(&Call::Cover {
        pids: vec![API],
        own: true
    }));
}

#[test]
fn scan_older_than_keeps_only_old_sockets_and_says_so_when_none() {
    let mut k = server();
    let Command::Scan(args) = parse(&["scan", "--json", "--older-than", "60s"]) else {
        panic!("not scan");
    };
    let mut out = Vec::new();
    scan_on(&mut k, &args, false, &mut out, &mut Vec::new()).expect("scan");
    assert_eq!(lines(&out).len(), 1, "only the one 90 s since the last ACK");
    let Command::Scan(args) = parse(&["scan", "--pid", "4100", "--older-than", "1h"]) else {
        panic!("not scan");
    };
    let mut out = Vec::new();
    scan_on(&mut k, &args, false, &mut out, &mut Vec::new()).expect("scan");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("No CLOSE_WAIT sockets match the selection"),
        "{text}"
    );
}

#[test]
fn reap_dry_run_proves_each_socket_and_shuts_nothing_down() {
    let mut k = server();
    let Command::Reap(args) = parse(&[
        "reap",
        "--pid",
        "4100",
        "--older-than",
        "0s",
        "--dry-run",
        "--json",
    ]) else {
        panic!("not reap");
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let st = reap_on(&mut k, &args, &mut out, &mut err).expect("reap");
    assert_eq!(st, Status::Ok);
    let rows = lines(&out);
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r["outcome"] == "dry_run" && r["action"] == "shutdown")
    );
    assert!(k.shutdowns().is_empty());
    assert!(String::from_utf8_lossy(&err).contains("3 matched"));
}

#[test]
fn reap_shuts_down_the_oldest_first_within_max() {
    let mut k = server();
    let Command::Reap(args) = parse(&[
        "reap",
        "--comm",
        "^api$",
        "--older-than",
        "0s",
        "--max",
        "1",
    ]) else {
        panic!("not reap");
    };
    let mut out = Vec::new();
    reap_on(&mut k, &args, &mut out, &mut Vec::new()).expect("reap");
    assert_eq!(k.shutdowns().len(), 1);
    assert_eq!(
        k.shutdowns()[0].1,
        10,
        "the one 90 s since the last ACK goes first"
    );
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("1 matched, 1 reaped"), "{text}");
    let closed = k.with(|w| {
        w.sockets
            .values()
            .filter(|s| s.diag.state == tcp::CLOSE)
            .count()
    });
    assert_eq!(closed, 1);
}

#[test]
fn reap_destroy_dry_run_proves_sock_destroy_in_each_namespace_once() {
    let mut k = server();
    let Command::Reap(args) = parse(&[
        "reap",
        "--pid",
        "4100",
        "--older-than",
        "0s",
        "--destroy",
        "--dry-run",
    ]) else {
        panic!("not reap");
    };
    reap_on(&mut k, &args, &mut Vec::new(), &mut Vec::new()).expect("reap");
    let proofs = k
        .calls()
        .iter()
        .filter(|c| matches!(c, Call::ProveDestroy { .. }))
        .count();
    assert_eq!(proofs, 1, "one namespace, one proof");
    assert!(!k.calls().iter().any(|c| matches!(c, Call::Destroy { .. })));
}

#[test]
fn reap_without_older_than_or_a_selector_is_a_usage_error_touching_nothing() {
    let mut k = server();
    let Command::Reap(args) = parse(&["reap", "--pid", "4100"]) else {
        panic!("not reap");
    };
    let e = reap_on(&mut k, &args, &mut Vec::new(), &mut Vec::new()).expect_err("refused");
    assert!(e.to_string().contains("--older-than"), "{e}");
    assert!(k.calls().is_empty(), "nothing was even read");
}

#[test]
fn explain_names_the_bug_class_from_the_receive_queue() {
    let mut k = server();
    let Command::Explain(args) = parse(&["explain", "--json"]) else {
        panic!("not explain");
    };
    let mut out = Vec::new();
    explain_on(&mut k, &args, &mut out, &mut Vec::new()).expect("explain");
    let reports = lines(&out);
    assert_eq!(reports.len(), 1, "one process");
    assert_eq!(reports[0]["pid"], API);
    // recv_q 1, no epoll, server ends (a listener on :8080), a process of no known runtime.
    assert_eq!(reports[0]["patterns"]["abandoned"], 3, "{}", reports[0]);
    assert_eq!(reports[0]["runtime"], "other", "{}", reports[0]);
    assert_eq!(duplicated(&k), 0, "explain is read-only");
}

/// A process whose memory map does not come back in time: explain goes on, names no
/// runtime (`unknown`, and says why) and gives the advice that holds for any.
#[test]
fn explain_with_a_stalled_map_says_unknown_and_goes_on() {
    let mut k = server();
    k.with(|w| {
        if let Some(p) = w.processes.get_mut(&API) {
            p.maps_stall = true;
        }
    });
    let mut out = Vec::new();
    let Command::Explain(args) = parse(&["explain", "--json"]) else {
        panic!("not explain");
    };
    explain_on(&mut k, &args, &mut out, &mut Vec::new()).expect("explain");
    let r = &lines(&out)[0];
    assert_eq!(r["runtime"], "unknown", "{r}");
    assert_eq!(
        r["runtime_clue"], "its memory map could not be read in time",
        "{r}"
    );
    assert_eq!(r["patterns"]["abandoned"], 3, "{r}");
    let Command::Explain(args) = parse(&["explain"]) else {
        panic!("not explain");
    };
    let mut text = Vec::new();
    explain_on(&mut k, &args, &mut text, &mut Vec::new()).expect("explain");
    let text = String::from_utf8_lossy(&text);
    assert!(
        text.contains("  runtime: unknown (its memory map could not be read in time)"),
        "{text}"
    );
    assert!(!text.contains("GC may close"), "{text}");
}

/// A JVM: the runtime from libjvm.so in its map, its full collections from its perf data,
/// and per socket whether a collection may still close it (a socket in CLOSE_WAIT for 90 s
/// survived one that ran 10 s ago; the fresh ones have not been through one).
#[test]
fn explain_reads_a_jvms_collections() {
    use cwreap_linux::procfs::{Collector, JvmGc};
    let mut k = FakeKernel::new();
    let mut java = Process::new(API, "java").runs(
        "/usr/lib/jvm/java-17/bin/java",
        &["/usr/lib/jvm/java-17/lib/server/libjvm.so"],
        &["", ".text"],
    );
    java.jvm_gc = Some(JvmGc {
        frequency: 1_000_000_000,
        now_ticks: 100_000_000_000,
        collectors: vec![Collector {
            name: "Serial full collection pauses".into(),
            invocations: 1,
            last_entry_ticks: 90_000_000_000,
            last_exit_ticks: 90_050_000_000,
        }],
    });
    k.spawn(java);
    k.listener(API, 3, "10.0.0.1:8080");
    let socks = k.close_wait_many(API, 10, 3, "10.0.0.1:8080");
    k.with(|w| {
        if let Some(s) = w.sockets.get_mut(&socks[0]) {
            s.diag.last_ack_recv_ms = Some(90_000);
        }
    });
    let Command::Explain(args) = parse(&["explain", "--json"]) else {
        panic!("not explain");
    };
    let mut out = Vec::new();
    explain_on(&mut k, &args, &mut out, &mut Vec::new()).expect("explain");
    let r = &lines(&out)[0];
    assert_eq!(r["runtime"], "jvm", "{r}");
    assert_eq!(r["gc"]["full_collections"], 1, "{r}");
    let may: Vec<(i64, bool)> = r["sockets"]
        .as_array()
        .expect("sockets")
        .iter()
        .filter_map(|s| Some((s["fd"].as_i64()?, s["gc_may_close"].as_bool()?)))
        .collect();
    assert_eq!(may, [(10, false), (11, true), (12, true)], "{r}");
    assert_eq!(duplicated(&k), 0, "explain is read-only");
}

#[test]
fn dead_held_sockets_are_listed_in_state_close_and_never_reaped() {
    let mut k = server();
    k.dead(API, 20, "10.0.0.1:8080");
    k.dead(API, 21, "10.0.0.1:8080");
    k.never_connected(API, 22);
    k.other_socket(API, 23, false);
    let Command::Scan(args) = parse(&["scan", "--json"]) else {
        panic!("not scan");
    };
    let mut out = Vec::new();
    scan_on(&mut k, &args, false, &mut out, &mut Vec::new()).expect("scan");
    let rows = lines(&out);
    let dead: Vec<&Value> = rows.iter().filter(|r| r["state"] == "CLOSE").collect();
    assert_eq!(
        dead.len(),
        2,
        "the never-connected and the unix socket are not dead"
    );
    assert!(
        dead.iter()
            .all(|r| r["remote"].is_null() && r["pid"] == API)
    );
    assert_eq!(
        rows.iter().filter(|r| r["state"] == "CLOSE_WAIT").count(),
        3
    );

    let Command::Reap(args) = parse(&["reap", "--pid", "4100", "--older-than", "0s"]) else {
        panic!("not reap");
    };
    let mut out = Vec::new();
    reap_on(&mut k, &args, &mut out, &mut Vec::new()).expect("reap");
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("3 matched, 3 reaped"), "{text}");
    assert!(text.contains("2 dead held socket(s) matched"), "{text}");
    assert!(text.contains("--close"), "{text}");
    assert!(
        k.shutdowns().iter().all(|(_, fd, _)| *fd < 20),
        "dead sockets are never shut down: {:?}",
        k.shutdowns()
    );
}

#[test]
fn dead_held_sockets_are_found_on_a_host_with_no_close_wait_socket() {
    // What a reap leaves behind when the owner keeps its fds: only dead sockets.
    let mut k = FakeKernel::new();
    k.spawn(Process::new(API, "api"));
    k.listener(API, 3, "10.0.0.1:8080");
    k.dead(API, 20, "10.0.0.1:8080");
    let Command::Scan(args) = parse(&["scan", "--json"]) else {
        panic!("not scan");
    };
    let mut out = Vec::new();
    scan_on(&mut k, &args, false, &mut out, &mut Vec::new()).expect("scan");
    let rows = lines(&out);
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(
        (&rows[0]["state"], &rows[0]["fd"]),
        (&"CLOSE".into(), &20.into())
    );
}

#[test]
fn a_refused_probe_warns_naming_the_capability_and_never_says_none() {
    let mut k = server();
    k.dead(API, 20, "10.0.0.1:8080");
    k.with(|w| w.faults.duplicate.insert((API, 20), libc::EPERM));
    let Command::Scan(args) = parse(&["scan", "--json"]) else {
        panic!("not scan");
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    scan_on(&mut k, &args, false, &mut out, &mut err).expect("scan");
    let warning = String::from_utf8_lossy(&err);
    assert!(warning.contains("dead held sockets"), "{warning}");
    assert!(warning.contains("are unknown"), "{warning}");
    assert!(warning.contains("pidfd_getfd"), "{warning}");
    assert!(lines(&out).iter().all(|r| r["state"] == "CLOSE_WAIT"));
}

#[test]
fn the_summary_counts_dead_sockets_apart() {
    let mut k = server();
    k.dead(API, 20, "10.0.0.1:8080");
    let Command::Scan(args) = parse(&["scan"]) else {
        panic!("not scan");
    };
    let mut out = Vec::new();
    scan_on(&mut k, &args, false, &mut out, &mut Vec::new()).expect("scan");
    let text = String::from_utf8_lossy(&out);
    let summary = text
        .lines()
        .find(|l| l.trim_start().starts_with("4100  api"))
        .unwrap_or_else(|| panic!("no summary line in:\n{text}"));
    let cols: Vec<&str> = summary.split_whitespace().collect();
    assert_eq!(
        &cols[..4],
        ["4100", "api", "3", "1"],
        "CLOSE_WAIT 3, DEAD 1: {summary}"
    );
    assert!(
        text.contains("3 CLOSE_WAIT socket(s) and 1 dead held socket(s)"),
        "{text}"
    );
}

#[test]
fn the_running_daemons_first_sight_ages_sockets_as_it_does() {
    let mut k = server();
    // A heartbeat server: the peer acknowledges every write, so tcp_info says 2 s, while
    // the daemon has seen the sockets in CLOSE_WAIT for 30 s.
    let keys: Vec<_> = k.with(|w| w.sockets.keys().copied().collect());
    let seen = k.now().saturating_sub(std::time::Duration::from_secs(30));
    k.with(|w| {
        for key in &keys {
            if let Some(s) = w.sockets.get_mut(key) {
                s.diag.last_ack_recv_ms = Some(2_000);
                s.diag.last_data_recv_ms = Some(300_000);
            }
            w.published.insert(*key, seen);
        }
    });
    let Command::Scan(args) = parse(&["scan", "--json", "--older-than", "20s"]) else {
        panic!("not scan");
    };
    let mut out = Vec::new();
    scan_on(&mut k, &args, false, &mut out, &mut Vec::new()).expect("scan");
    let rows = lines(&out);
    assert_eq!(rows.len(), 3, "selected as the daemon selects them");
    assert!(
        rows.iter()
            .all(|r| r["age_source"] == "first_seen" && r["age_ms"] == 30_000)
    );
    assert!(rows.iter().all(|r| r["age_max_ms"] == 300_000));
}

#[test]
fn reap_says_how_many_may_qualify_when_only_the_upper_bound_reaches() {
    let mut k = server();
    let keys: Vec<_> = k.with(|w| w.sockets.keys().copied().collect());
    k.with(|w| {
        for key in &keys {
            if let Some(s) = w.sockets.get_mut(key) {
                s.diag.last_ack_recv_ms = Some(2_000);
                s.diag.last_data_recv_ms = Some(60_000);
                s.diag.keepalive = true;
            }
        }
    });
    let Command::Reap(args) = parse(&["reap", "--pid", "4100", "--older-than", "20s", "--dry-run"])
    else {
        panic!("not reap");
    };
    let mut out = Vec::new();
    reap_on(&mut k, &args, &mut out, &mut Vec::new()).expect("reap");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("0 matched"),
        "never on an upper bound: {text}"
    );
    assert!(
        text.contains("3 more socket(s) may be older than 20s"),
        "{text}"
    );
    assert!(text.contains("run the daemon"), "{text}");
    assert!(k.shutdowns().is_empty());
}
