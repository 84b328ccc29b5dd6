//! P1d: what looking for dead held sockets adds to P1's scan. The fixture's servers also
//! hold U unix sockets (socketpairs) and a few dead TCP sockets (state CLOSE, in no
//! sock_diag table, still held by an fd); the scan runs in-process through the commands'
//! own path (`observe_in`, selection, JSON lines), once with `Scope.dead` as the commands
//! set it and once without, alternating, with `ss -tanpi state close-wait` timed in the
//! same repetitions. With probing, every process's fd table is walked (the tables read on
//! several threads, since all must be read), the socket fds in no CLOSE_WAIT dump are
//! checked against the unix, TCP and UDP dumps, and the rest (the dead ones) are duplicated
//! and asked TCP_INFO. Besides the wall time, the CPU time (user + system, all threads) of
//! each scan: what probing costs the machine, whatever the threads save in waiting.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use cwreap::cli::args::{Cli, Command as Cmd, ScanArgs};
use cwreap::cli::commands::common::observe_in;
use cwreap::cli::{plan, render};
use cwreap_linux::kernel::Linux;
use cwreap_testkit::fleet::Fleet;

use super::{Row, median, ms, time_command, verdict};

/// The bound: probing adds at most 20 % to the scan.
const MAX_OVERHEAD: f64 = 1.20;

/// `cwreap scan --json` as the command line parses it.
fn scan_args() -> Result<ScanArgs> {
    match Cli::try_parse_from(["cwreap", "scan", "--json"])
        .context("parsing `cwreap scan --json`")?
        .command
    {
        Cmd::Scan(a) => Ok(a),
        other => bail!("`cwreap scan --json` parsed as {other:?}"),
    }
}

/// One scan's wall time and CPU time.
#[derive(Clone, Copy)]
struct Took {
    wall: Duration,
    cpu: Duration,
}

/// CPU time (user + system) of this process so far, all threads.
fn cpu_now() -> Result<Duration> {
    cwreap_testkit::cpu_time(std::process::id() as i32)
        .ok_or_else(|| anyhow::anyhow!("no /proc/self/stat"))
}

/// One scan, as `cwreap scan --json` runs it, with dead probing on or off: what it took,
/// and its JSON lines.
fn scan(args: &ScanArgs, dead: bool) -> Result<(Took, Vec<u8>)> {
    let cpu = cpu_now()?;
    let t = Instant::now();
    let mut k = Linux::for_cli();
    let mut scope = args.selectors.scope();
    scope.dead = dead;
    let (snap, _failures, _unprobed) = observe_in(&mut k, false, &scope)?;
    let rows = plan::select(&snap, &args.selectors.filter(args.older_than));
    let mut out = Vec::with_capacity(rows.len() * 256);
    for r in &rows {
        render::write_scan_json(&mut out, r)?;
    }
    let wall = t.elapsed();
    let took = Took {
        wall,
        cpu: cpu_now()?.saturating_sub(cpu),
    };
    Ok((took, out))
}

/// The fixture's CLOSE_WAIT rows (by local address) and dead rows held by its servers.
fn count(out: &[u8], fleet: &Fleet) -> Result<(usize, usize)> {
    let ours: HashSet<SocketAddr> = fleet.listen.iter().copied().collect();
    let servers: HashSet<i64> = fleet.server_pids().iter().map(|&p| i64::from(p)).collect();
    let text = std::str::from_utf8(out).context("scan output is not UTF-8")?;
    let (mut close_wait, mut dead) = (0, 0);
    for v in super::json_lines(text, "in-process scan")? {
        let state = v.get("state").and_then(serde_json::Value::as_str);
        let pid = v.get("pid").and_then(serde_json::Value::as_i64);
        let held = pid.is_some_and(|p| servers.contains(&p));
        if state == Some("CLOSE") {
            dead += usize::from(held);
        } else if super::field_addr(&v, "local").is_some_and(|a| ours.contains(&a)) {
            if !held {
                bail!("a fixture socket attributed to pid {pid:?}, not a server: {v}");
            }
            close_wait += 1;
        }
    }
    Ok((close_wait, dead))
}

pub(super) fn p1d(
    fleet: &mut Fleet,
    unix: usize,
    dead: usize,
    reps: usize,
    log: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    fleet
        .set_extras(unix, dead)
        .context("unix and dead sockets in the fixture")?;
    let (u, d) = (fleet.unix_sockets(), fleet.dead());
    log(&format!(
        "P1d: the servers hold {u} unix sockets and {d} dead TCP sockets besides their connections"
    ));
    let rows = measure(fleet, reps, log);
    // The other figures run on the fixture as it was.
    fleet.set_extras(0, 0).context("dropping the extras")?;
    rows
}

