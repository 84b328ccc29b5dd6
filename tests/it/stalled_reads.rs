//! A process whose command line cannot be read, against every `cmdline` selector: the
//! kernel reads a command line under the process's mmap lock, and `stall_mm.c` keeps that
//! lock from any new reader for as long as it lives (a thread stuck in a FUSE read that is
//! never answered holds it, and a second thread queues for it). An earlier cwreap read every
//! process's command line inline, so one such process blocked `scan --cmdline` and the
//! daemon's cycles for good.
//!
//! Now the command line is read last, only for a process every cheaper criterion accepts,
//! on a thread of its own with a deadline: a stalled process is skipped, named and counted,
//! and everything else goes on.

use std::io::Write;
use std::process::Command;
use std::time::Duration;

use crate::hardening::run_guarded;
use crate::support::*;

const V4: &str = "127.0.0.1:0";

/// `stall_mm` running, once a read of its command line blocks, holding a CLOSE_WAIT socket
/// of its own (so every way of attributing sockets must look at it: a host-wide listing
/// of socket fds as well as a walk of every process); killed on drop (its FUSE server dies
/// with it, which lets every stuck reader go).
fn stalled_process(test: &str) -> Option<LineChild> {
    let exe = runtimes::c_program(test, "stall_mm.c")?;
    let mut tries = Vec::new();
    for _ in 0..5 {
        let listener = std::net::TcpListener::bind(V4).expect("listen");
        let addr = listener.local_addr().expect("address").to_string();
        let mut p = LineChild::spawn("stall_mm", Command::new(&exe).args(["--connect", &addr]))
            .expect("start stall_mm");
        let fd: i32 = p
            .expect("connected ", HANG_GUARD)
            .ok()
            .and_then(|fd| fd.parse().ok())
            .unwrap_or_else(|| panic!("stall_mm said no fd\n{}", p.transcript()));
        // The peer closes: stall_mm's end goes to CLOSE_WAIT, never read.
        let (peer, _) = listener.accept().expect("accept");
        drop(peer);
        if let Err(e) = p.expect("stalled", HANG_GUARD) {
            // Its trap did not arm this time (it says so and exits): another one.
            let said = p.transcript();
            assert!(
                said.contains("unarmed"),
                "stall_mm never stalled: {e}\n{said}"
            );
            let _ = writeln!(
                std::io::stderr(),
                "stall_mm's trap did not arm; another try"
            );
            tries.push(said);
            continue;
        }
        let pid = p.pid();
        wait_until(
            "stall_mm's end in CLOSE_WAIT",
            || format!("{:?}", ss_close_wait(pid)),
            || ss_close_wait(pid).iter().any(|t| t.0 == fd).then_some(()),
        );
        return Some(p);
    }
    panic!("stall_mm's trap never armed in 5 tries: {tries:?}");
}

/// Whether a read of `path` from a thread of ours blocks in the kernel: it sleeps there
/// uninterruptibly (state `D`, a wait for the mmap lock) at five looks in a row without
/// returning, or it returns. A blocked reader is left behind; it returns once the process
/// holding the lock dies.
fn read_blocks(path: String) -> bool {
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tid_tx.send(rustix::thread::gettid().as_raw_nonzero().get());
        let _ = tx.send(std::fs::read(path));
    });
    let tid = tid_rx.recv().expect("the reader's tid");
    let mut asleep = 0;
    loop {
        if rx.recv_timeout(Duration::from_millis(20)).is_ok() {
            return false;
        }
        let me = i32::try_from(std::process::id()).expect("pid");
        asleep = if thread_state(me, tid) == Some('D') {
            asleep + 1
        } else {
            0
        };
        if asleep >= 5 {
            return true;
        }
    }
}

/// The kernel agrees the trap is armed: a read of /proc/PID/cmdline blocks.
fn assert_cmdline_blocks(pid: i32) {
    assert!(
        read_blocks(format!("/proc/{pid}/cmdline")),
        "reading the command line of pid {pid} returned: the hazard is not there"
    );
}

