//! Discovery from the kernel's events (BPF) against polling and `ss`, on the same fixture:
//!
//! * P2e: the steady daemon cycle in events mode, in-process, as CPU time (user + system of
//!   this process) against the CPU time of `ss -tn state close-wait` (its children's rusage,
//!   summed over the repetitions by bash's `times`); the polling cycle the same way against
//!   `ss -tn`; and with a trickle of 10 new CLOSE_WAIT sockets per cycle (10/s at a 1 s
//!   interval) held by a second target, the CPU each new socket adds.
//! * P7: detection latency, from the peer's close to the daemon knowing the socket (its
//!   cookie, and its owner's pid and fd): in events mode the daemon's look at the events
//!   once the ring buffer is readable, as `cwreap run` does between cycles; in polling the
//!   next cycle at its interval.
//! * P1b: `cwreap scan --json` as a child (the BPF loader's start included, attribution by
//!   the socket iterator) against `ss -tn`, and the same scan with `--no-bpf` (/proc walk).
//! * Burst: 100k CLOSE_WAIT state changes (50k connections entering and leaving) in 10 s
//!   while the daemon cycles every second; losses must be counted, and after a
//!   reconciliation the tracked set must equal `ss`.
//! * RSS of `cwreap run` in events mode (programs, ring buffer and iterator loaded).
//!
//! Each fails the run (an error) when its fixture is not what it should be.

use std::collections::BTreeSet;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cwreap::daemon::Daemon;
use cwreap::daemon::cycle_report::CycleReport;
use cwreap::daemon::metrics::Health;
use cwreap::shared::attribute::Holder;
use cwreap_linux::kernel::{Discover, Linux};
use cwreap_testkit::Fixture;
use cwreap_testkit::fleet::{BULK_SERVER_COMM, Fleet};

use super::{Row, json_lines, median, ms, stdout_of, time_command, verdict};

/// The targets.
const P2E_MAX_RATIO: f64 = 0.05;
const P7_MAX: Duration = Duration::from_millis(10);
const P1B_MAX_RATIO: f64 = 1.5;
/// Where the trickle's server listens (its own address: the policy finds it by it).
const TRICKLE_LISTEN: &str = "127.89.0.1:0";
/// New CLOSE_WAIT sockets per cycle in the trickle.
const TRICKLE: usize = 10;