fn measure(fleet: &Fleet, reps: usize, log: &dyn Fn(&str)) -> Result<Vec<Row>> {
    let args = scan_args()?;
    // Correctness first (and a warm-up of both): the N CLOSE_WAIT sockets either way, the
    // dead ones only with probing.
    for (probe, want_dead) in [(true, fleet.dead()), (false, 0)] {
        let (_, out) = scan(&args, probe)?;
        let (cw, dead) = count(&out, fleet)?;
        if (cw, dead) != (fleet.n, want_dead) {
            bail!(
                "in-process scan (dead probing {}): {cw} CLOSE_WAIT and {dead} dead sockets of \
the fixture, expected {} and {want_dead}",
                if probe { "on" } else { "off" },
                fleet.n
            );
        }
    }
    let (mut on, mut off, mut ss) = (Vec::new(), Vec::new(), Vec::new());
    let (mut on_cpu, mut off_cpu) = (Vec::new(), Vec::new());
    let ss_cmd = || {
        let mut c = Command::new("ss");
        c.args(["-tanpi", "state", "close-wait"]);
        c
    };
    for i in 0..reps {
        // Alternate the order, so neither side always runs on a cache the other warmed.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for probe in order {
            let took = scan(&args, probe)?.0;
            let (wall, cpu) = if probe {
                (&mut on, &mut on_cpu)
            } else {
                (&mut off, &mut off_cpu)
            };
            wall.push(took.wall);
            cpu.push(took.cpu);
        }
        ss.push(time_command(&mut ss_cmd())?);
    }
    let (on, off, ss) = (median(on), median(off), median(ss));
    let (on_cpu, off_cpu) = (median(on_cpu), median(off_cpu));
    let secs = |d: Duration| d.as_secs_f64();
    let overhead = secs(on) / secs(off);
    let cpu_overhead = secs(on_cpu) / secs(off_cpu).max(1e-3);
    log(&format!(
        "P1d scan in-process: probing off {}, on {} (on/off {overhead:.2}); ss -tanpi {} \
(off/ss {:.2}, on/ss {:.2}); CPU off {}, on {} (on/off {cpu_overhead:.2})",
        ms(off),
        ms(on),
        ms(ss),
        secs(off) / secs(ss),
        secs(on) / secs(ss),
        ms(off_cpu),
        ms(on_cpu)
    ));
    let extras = format!(
        "+ {} unix, {} dead sockets",
        fleet.unix_sockets(),
        fleet.dead()
    );
    let ss_text = format!("{} (`ss -tanpi state close-wait`)", ms(ss));
    Ok(vec![
        Row {
            figure: format!("P1d scan in-process, dead probing off ({extras})"),
            n: fleet.n,
            m: fleet.m,
            value: ms(off),
            ss: ss_text.clone(),
            ratio: format!("{:.2}", secs(off) / secs(ss)),
            target: "—".into(),
            verdict: "—",
        },
        Row {
            figure: format!("P1d scan in-process, dead probing on ({extras})"),
            n: fleet.n,
            m: fleet.m,
            value: ms(on),
            ss: ss_text,
            ratio: format!("{:.2}", secs(on) / secs(ss)),
            target: "—".into(),
            verdict: "—",
        },
        Row {
            figure: "P1d dead probing: on / off, wall".into(),
            n: fleet.n,
            m: fleet.m,
            value: format!("{:+.0} %", (overhead - 1.0) * 100.0),
            ss: "—".into(),
            ratio: format!("{overhead:.2}"),
            target: format!("ratio ≤ {MAX_OVERHEAD:.2}"),
            verdict: verdict(overhead <= MAX_OVERHEAD),
        },
        Row {
            figure: format!(
                "P1d dead probing: on / off, CPU per scan (user+sys, all threads: {} / {})",
                ms(on_cpu),
                ms(off_cpu)
            ),
            n: fleet.n,
            m: fleet.m,
            value: format!("{:+.0} %", (cpu_overhead - 1.0) * 100.0),
            ss: "—".into(),
            ratio: format!("{cpu_overhead:.2}"),
            target: "—".into(),
            verdict: "—",
        },
    ])
}