/// The pids of `scan --json` rows, with how many rows each.
fn rows_by_pid(out: &str) -> std::collections::BTreeMap<i64, usize> {
    let mut by = std::collections::BTreeMap::new();
    for line in out.lines().filter(|l| l.starts_with('{')) {
        let v: serde_json::Value = serde_json::from_str(line).expect("a JSON row");
        *by.entry(field_i64(&v, "pid")).or_insert(0) += 1;
    }
    by
}

#[test]
#[ignore = "needs root: mounts a FUSE file system (/dev/fuse) and reads other processes' fds"]
fn scan_by_cmdline_finishes_past_a_process_whose_command_line_never_reads() {
    let Some(stall) =
        stalled_process("scan_by_cmdline_finishes_past_a_process_whose_command_line_never_reads")
    else {
        return;
    };
    let stalled = stall.pid();
    assert_cmdline_blocks(stalled);
    let mut fx = Fixture::start(&[V4], &[]);
    let _clients: Vec<_> = (0..3).map(|_| fx.close_wait(0)).collect();
    assert_eq!(ss_close_wait(fx.pid()).len(), 3);

    // Host-wide, by command line: the command line of every process holding a CLOSE_WAIT
    // socket is read, the stalled one's too, whether the socket fds come from the BPF
    // iterator's listing or from a walk of /proc. The scan ends, finds the fixture's three
    // sockets, and names the one it skipped.
    for no_bpf in [false, true] {
        let mut args = vec!["scan", "--json", "--cmdline", "cwreap-fixture server"];
        if no_bpf {
            args.push("--no-bpf");
        }
        let (code, out, err, _) =
            run_guarded(without_pins(&mut Command::new(cwreap_bin())).args(&args));
        assert_eq!(code, Some(0), "{args:?}: {err}");
        assert_eq!(
            rows_by_pid(&out).get(&i64::from(fx.pid())),
            Some(&3),
            "{args:?}: the fixture's sockets:\n{out}\n{err}"
        );
        assert!(
            err.contains("were skipped") && err.contains(&stalled.to_string()),
            "{args:?}: the stalled process is named: {err}"
        );
    }

    // Cheaper criteria first: a name that rules the stalled process out means its command
    // line is never read, so nothing waits and nothing is said about it.
    let (code, out, err, _) = run_guarded(Command::new(cwreap_bin()).args([
        "scan",
        "--json",
        "--comm",
        "cwreap-fixture",
        "--cmdline",
        "server",
    ]));
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(
        rows_by_pid(&out).get(&i64::from(fx.pid())),
        Some(&3),
        "{out}"
    );
    assert!(
        !err.contains("were skipped"),
        "read a command line it did not need: {err}"
    );

    // Named by pid, it is an error that says why (exit 2), never "nothing here".
    let (code, _, err, _) = run_guarded(Command::new(cwreap_bin()).args([
        "scan",
        "--pid",
        &stalled.to_string(),
        "--cmdline",
        "anything",
    ]));
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("pid {stalled}")) && err.contains("did not return"),
        "{err}"
    );
    drop(stall);
}