/// The fixture's servers and the trickle server as targets.
fn policy(interval: &str, extra: &str) -> String {
    format!(
        "interval: {interval}
dry_run: true
log_format: text
metrics: {{listen: \"off\"}}
{extra}targets:
  - name: bench
    match:
      comm: \"^{}$\"
      cmdline: \"--parent {}( |$)\"
    older_than: 365d
    action: log
  - name: trickle
    match:
      comm: \"^cwreap-fixture$\"
      cmdline: \"server --listen 127\\\\.89\\\\.0\\\\.1:\"
    older_than: 365d
    action: log
",
        BULK_SERVER_COMM.to_string_lossy(),
        std::process::id()
    )
}

/// A daemon in-process, in events mode (no pins: nothing is mounted or pinned) or polling.
fn daemon(events: bool) -> Result<Daemon<Linux>> {
    let cfg = cwreap::shared::config::parse(&policy("1s", ""), "bench").context("bench policy")?;
    let mut k = Linux::default();
    if events {
        k.enable_events(&cwreap_linux::bpf::Options::default())
            .map_err(|e| anyhow!("loading the BPF programs: {e}"))?;
    }
    let d = Daemon::with_kernel(k, cfg, true, Health::default())?;
    let want = if events { "events" } else { "poll" };
    if d.discovery_mode() != want {
        bail!("the daemon runs in {} mode, not {want}", d.discovery_mode());
    }
    Ok(d)
}

fn cycle(d: &mut Daemon<Linux>, candidates: usize) -> Result<CycleReport> {
    let r = d.cycle(&AtomicBool::new(false));
    if !r.errors.is_empty() {
        bail!("daemon cycle reported errors: {:?}", r.errors);
    }
    if r.candidates != candidates {
        bail!(
            "daemon cycle has {} candidates, expected {candidates}",
            r.candidates
        );
    }
    Ok(r)
}

/// CPU time (user + system, every thread) of this process so far.
fn cpu_self() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// CPU time of one `ss ARGS` (user + system), averaged over `reps` runs: bash runs them
/// and `times` prints its children's rusage.
fn ss_cpu(args: &str, reps: usize) -> Result<Duration> {
    let script = format!("for i in $(seq {reps}); do ss {args} >/dev/null || exit 1; done; times");
    let out = stdout_of(Command::new("bash").args(["-c", &script]))?;
    // times: the shell's user/system, then its children's: "0m0.050s 0m0.210s".
    let line = out
        .lines()
        .last()
        .ok_or_else(|| anyhow!("bash times printed nothing"))?;
    let secs = |f: &str| -> Option<f64> {
        let (m, s) = f.strip_suffix('s')?.split_once('m')?;
        Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
    };
    let total: f64 = line
        .split_whitespace()
        .map(|f| secs(f).ok_or_else(|| anyhow!("bash times: {line:?}")))
        .sum::<Result<f64>>()?;
    Ok(Duration::from_secs_f64(total / reps as f64))
}

/// `n` new CLOSE_WAIT sockets held by the trickle server; the clients are kept open (the
/// server never closes, and a client gone would not change that).
fn trickle_more(fx: &mut Fixture, n: usize, clients: &mut Vec<TcpStream>) {
    for _ in 0..n {
        clients.push(fx.close_wait(0).0);
    }
}

fn quantile(v: &[Duration], q: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

/// P2e and the trickle; the polling cycle for comparison.
pub fn p2e(fleet: &Fleet, reps: usize, log: &dyn Fn(&str)) -> Result<Vec<Row>> {
    let n = fleet.n;
    let cycles = reps.max(5);
    let mut fx = Fixture::start(&[TRICKLE_LISTEN], &[]);
    let mut clients = Vec::new();
    let mut rows = Vec::new();
    let ss = ss_cpu("-tn state close-wait", reps.max(3))?;
    let ss_all = ss_cpu("-tn", reps.max(3))?;
    for events in [true, false] {
        let mut d = daemon(events)?;
        let mut have = n + clients.len();
        cycle(&mut d, have)?;
        let mut steady = Vec::new();
        for _ in 0..cycles {
            let t = cpu_self();
            cycle(&mut d, have)?;
            steady.push(cpu_self().saturating_sub(t));
        }
        let c = median(steady);
        let (mode, base, base_name) = if events {
            ("events", ss, "`ss -tn state close-wait`")
        } else {
            ("poll", ss_all, "`ss -tn`")
        };
        let ratio = c.as_secs_f64() / base.as_secs_f64();
        log(&format!(
            "P2e {mode} cycle CPU: {} vs {base_name} {} (ratio {ratio:.3})",
            ms(c),
            ms(base)
        ));
        rows.push(Row {
            figure: format!("P2e daemon cycle CPU, {mode} mode, steady"),
            n,
            m: fleet.m,
            value: format!("{:.2} ms", c.as_secs_f64() * 1e3),
            ss: format!("{} ({base_name}, CPU)", ms(base)),
            ratio: format!("{ratio:.3}"),
            target: if events {
                format!("ratio ≤ {P2E_MAX_RATIO}")
            } else {
                "— (was 1.1 × ss -tn)".into()
            },
            verdict: if events {
                verdict(ratio <= P2E_MAX_RATIO)
            } else {
                "—"
            },
        });
        // The trickle: 10 new CLOSE_WAIT sockets in a target before each cycle.
        let mut busy = Vec::new();
        for _ in 0..cycles {
            trickle_more(&mut fx, TRICKLE, &mut clients);
            have += TRICKLE;
            let t = cpu_self();
            cycle(&mut d, have)?;
            busy.push(cpu_self().saturating_sub(t));
        }
        let b = median(busy);
        let per = b.saturating_sub(c) / TRICKLE as u32;
        log(&format!(
            "P2e {mode} cycle CPU with {TRICKLE} new CLOSE_WAIT sockets: {} ({:.3} ms per new socket)",
            ms(b),
            per.as_secs_f64() * 1e3
        ));
        rows.push(Row {
            figure: format!(
                "P2e {mode} mode, trickle of {TRICKLE} new CLOSE_WAIT/cycle (1 s): CPU per new socket (cycle {})",
                ms(b)
            ),
            n,
            m: fleet.m,
            value: format!("{:.3} ms", per.as_secs_f64() * 1e3),
            ss: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: "—",
        });
    }
    Ok(rows)
}

/// P7: from the peer's close to the daemon knowing the socket and its owner.
pub fn p7(
    fleet: &Fleet,
    samples: usize,
    interval: Duration,
    log: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    let mut fx = Fixture::start(&[TRICKLE_LISTEN], &[]);
    let mut clients = Vec::new();
    let mut rows = Vec::new();
    for events in [true, false] {
        let mut d = daemon(events)?;
        let mut have = fleet.n + clients.len();
        cycle(&mut d, have)?;
        let mut lat = Vec::new();
        for i in 0..samples {
            let (client, fd) = fx.connect(0);
            let owner = Holder { pid: fx.pid(), fd };
            let mut tick = Instant::now();
            if !events {
                // The close lands at an even spread of moments within the interval.
                let offset = interval.mul_f64((i as f64 + 0.5) / samples as f64);
                std::thread::sleep(offset);
            }
            let t0 = Instant::now();
            client.shutdown(Shutdown::Write).context("half-close")?;
            have += 1;
            loop {
                if events {
                    // As `cwreap run` does between cycles: read the events once the ring
                    // buffer is readable.
                    let feed = d
                        .kernel()
                        .events()
                        .ok_or_else(|| anyhow!("events mode without its feed"))?;
                    if !feed.wait(Some(Duration::from_secs(10)))? {
                        bail!("no event within 10 s of a peer's close");
                    }
                    let seen = d.detect();
                    if seen.entered.iter().any(|(_, h)| h.contains(&owner)) {
                        break;
                    }
                } else {
                    std::thread::sleep((tick + interval).saturating_duration_since(Instant::now()));
                    tick = Instant::now();
                    let r = d.cycle(&AtomicBool::new(false));
                    if r.candidates == have {
                        break;
                    }
                }
                if t0.elapsed() > Duration::from_secs(30) {
                    bail!("the daemon never knew the new socket held by {owner:?}");
                }
            }
            lat.push(t0.elapsed());
            fx.expect_line("eof ");
            clients.push(client);
        }
        let mode = if events { "events" } else { "poll" };
        let (med, p99) = (quantile(&lat, 0.5), quantile(&lat, 0.99));
        log(&format!(
            "P7 {mode}: detection latency median {}, p99 {} over {samples}",
            ms(med),
            ms(p99)
        ));
        rows.push(Row {
            figure: format!(
                "P7 detection latency, {mode} mode (close → cookie + pid/fd), median (p99 {}, {samples} samples{})",
                ms(p99),
                if events { String::new() } else { format!(", interval {}", ms(interval)) }
            ),
            n: fleet.n,
            m: fleet.m,
            value: ms(med),
            ss: "—".into(),
            ratio: "—".into(),
            target: if events {
                format!("≤ {}", ms(P7_MAX))
            } else {
                "—".into()
            },
            verdict: if events { verdict(p99 <= P7_MAX) } else { "—" },
        });
    }
    Ok(rows)
}

/// P1b: the scan with iterator attribution, as a child, against `ss -tn`; and with
/// `--no-bpf`.
pub fn p1b(
    fleet: &Fleet,
    cwreap: &std::path::Path,
    reps: usize,
    log: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    let ours: BTreeSet<SocketAddr> = fleet.listen.iter().copied().collect();
    for args in [&["scan", "--json"][..], &["scan", "--json", "--no-bpf"][..]] {
        let out = Command::new(cwreap)
            .args(args)
            .output()
            .with_context(|| format!("cwreap {args:?}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() || err.contains("iterator is not used") {
            bail!("cwreap {args:?}: {} {err}", out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let found = json_lines(&text, "cwreap scan --json")?
            .iter()
            .filter(|v| {
                v["local"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .is_some_and(|a| ours.contains(&a))
                    && v["pid"].as_i64().is_some()
            })
            .count();
        if found != fleet.n {
            bail!(
                "cwreap {args:?} found {found} owned fixture sockets, expected {}",
                fleet.n
            );
        }
    }
    let (mut it, mut proc_, mut ss) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..reps {
        it.push(time_command(Command::new(cwreap).args(["scan", "--json"]))?);
        proc_.push(time_command(
            Command::new(cwreap).args(["scan", "--json", "--no-bpf"]),
        )?);
        ss.push(time_command(Command::new("ss").args(["-tn"]))?);
    }
    let (i, p, s) = (median(it), median(proc_), median(ss));
    let (ri, rp) = (
        i.as_secs_f64() / s.as_secs_f64(),
        p.as_secs_f64() / s.as_secs_f64(),
    );
    log(&format!(
        "P1b scan: iterator {} ({ri:.2}), /proc walk {} ({rp:.2}) vs ss -tn {}",
        ms(i),
        ms(p),
        ms(s)
    ));
    let row = |figure: &str, v: Duration, r: f64, target: String, verdict: &'static str| Row {
        figure: figure.into(),
        n: fleet.n,
        m: fleet.m,
        value: ms(v),
        ss: format!("{} (`ss -tn`)", ms(s)),
        ratio: format!("{r:.2}"),
        target,
        verdict,
    };
    Ok(vec![
        row(
            "P1b `scan --json`, iterator attribution, BPF load included, wall",
            i,
            ri,
            format!("ratio ≤ {P1B_MAX_RATIO}"),
            verdict(ri <= P1B_MAX_RATIO),
        ),
        row(
            "P1b `scan --json --no-bpf` (/proc walk), wall",
            p,
            rp,
            "— (was 4.2×)".into(),
            "—",
        ),
    ])
}

/// The burst: `changes` CLOSE_WAIT state changes (half entries, half exits) spread over
/// `over`, the daemon cycling every second meanwhile; then a cycle, and the tracked set
/// against `ss`.
pub fn burst(fleet: &Fleet, changes: usize, over: Duration, log: &dyn Fn(&str)) -> Result<Row> {
    let mut d = daemon(true)?;
    cycle(&mut d, fleet.n)?;
    let listener = TcpListener::bind("127.90.0.1:0").context("burst listener")?;
    let addr = listener.local_addr()?;
    let conns = changes / 2;
    // The last ones stay in CLOSE_WAIT: the set compared afterwards is not empty.
    let keep = (conns / 100).max(10);
    let steps = (over.as_millis() / 100).max(1) as usize;
    let per_step = conns.div_ceil(steps);
    // The daemon on a thread of its own, as `cwreap run` runs it: a cycle every second,
    // and between cycles a look at the events each time the ring buffer is readable,
    // spaced as `cwreap run` spaces them (at least 5 ms, and twice the last look's time).
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let runner = {
        let done = done.clone();
        std::thread::spawn(move || -> Result<(Daemon<Linux>, usize)> {
            let mut looks = 0;
            let mut next_cycle = Instant::now() + Duration::from_secs(1);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let now = Instant::now();
                if now >= next_cycle {
                    d.cycle(&AtomicBool::new(false));
                    next_cycle = Instant::now() + Duration::from_secs(1);
                    continue;
                }
                let wait = (next_cycle - now).min(Duration::from_millis(50));
                let feed = d.kernel().events().ok_or_else(|| anyhow!("no feed"))?;
                if feed.wait(Some(wait))? {
                    let t = Instant::now();
                    d.detect();
                    looks += 1;
                    let next = cwreap::daemon::wake::next_look(t, t.elapsed());
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            }
            Ok((d, looks))
        })
    };
    let started = Instant::now();
    let mut kept = Vec::new();
    let mut made = 0;
    for step in 0..steps {
        let until = started + over.mul_f64((step + 1) as f64 / steps as f64);
        for _ in 0..per_step.min(conns - made) {
            let client = TcpStream::connect(addr).context("burst connect")?;
            let (server, _) = listener.accept().context("burst accept")?;
            rustix::net::sockopt::set_socket_linger(&client, Some(Duration::ZERO))?;
            client.shutdown(Shutdown::Write)?;
            // Closed only once in CLOSE_WAIT, so that it enters and leaves it.
            while cwreap_linux::sys::tcp_state(std::os::fd::AsFd::as_fd(&server))?
                != cwreap_linux::tcp::CLOSE_WAIT
            {
                std::hint::spin_loop();
            }
            made += 1;
            if conns - made < keep {
                kept.push((client, server));
            } else {
                drop(server); // LAST_ACK: out of CLOSE_WAIT
                drop(client);
            }
        }
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut d, looks) = runner
        .join()
        .map_err(|_| anyhow!("the daemon's thread panicked"))??;
    let took = started.elapsed();
    // Wait for the kept ones to be in CLOSE_WAIT, then catch up.
    let port = addr.port();
    let ss_set = || -> Result<BTreeSet<(SocketAddr, SocketAddr)>> {
        let text = stdout_of(Command::new("ss").args([
            "-tnH",
            "state",
            "close-wait",
            "src",
            "127.90.0.1",
        ]))?;
        Ok(text
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
            })
            .filter(|(l, _): &(SocketAddr, SocketAddr)| l.port() == port)
            .collect())
    };
    let mut tries = 0;
    let (ss_now, tracked, counts) = loop {
        d.cycle(&AtomicBool::new(false));
        let feed = d.kernel().events().ok_or_else(|| anyhow!("no feed"))?;
        let tracked: BTreeSet<(SocketAddr, SocketAddr)> = feed
            .tracked()
            .filter(|s| s.local.port() == port)
            .map(|s| (s.local, s.remote))
            .collect();
        let now = ss_set()?;
        let counts = d.kernel().event_counts().unwrap_or_default();
        if now == tracked && now.len() == keep {
            break (now, tracked, counts);
        }
        tries += 1;
        if tries > 50 {
            bail!(
                "after the burst the daemon tracks {} of the burst's sockets, ss shows {} ({keep} kept; lost {}, reconciles {})",
                tracked.len(),
                now.len(),
                counts.lost,
                counts.reconciles
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let rate = changes as f64 / took.as_secs_f64();
    log(&format!(
        "burst: {changes} CLOSE_WAIT changes in {:.1} s ({rate:.0}/s): {} events lost and counted, {} reconciliations, {looks} looks between cycles; tracked set = ss ({} sockets) after {} extra cycles",
        took.as_secs_f64(),
        counts.lost,
        counts.reconciles,
        ss_now.len(),
        tries + 1
    ));
    drop(tracked);
    Ok(Row {
        figure: format!(
            "Burst: {changes} CLOSE_WAIT changes in {:.1} s, ring 1 MiB, cycles every 1 s and the events read between them as `cwreap run` does: events lost (counted) / reconciliations",
            took.as_secs_f64()
        ),
        n: fleet.n,
        m: fleet.m,
        value: format!("{} lost / {} reconciles", counts.lost, counts.reconciles),
        ss: format!("tracked = ss: {} sockets", ss_now.len()),
        ratio: "—".into(),
        target: "every loss counted, tracked = ss".into(),
        verdict: "PASS",
    })
}

/// `cwreap run` in events mode as a child: VmRSS after a few cycles. Its BPF directory is
/// private and no BPF filesystem, so it pins nothing (and mounts nothing).
pub fn rss(fleet: &Fleet, log: &dyn Fn(&str)) -> Result<Row> {
    let mut dir_of = None;
    let mut notify = None;
    let mut daemon = cwreap_testkit::LoggedDaemon::start_with(
        "cwbench-events",
        &policy("200ms", "discovery: events\n"),
        |dir, cmd| {
            let n = cwreap_testkit::Notify::bind(dir.join("notify.sock"));
            cmd.env("NOTIFY_SOCKET", n.path());
            cmd.env("CWREAP_BPF_DIR", dir.join("bpf"));
            cwreap_linux::testing::die_with_parent(cmd);
            notify = Some(n);
            dir_of = Some(dir.to_path_buf());
        },
    );
    let mut notify = notify.ok_or_else(|| anyhow!("no notify socket"))?;
    let pid = daemon.pid();
    let mut statuses = 0;
    while statuses < 5 {
        let msg = super::next_message(&mut daemon, &mut notify, Duration::from_secs(60))?;
        if msg.contains("STATUS=") {
            statuses += 1;
        }
    }
    let log_text = daemon.log();
    if !log_text.contains("discovery: the kernel's events") {
        bail!("cwreap run did not start in events mode:{log_text}");
    }
    let rss = super::status_mib(pid, "VmRSS:")?;
    let hwm = super::status_mib(pid, "VmHWM:")?;
    log(&format!(
        "events-mode daemon: VmRSS {rss:.1} MiB (peak {hwm:.1})"
    ));
    drop(daemon);
    Ok(Row {
        figure: format!("`cwreap run`, events mode, VmRSS after 5 cycles (VmHWM {hwm:.1} MiB)"),
        n: fleet.n,
        m: fleet.m,
        value: format!("{rss:.1} MiB"),
        ss: "—".into(),
        ratio: "—".into(),
        target: "— (aya load ~21 MB)".into(),
        verdict: "—",
    })
}