#[test]
#[ignore = "needs root: mounts a FUSE file system (/dev/fuse) and runs the daemon on other processes' sockets"]
fn daemon_cycles_go_on_past_a_process_whose_command_line_never_reads() {
    let Some(stall) =
        stalled_process("daemon_cycles_go_on_past_a_process_whose_command_line_never_reads")
    else {
        return;
    };
    let stalled = stall.pid();
    assert_cmdline_blocks(stalled);
    let mut fx = Fixture::start(&[V4], &[]);
    let _clients: Vec<_> = (0..2).map(|_| fx.close_wait(0)).collect();
    let addr = metrics::free_addr();
    let yaml = format!(
        "interval: 200ms\ndry_run: true\nlog_format: json\nmetrics: {{listen: {addr}}}\n\
         targets:\n  - name: by-cmdline\n    match: {{cmdline: 'cwreap-fixture server'}}\n    older_than: 1ms\n    action: shutdown\n"
    );
    let mut d = LoggedDaemon::start("stalled-cmdline", &yaml);
    let fx_pid = fx.pid();
    // The fixture's sockets are found, cycle after cycle, while the stalled process is
    // skipped: logged once, counted every cycle.
    d.wait_for("the fixture's sockets found", |d| {
        let seen = d
            .daemon
            .events()
            .iter()
            .filter(|e| {
                e["message"] == "close_wait action"
                    && e["pid"].as_i64() == Some(i64::from(fx_pid))
                    && e["outcome"] == "dry_run"
            })
            .count();
        (seen >= 2).then_some(())
    });
    let scrape = |series: &str| {
        metrics::scrape(addr)
            .and_then(|t| metrics::sample(&t, series))
            .unwrap_or(0.0)
    };
    let stalled_errors = || scrape("cwreap_cycle_errors_total{kind=\"stalled_read\"}");
    let cycles = || scrape("cwreap_cycle_duration_seconds_count");
    // Counted every cycle while it lasts.
    let (c0, s0) = (cycles(), stalled_errors());
    wait_until(
        "five cycles counting the stalled read",
        || d.log(),
        || {
            let (c, s) = (cycles(), stalled_errors());
            (c >= c0 + 5.0 && s >= s0 + 5.0).then_some(())
        },
    );
    // Named once (other tests' stalled processes may come and go in other lines).
    let ours = d
        .lines()
        .iter()
        .filter(|l| l.contains("did not return in time") && l.contains(&stalled.to_string()))
        .count();
    assert_eq!(ours, 1, "logged once: {}", d.log());

    // Once the process is gone, its stuck read returns: three cycles in a row count none.
    drop(stall);
    let mut last = (cycles(), stalled_errors());
    wait_until(
        "three cycles without a stalled read",
        || d.log(),
        || {
            let (c, s) = (cycles(), stalled_errors());
            if s != last.1 {
                last = (c, s);
            }
            (c >= last.0 + 3.0).then_some(())
        },
    );
}

/// `explain` on a process whose mmap lock is held for good (stall_mm, holding a CLOSE_WAIT
/// socket of its own). The runtime is named from /proc/PID/maps, read under a deadline:
/// where the kernel reads a map under the mmap lock (older kernels), that read never
/// returns, and explain still ends, names the runtime `unknown` and says why; where it reads
/// a map under per-VMA locks (6.18 does), the map reads and the runtime is named (`other`).
/// Either way explain ends and gives the pattern.
#[test]
#[ignore = "needs root: mounts a FUSE file system (/dev/fuse)"]
fn explain_ends_and_names_no_runtime_for_a_process_whose_map_never_reads() {
    let test = "explain_ends_and_names_no_runtime_for_a_process_whose_map_never_reads";
    let Some(p) = stalled_process(test) else {
        return;
    };
    let pid = p.pid();
    assert_cmdline_blocks(pid);
    // Does this kernel read a map under the mmap lock? Then that read blocks.
    let map_blocks = read_blocks(format!("/proc/{pid}/maps"));

    for json in [true, false] {
        let pid_s = pid.to_string();
        let mut args = vec!["explain", "--pid", pid_s.as_str()];
        if json {
            args.push("--json");
        }
        let (code, out, err, _) = run_guarded(Command::new(cwreap_bin()).args(&args));
        assert_eq!(code, Some(0), "{args:?}: {err}\n{out}");
        let (runtime, clue) = if map_blocks {
            ("unknown", "its memory map could not be read in time")
        } else {
            (
                "other",
                "none of the runtimes explain knows shows in its executable and memory map",
            )
        };
        if json {
            let line: serde_json::Value =
                serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"));
            assert_eq!(line["runtime"], runtime, "{line}");
            assert_eq!(line["runtime_clue"], clue, "{line}");
            // A client's end, the FIN unread, nothing watching: what any runtime shows.
            assert_eq!(line["patterns"]["pool_idle"], 1, "{line}");
        } else {
            assert!(
                out.contains(&format!("  runtime: {runtime} ({clue})")),
                "{out}"
            );
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "{test}: the map {} under the mmap lock here",
        if map_blocks { "is read" } else { "is not read" }
    );
    drop(p);
}
