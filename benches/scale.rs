//! `cargo bench --bench scale`: cwreap against `ss` on a fixture of N CLOSE_WAIT and M
//! ESTABLISHED loopback connections held by several real server processes.
//!
//! * P1 `cwreap scan --json` over all processes vs `ss -tanpi state close-wait`.
//! * P1d what looking for dead held sockets adds to P1's scan, with U unix sockets and a few
//!   dead TCP sockets held by the servers besides: the scan in-process with probing on and
//!   off, and `ss` in the same repetitions (see `scale/dead.rs`).
//! * P2 one steady-state daemon cycle (nothing changed, attribution cached), in-process, vs
//!   `ss -tn state close-wait`.
//! * P3 `cwreap reap` of all N with verification and shutdown: wall time, and `ss` counts of
//!   LISTEN/ESTABLISHED before and after (nothing else may be touched).
//! * P4 `cwreap run` as a child: RSS and CPU per cycle while tracking N sockets.
//! * P5 a policy of 1000 targets with nothing to do: `cwreap run` start-up time (to READY)
//!   and VmRSS as a child, and the idle cycle, in-process; run before the fixture starts.
//! * P6 `cwreap explain --json` over all processes vs `cwreap scan --json`: the epoll sets
//!   of the servers (every connection registered) read on top of a scan.
//! * P2e, P7, P1b, the burst and the events-mode daemon's RSS: discovery from the kernel's
//!   events (BPF) against polling and `ss` (see `scale/events.rs`).
//! * `--scaling`: P1 and P2 at N = M = 1k, 10k, 50k.
//! * `--targets T`: only P5, with T targets (no fixture).
//! * `--dead-probe`: only P1d.
//! * `--hold`: only start the fixture and keep it, to profile cwreap by hand.
//!
//! Every run checks the fixture with `ss` first and fails (exit 1) when the fixture or a
//! cwreap command does not do what it should; missed timing targets only print MISS.
//! Needs root (pidfd_getfd on other processes). The cwreap binary is the one cargo builds
//! for this bench (`target/release/cwreap`).

use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cwreap_testkit::fleet::{BULK_SERVER_COMM, Counts, Fleet};
use cwreap_testkit::{Killed, LoggedDaemon, Notify, cwreap_bin, status_kib};

// Not benches/dead.rs: cargo would take that for a benchmark of its own.
#[path = "scale/dead.rs"]
mod dead;
#[path = "scale/events.rs"]
mod events;

const USAGE: &str = "usage: cargo bench --bench scale -- [--n N] [--m M] [--unix U] [--reps R] [--scaling] [--smoke] [--targets T] [--dead-probe] [--events] [--hold]
  --n N        CLOSE_WAIT connections (default 20000)
  --m M        ESTABLISHED connections (default 20000)
  --unix U     unix sockets the servers hold for P1d (default 20000)
  --reps R     repetitions of each measurement; medians are reported (default 5)
  --scaling    only P1 and P2, at N = M = 1000, 10000, 50000
  --smoke      N = M = U = 200, one repetition: a functional check that finishes in seconds
  --dead-probe only P1d, the cost of looking for dead held sockets
  --events     only the events figures: P2e, P7, P1b, the burst and RSS
  --targets T  only P5, the policy scale, with T targets (default run: 1000, with the fixture)
  --hold       start the fixture (N, M), print its servers, keep it until Enter (for profiling)";

/// Targets, from the design brief.
const P1_MAX_RATIO: f64 = 0.25;
const P2_MAX_RATIO: f64 = 1.5;
/// explain against scan, same fixture, same run.
const P6_MAX_RATIO: f64 = 1.5;
/// One second per 20k sockets reaped.
const P3_SECONDS_PER_20K: f64 = 1.0;
const P4_MAX_RSS_MIB: f64 = 20.0;
/// The policy scale: this many targets start in under a second, keep VmRSS within 64 MiB
/// and cycle in 100 ms with nothing to do.
const P5_TARGETS: usize = 1000;
const P5_MAX_START: Duration = Duration::from_secs(1);
const P5_MAX_RSS_MIB: f64 = 64.0;
const P5_MAX_CYCLE: Duration = Duration::from_millis(100);
const SCALING_SIZES: [usize; 3] = [1_000, 10_000, 50_000];
/// Dead TCP sockets the servers hold for P1d: enough that probing duplicates for real.
const P1D_DEAD: usize = 10;

#[derive(Debug, Clone)]
struct Args {
    n: usize,
    m: usize,
    /// Unix sockets for P1d.
    unix: usize,
    reps: usize,
    scaling: bool,
    smoke: bool,
    hold: bool,
    /// `--dead-probe`: only P1d.
    dead_probe: bool,
    /// `--events`: only the events figures (P2e, P7, P1b, the burst, RSS).
    events: bool,
    /// `--targets T`: only P5.
    targets: Option<usize>,
}

fn parse_args(argv: &[String]) -> Result<Args, String> {
    let mut a = Args {
        n: 20_000,
        m: 20_000,
        unix: 20_000,
        reps: 5,
        scaling: false,
        smoke: false,
        hold: false,
        dead_probe: false,
        events: false,
        targets: None,
    };
    let mut it = argv.iter();
    let number = |flag: &str, v: Option<&String>| -> Result<usize, String> {
        v.and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--n" => a.n = number("--n", it.next())?,
            "--m" => a.m = number("--m", it.next())?,
            "--unix" => a.unix = number("--unix", it.next())?,
            "--dead-probe" => a.dead_probe = true,
            "--events" => a.events = true,
            "--reps" => a.reps = number("--reps", it.next())?,
            "--scaling" => a.scaling = true,
            "--smoke" => a.smoke = true,
            "--hold" => a.hold = true,
            "--targets" => a.targets = Some(number("--targets", it.next())?),
            // cargo bench passes --bench to every bench target.
            "--bench" => {}
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.smoke {
        if a.scaling {
            return Err("--smoke and --scaling exclude each other".into());
        }
        a.n = 200;
        a.m = 200;
        a.unix = 200;
        a.reps = 1;
    }
    if a.n == 0 || a.reps == 0 || a.targets == Some(0) {
        return Err("--n, --reps and --targets must be at least 1".into());
    }
    if a.targets.is_some() && (a.scaling || a.hold) {
        return Err("--targets excludes --scaling and --hold".into());
    }
    if a.dead_probe && (a.scaling || a.hold || a.targets.is_some()) {
        return Err("--dead-probe excludes --scaling, --hold and --targets".into());
    }
    if a.events && (a.dead_probe || a.scaling || a.hold || a.targets.is_some()) {
        return Err("--events excludes --dead-probe, --scaling, --hold and --targets".into());
    }
    Ok(a)
}

fn main() {
    let argv: Vec<String> = std::env::args().collect();
    let args = match parse_args(argv.get(1..).unwrap_or(&[])) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("scale: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if !rustix::process::geteuid().is_root() {
        let why = "the benchmark needs root: cwreap reads other processes' /proc/PID/fd and \
duplicates their sockets with pidfd_getfd (CAP_SYS_PTRACE)";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            eprintln!("scale: FAILED: {why}, and CI=true forbids skipping");
            std::process::exit(1);
        }
        eprintln!("SKIP scale: {why}");
        return;
    }
    if let Err(e) = run(&args) {
        eprintln!("scale: FAILED: {e:#}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<()> {
    let cwreap = cwreap_bin();
    let started = Instant::now();
    let log = |msg: &str| eprintln!("[{:7.1}s] {msg}", started.elapsed().as_secs_f64());
    let mut rows = Vec::new();
    if args.hold {
        return hold(args, &log);
    }
    if let Some(targets) = args.targets {
        rows.extend(p5_policy_scale(targets, args.reps, (0, 0), &log)?);
    } else if args.dead_probe {
        let mut fleet = start_fleet(args.n, args.m, &log)?;
        rows.extend(dead::p1d(&mut fleet, args.unix, P1D_DEAD, args.reps, &log)?);
        drop(fleet);
    } else if args.events {
        let fleet = start_fleet(args.n, args.m, &log)?;
        rows.extend(events_figures(&fleet, cwreap, args, &log)?);
        drop(fleet);
    } else if args.scaling {
        for &n in &SCALING_SIZES {
            let fleet = start_fleet(n, n, &log)?;
            rows.push(p1_scan(&fleet, cwreap, args.reps, &log)?);
            rows.push(p2_cycle(&fleet, args.reps, &log)?);
            drop(fleet);
        }
    } else {
        // Before the fixture: its N CLOSE_WAIT sockets would be dumped by every cycle, and
        // P5 is about the policy's cost.
        rows.extend(p5_policy_scale(P5_TARGETS, args.reps, (0, 0), &log)?);
        let mut fleet = start_fleet(args.n, args.m, &log)?;
        rows.push(p1_scan(&fleet, cwreap, args.reps, &log)?);
        rows.extend(dead::p1d(&mut fleet, args.unix, P1D_DEAD, args.reps, &log)?);
        rows.push(p5_explain(&fleet, cwreap, args.reps, &log)?);
        rows.push(p2_cycle(&fleet, args.reps, &log)?);
        rows.extend(events_figures(&fleet, cwreap, args, &log)?);
        let cycles = if args.smoke { 3 } else { 20 };
        rows.extend(p4_daemon(&fleet, cycles, &log)?);
        rows.extend(p3_reap(&mut fleet, cwreap, args.reps, &log)?);
        drop(fleet);
    }
    log("done; fixture torn down");
    print_report(args, &rows);
    Ok(())
}

/// P2e, P7, P1b, the burst and the RSS in events mode, on `fleet`.
fn events_figures(
    fleet: &Fleet,
    cwreap: &std::path::Path,
    args: &Args,
    log: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    let mut rows = events::p2e(fleet, args.reps, log)?;
    let (samples, interval) = if args.smoke {
        (3, Duration::from_millis(200))
    } else {
        (20, Duration::from_secs(1))
    };
    rows.extend(events::p7(fleet, samples, interval, log)?);
    rows.extend(events::p1b(fleet, cwreap, args.reps, log)?);
    let (changes, over) = if args.smoke {
        (2_000, Duration::from_secs(1))
    } else {
        (100_000, Duration::from_secs(10))
    };
    rows.push(events::burst(fleet, changes, over, log)?);
    rows.push(events::rss(fleet, log)?);
    Ok(rows)
}

/// Keep a fixture up for profiling cwreap by hand.
fn hold(args: &Args, log: &dyn Fn(&str)) -> Result<()> {
    let fleet = start_fleet(args.n, args.m, log)?;
    let pids: Vec<String> = fleet.server_pids().iter().map(i32::to_string).collect();
    let listen: Vec<String> = fleet.listen.iter().map(SocketAddr::to_string).collect();
    println!("server pids: {}", pids.join(" "));
    println!("reap selector: --pid {}", pids.join(" --pid "));
    println!("listening on: {}", listen.join(" "));
    println!("daemon policy:\n{}", bench_policy("1s"));
    println!("press Enter to tear the fixture down");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop(fleet);
    log("fixture torn down");
    Ok(())
}

fn start_fleet(n: usize, m: usize, log: &dyn Fn(&str)) -> Result<Fleet> {
    log(&format!(
        "fixture: starting {n} CLOSE_WAIT + {m} ESTABLISHED connections"
    ));
    let t = Instant::now();
    let fleet =
        Fleet::start(n, m).with_context(|| format!("starting the fixture (N={n}, M={m})"))?;
    let c = fleet.counts()?;
    log(&format!(
        "fixture: ready in {:.1} s over {} processes; ss: {} LISTEN, {} CLOSE-WAIT, {}+{} ESTAB",
        t.elapsed().as_secs_f64(),
        fleet.processes(),
        c.listen,
        c.close_wait,
        c.est_server,
        c.est_client
    ));
    Ok(fleet)
}

// ---------------------------------------------------------------------------------------
// Measurements.

/// One line of the final table.
struct Row {
    figure: String,
    n: usize,
    m: usize,
    value: String,
    ss: String,
    ratio: String,
    target: String,
    verdict: &'static str,
}

fn verdict(ok: bool) -> &'static str {
    if ok { "PASS" } else { "MISS" }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    match v.len() {
        0 => Duration::ZERO,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2,
    }
}

/// Run a command with output discarded; its wall time, or an error with its stderr.
fn time_command(cmd: &mut Command) -> Result<Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let elapsed = t.elapsed();
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(elapsed)
}

/// Run a command and return its stdout; fails on a non-zero exit.
fn stdout_of(cmd: &mut Command) -> Result<String> {
    cmd.stdin(Stdio::null());
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?}: output is not UTF-8"))
}

fn json_lines(text: &str, what: &str) -> Result<Vec<serde_json::Value>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("{what}: not a JSON line: {l}")))
        .collect()
}

fn field_addr(v: &serde_json::Value, key: &str) -> Option<SocketAddr> {
    v.get(key)?.as_str()?.parse().ok()
}

fn p1_scan(fleet: &Fleet, cwreap: &Path, reps: usize, log: &dyn Fn(&str)) -> Result<Row> {
    let ours: HashSet<SocketAddr> = fleet.listen.iter().copied().collect();
    let servers: HashSet<i64> = fleet.server_pids().iter().map(|&p| i64::from(p)).collect();
    // Correctness first: exactly the fixture's N sockets, each under a fixture server.
    let text = stdout_of(Command::new(cwreap).args(["scan", "--json"]))?;
    let mut found = 0usize;
    for v in json_lines(&text, "cwreap scan --json")? {
        if !field_addr(&v, "local").is_some_and(|a| ours.contains(&a)) {
            continue;
        }
        found += 1;
        let pid = v.get("pid").and_then(serde_json::Value::as_i64);
        if !pid.is_some_and(|p| servers.contains(&p)) {
            bail!("cwreap scan attributed a fixture socket to pid {pid:?}, not a server: {v}");
        }
    }
    if found != fleet.n {
        bail!(
            "cwreap scan found {found} CLOSE_WAIT sockets of the fixture, expected {}",
            fleet.n
        );
    }
    let (mut ours_t, mut ss_t) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        ours_t.push(time_command(Command::new(cwreap).args(["scan", "--json"]))?);
        ss_t.push(time_command(Command::new("ss").args([
            "-tanpi",
            "state",
            "close-wait",
        ]))?);
    }
    let (c, s) = (median(ours_t), median(ss_t));
    let ratio = c.as_secs_f64() / s.as_secs_f64();
    log(&format!(
        "P1 scan: cwreap {} vs ss -tanpi {} (ratio {ratio:.2})",
        ms(c),
        ms(s)
    ));
    Ok(Row {
        figure: "P1 `scan --json`, all processes".into(),
        n: fleet.n,
        m: fleet.m,
        value: ms(c),
        ss: format!("{} (`ss -tanpi state close-wait`)", ms(s)),
        ratio: format!("{ratio:.2}"),
        target: format!("ratio ≤ {P1_MAX_RATIO}"),
        verdict: verdict(ratio <= P1_MAX_RATIO),
    })
}

fn p5_explain(fleet: &Fleet, cwreap: &Path, reps: usize, log: &dyn Fn(&str)) -> Result<Row> {
    let servers: HashSet<i64> = fleet.server_pids().iter().map(|&p| i64::from(p)).collect();
    // Correctness first: one line per server, every one of the N sockets `not_read` (each
    // server registers its connections in an epoll set and never reads them).
    let text = stdout_of(Command::new(cwreap).args(["explain", "--json"]))?;
    let (mut lines, mut not_read, mut total) = (0usize, 0u64, 0u64);
    for v in json_lines(&text, "cwreap explain --json")? {
        let pid = v.get("pid").and_then(serde_json::Value::as_i64);
        if !pid.is_some_and(|p| servers.contains(&p)) {
            continue;
        }
        lines += 1;
        let count = |p: &str| v["patterns"][p].as_u64().unwrap_or(0);
        not_read += count("not_read");
        total += [
            "eof_ignored",
            "not_read",
            "eof_unwatched",
            "abandoned",
            "pool_idle",
            "unaccepted",
        ]
        .iter()
        .map(|p| count(p))
        .sum::<u64>();
    }
    if lines != servers.len() || not_read != fleet.n as u64 || total != fleet.n as u64 {
        bail!(
            "cwreap explain: {lines} lines for {} servers, {not_read} not_read sockets of \
{total}, expected {} all not_read",
            servers.len(),
            fleet.n
        );
    }
    let (mut explain_t, mut scan_t) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        explain_t.push(time_command(
            Command::new(cwreap).args(["explain", "--json"]),
        )?);
        scan_t.push(time_command(Command::new(cwreap).args(["scan", "--json"]))?);
    }
    let (e, s) = (median(explain_t), median(scan_t));
    let ratio = e.as_secs_f64() / s.as_secs_f64();
    log(&format!(
        "P6 explain: {} vs scan {} (ratio {ratio:.2})",
        ms(e),
        ms(s)
    ));
    Ok(Row {
        figure: "P6 `explain --json`, all processes, vs `scan --json`".into(),
        n: fleet.n,
        m: fleet.m,
        value: ms(e),
        ss: format!("{} (`cwreap scan --json`)", ms(s)),
        ratio: format!("{ratio:.2}"),
        target: format!("ratio ≤ {P6_MAX_RATIO}"),
        verdict: verdict(ratio <= P6_MAX_RATIO),
    })
}

/// A policy tracking the fixture's servers (and nothing else), acting on nothing, polling
/// (events mode is measured apart, in `scale/events.rs`).
fn bench_policy(interval: &str) -> String {
    format!(
        "interval: {interval}
discovery: poll
dry_run: true
log_format: text
metrics: {{listen: \"off\"}}
targets:
  - name: bench
    match:
      comm: \"^{}$\"
      cmdline: \"--parent {}( |$)\"
    older_than: 365d
    action: log
",
        BULK_SERVER_COMM.to_string_lossy(),
        std::process::id()
    )
}

fn p2_cycle(fleet: &Fleet, reps: usize, log: &dyn Fn(&str)) -> Result<Row> {
    let cfg =
        cwreap::shared::config::parse(&bench_policy("30s"), "bench").context("the bench policy")?;
    let mut daemon = cwreap::daemon::Daemon::new(cfg, true).context("creating the daemon")?;
    let stop = AtomicBool::new(false);
    let check = |r: &cwreap::daemon::cycle_report::CycleReport| -> Result<()> {
        if !r.errors.is_empty() {
            bail!("daemon cycle reported errors: {:?}", r.errors);
        }
        if r.candidates != fleet.n {
            bail!(
                "daemon cycle tracked {} CLOSE_WAIT sockets in the target, expected {}",
                r.candidates,
                fleet.n
            );
        }
        Ok(())
    };
    // The daemon re-reads its targets' fd tables when a new, unattributed CLOSE_WAIT socket
    // with a target's uid appears, and other processes on a shared host open and close
    // sockets all the time: a cycle during
    // which the set changed measures attribution, not the cached path. Tell them apart.
    let mut diag = cwreap_linux::netlink::Diag::new().context("opening a sock_diag socket")?;
    let mut host_set = || -> Result<Vec<u64>> {
        let mut v: Vec<u64> = diag
            .close_wait()
            .context("sock_diag dump")?
            .iter()
            .map(|d| d.inode)
            .collect();
        v.sort_unstable();
        Ok(v)
    };
    let t = Instant::now();
    let warm = daemon.cycle(&stop);
    let first = t.elapsed();
    check(&warm)?;
    let (mut steady, mut all, mut ss_t) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = host_set()?;
    for _ in 0..reps.max(3) {
        let t = Instant::now();
        let r = daemon.cycle(&stop);
        let took = t.elapsed();
        check(&r)?;
        let now = host_set()?;
        all.push(took);
        if now == last {
            steady.push(took);
        }
        ss_t.push(time_command(Command::new("ss").args([
            "-tn",
            "state",
            "close-wait",
        ]))?);
        // The set the next cycle starts from.
        last = host_set()?;
    }
    let churned = all.len() - steady.len();
    let s = median(ss_t);
    let c = if steady.is_empty() {
        median(all.clone())
    } else {
        median(steady.clone())
    };
    let all_median = median(all.clone());
    let ratio = c.as_secs_f64() / s.as_secs_f64();
    log(&format!(
        "P2 daemon cycle: first (attribution) {}, steady {} vs ss -tn {} (ratio {ratio:.2}); \
         {churned} of {} cycles saw the host-wide CLOSE_WAIT set change (median of all {})",
        ms(first),
        ms(c),
        ms(s),
        all.len(),
        ms(all_median)
    ));
    Ok(Row {
        figure: format!(
            "P2 daemon cycle, cached (first cycle {}; {churned}/{} cycles saw host CLOSE_WAIT churn, median of all {})",
            ms(first),
            all.len(),
            ms(all_median)
        ),
        n: fleet.n,
        m: fleet.m,
        value: ms(c),
        ss: format!("{} (`ss -tn state close-wait`)", ms(s)),
        ratio: format!("{ratio:.2}"),
        target: format!("ratio ≤ {P2_MAX_RATIO}"),
        verdict: verdict(ratio <= P2_MAX_RATIO),
    })
}

fn p3_reap(fleet: &mut Fleet, cwreap: &Path, reps: usize, log: &dyn Fn(&str)) -> Result<Vec<Row>> {
    let ours: HashSet<SocketAddr> = fleet.listen.iter().copied().collect();
    let mut times = Vec::new();
    let mut before = Counts::default();
    let mut after = Counts::default();
    for rep in 0..reps {
        if rep > 0 {
            fleet
                .renew_close_wait()
                .context("making a fresh CLOSE_WAIT batch")?;
        }
        before = fleet.counts()?;
        if before != fleet.expected() {
            bail!(
                "fixture before reap: {before:?}, expected {:?}",
                fleet.expected()
            );
        }
        let mut cmd = Command::new(cwreap);
        cmd.args(["reap", "--older-than", "0s", "--json"]);
        for pid in fleet.server_pids() {
            cmd.args(["--pid", &pid.to_string()]);
        }
        let t = Instant::now();
        let text = stdout_of(&mut cmd)?;
        times.push(t.elapsed());
        after = fleet.counts()?;

        let mut reaped = 0usize;
        for v in json_lines(&text, "cwreap reap --json")? {
            if !field_addr(&v, "local").is_some_and(|a| ours.contains(&a)) {
                bail!("cwreap reap acted on a socket outside the fixture: {v}");
            }
            match v.get("outcome").and_then(serde_json::Value::as_str) {
                Some("reaped") => reaped += 1,
                _ => bail!("cwreap reap: a socket was not reaped: {v}"),
            }
        }
        if reaped != fleet.n {
            bail!("cwreap reap reaped {reaped} sockets, expected {}", fleet.n);
        }
        if after.close_wait != 0 {
            bail!(
                "after reap ss still sees {} CLOSE-WAIT sockets of the fixture",
                after.close_wait
            );
        }
        let untouched = (before.listen, before.est_server, before.est_client)
            == (after.listen, after.est_server, after.est_client);
        if !untouched {
            bail!(
                "reap touched sockets that were not CLOSE_WAIT: before {before:?}, after {after:?}"
            );
        }
    }
    let wall = median(times);
    let target = P3_SECONDS_PER_20K * fleet.n as f64 / 20_000.0;
    log(&format!(
        "P3 reap: {} sockets in {}; ss before {before:?}, after {after:?}",
        fleet.n,
        ms(wall)
    ));
    Ok(vec![
        Row {
            figure: "P3 `reap` all N (verify + shutdown), wall".into(),
            n: fleet.n,
            m: fleet.m,
            value: ms(wall),
            ss: "—".into(),
            ratio: "—".into(),
            target: format!("≤ {:.0} ms (1 s per 20k)", target * 1e3),
            verdict: verdict(wall.as_secs_f64() <= target),
        },
        Row {
            figure: "P3 ss before → after: LISTEN, ESTAB (server/client ends), CLOSE-WAIT".into(),
            n: fleet.n,
            m: fleet.m,
            value: format!(
                "{}/{}/{}/{} → {}/{}/{}/{}",
                before.listen,
                before.est_server,
                before.est_client,
                before.close_wait,
                after.listen,
                after.est_server,
                after.est_client,
                after.close_wait
            ),
            ss: "—".into(),
            ratio: "—".into(),
            target: "0 non-CLOSE_WAIT touched, 0 CLOSE_WAIT left".into(),
            verdict: "PASS",
        },
    ])
}

/// `cwreap run` on `policy` in a private directory named after `tag`, its sd_notify
/// messages on the returned socket; killed if the benchmark dies. Also when it was spawned.
fn start_daemon(tag: &str, policy: &str) -> (LoggedDaemon, Notify, Instant) {
    let mut notify = None;
    let spawned = Instant::now();
    let daemon = LoggedDaemon::start_with(tag, policy, |dir, cmd| {
        let n = Notify::bind(dir.join("notify.sock"));
        cmd.env("NOTIFY_SOCKET", n.path());
        // Pins in a private directory, which is no BPF filesystem: with `discovery: auto`
        // the daemon pins nothing and mounts nothing on the host.
        cmd.env("CWREAP_BPF_DIR", dir.join("bpf"));
        // If the benchmark dies, the daemon must not outlive it.
        cwreap_linux::testing::die_with_parent(cmd);
        notify = Some(n);
    });
    let notify = notify.expect("the notify socket was bound");
    (daemon, notify, spawned)
}

/// The next sd_notify message within `timeout`; fails at once if the daemon exits.
fn next_message(d: &mut LoggedDaemon, notify: &mut Notify, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(msg) = notify.next(Instant::now() + Duration::from_millis(50)) {
            return Ok(msg);
        }
        if let Ok(Some(status)) = d.daemon.child.try_wait() {
            d.daemon.join_reader();
            bail!("cwreap run exited ({status}){}", d.log());
        }
        if Instant::now() > deadline {
            bail!(
                "cwreap run: no sd_notify message within {timeout:?}{}",
                d.log()
            );
        }
    }
}

/// A `VmRSS:`/`VmHWM:` line of /proc/PID/status, in MiB.
fn status_mib(pid: i32, key: &str) -> Result<f64> {
    let kib =
        status_kib(pid, key).ok_or_else(|| anyhow!("/proc/{pid}/status has no {key} line"))?;
    Ok(kib as f64 / 1024.0)
}

/// CPU time (user + system) of a whole process so far.
fn cpu_time(pid: i32) -> Result<Duration> {
    cwreap_testkit::cpu_time(pid).ok_or_else(|| anyhow!("no /proc/{pid}/stat"))
}

fn p4_daemon(fleet: &Fleet, cycles: usize, log: &dyn Fn(&str)) -> Result<Vec<Row>> {
    // sd_notify's STATUS= arrives once per cycle: an exact cycle counter.
    let (mut daemon, mut notify, _) = start_daemon("cwbench", &bench_policy("100ms"));
    let pid = daemon.pid();
    let mut next = |timeout: Duration| next_message(&mut daemon, &mut notify, timeout);
    let tracked = |msg: &str| -> Option<usize> {
        msg.lines()
            .find_map(|l| l.strip_prefix("STATUS="))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    while !next(Duration::from_secs(30))?.contains("READY=1") {}
    let cpu_ready = cpu_time(pid)?;
    // The first cycle attributes (walks the servers' fd tables); later ones reuse it.
    let first = loop {
        if let Some(n) = tracked(&next(Duration::from_secs(120))?) {
            break n;
        }
    };
    let cpu_first = cpu_time(pid)?;
    if first != fleet.n {
        bail!(
            "cwreap run tracks {first} CLOSE_WAIT sockets in its target, expected {}",
            fleet.n
        );
    }
    let mut seen = 0;
    while seen < cycles {
        let msg = next(Duration::from_secs(60))?;
        if let Some(n) = tracked(&msg) {
            if n != fleet.n {
                bail!("cwreap run tracks {n} sockets, expected {}", fleet.n);
            }
            seen += 1;
        }
    }
    let cpu_end = cpu_time(pid)?;
    let rss = status_mib(pid, "VmRSS:")?;
    let hwm = status_mib(pid, "VmHWM:")?;
    let per_cycle = (cpu_end.saturating_sub(cpu_first)) / cycles as u32;
    let first_cpu = cpu_first.saturating_sub(cpu_ready);
    log(&format!(
        "P4 cwreap run: VmRSS {rss:.1} MiB (peak {hwm:.1}), CPU first cycle {}, steady {} per cycle over {cycles}",
        ms(first_cpu),
        ms(per_cycle)
    ));
    drop(daemon);
    Ok(vec![
        Row {
            figure: format!(
                "P4 `cwreap run` VmRSS after {} cycles (VmHWM {hwm:.1} MiB)",
                cycles + 1
            ),
            n: fleet.n,
            m: fleet.m,
            value: format!("{rss:.1} MiB"),
            ss: "—".into(),
            ratio: "—".into(),
            target: format!("≤ {P4_MAX_RSS_MIB:.0} MiB"),
            verdict: verdict(rss <= P4_MAX_RSS_MIB),
        },
        Row {
            figure: format!(
                "P4 CPU (user+sys) per steady cycle, over {cycles} (first cycle {})",
                ms(first_cpu)
            ),
            n: fleet.n,
            m: fleet.m,
            value: ms(per_cycle),
            ss: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: "—",
        },
    ])
}

/// A policy of `n` targets of every kind of criterion, none of which matches a process
/// here, except the last, which names `idle` (a process with no CLOSE_WAIT socket, alone in
/// its network namespace): every cycle matches every process against every target and
/// dumps sock_diag, with nothing to do.
fn many_targets_policy(n: usize, idle: u32, metrics: Option<SocketAddr>) -> String {
    let listen = metrics.map_or("off".to_owned(), |a| format!("{{listen: \"{a}\"}}"));
    let mut y =
        format!("interval: 1s\ndry_run: true\nlog_format: json\nmetrics: {listen}\ntargets:\n");
    for i in 0..n.saturating_sub(1) {
        let m = match i % 6 {
            0 => format!("comm: \"^svc{i}$\""),
            1 => format!("cmdline: \"--service-id {i}( |$)\""),
            2 => format!("exe: \"/opt/svc{i}/bin/server$\""),
            3 => format!("systemd_unit: svc{i}.service"),
            4 => format!(
                "cgroup: /system.slice/svc{i}.service, local_ports: [{}]",
                10_000 + i
            ),
            _ => format!("comm: \"^worker-{i}$\", uid: {}", 10_000 + i),
        };
        y.push_str(&format!(
            "  - name: t{i}\n    match: {{{m}}}\n    older_than: 10m\n    action: shutdown\n    \
             exclude: {{remote_cidrs: [10.0.0.0/8], remote_ports: [5432]}}\n"
        ));
    }
    y.push_str(&format!(
        "  - name: idle\n    match: {{pid: {idle}}}\n    older_than: 10m\n    action: log\n"
    ));
    y
}

/// P5: a policy of `targets` targets with nothing to do. `cwreap run` as a child: time from
/// spawn to READY=1, then VmRSS after a few cycles; and the idle cycle in-process (median
/// of `reps`, at least 5).
fn p5_policy_scale(
    targets: usize,
    reps: usize,
    (n, m): (usize, usize),
    log: &dyn Fn(&str),
) -> Result<Vec<Row>> {
    // In a network namespace of its own: the host's CLOSE_WAIT sockets (other work on a
    // shared machine) are then no part of what a cycle dumps, and P5 measures the policy.
    let mut sleep = Command::new("unshare");
    sleep.args(["--net", "sleep", "3600"]).stdin(Stdio::null());
    cwreap_linux::testing::die_with_parent(&mut sleep);
    let idle = Killed(sleep.spawn().context("spawning sleep, the idle target")?);
    let idle_pid = idle.0.id();
    let netns = |pid: &str| fs::read_link(format!("/proc/{pid}/ns/net")).ok();
    let deadline = Instant::now() + Duration::from_secs(10);
    while netns(&idle_pid.to_string()) == netns("self") || netns(&idle_pid.to_string()).is_none() {
        if Instant::now() > deadline {
            bail!("the idle target never entered a network namespace of its own (unshare --net)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }

    // In-process: the idle cycle.
    let cfg = cwreap::shared::config::parse(&many_targets_policy(targets, idle_pid, None), "p5")
        .context("the P5 policy")?;
    let mut daemon = cwreap::daemon::Daemon::new(cfg, true).context("creating the daemon")?;
    let stop = AtomicBool::new(false);
    let first = daemon.cycle(&stop);
    if !first.errors.is_empty() || first.candidates != 0 {
        bail!(
            "P5 first cycle: errors {:?}, {} candidates (expected none)",
            first.errors,
            first.candidates
        );
    }
    let mut times = Vec::new();
    for _ in 0..reps.max(5) {
        let t = Instant::now();
        let r = daemon.cycle(&stop);
        times.push(t.elapsed());
        if !r.errors.is_empty() {
            bail!("P5 cycle errors: {:?}", r.errors);
        }
    }
    drop(daemon);
    let cycle = median(times);

    // As a child: start-up and memory.
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("a free port for the metrics endpoint")?;
    let (mut d, mut notify, spawned) = start_daemon(
        "cwbench-p5",
        &many_targets_policy(targets, idle_pid, Some(metrics)),
    );
    let pid = d.pid();
    let mut cycles = 0usize;
    while cycles < 3 {
        let msg = next_message(&mut d, &mut notify, Duration::from_secs(120))
            .with_context(|| format!("cwreap run with {targets} targets: {cycles} cycles"))?;
        if msg.contains("STATUS=") {
            cycles += 1;
        }
    }
    let start = notify
        .ready_at()
        .ok_or_else(|| anyhow!("cwreap run never said READY=1"))?
        .saturating_duration_since(spawned);
    let rss = status_mib(pid, "VmRSS:")?;
    let hwm = status_mib(pid, "VmHWM:")?;
    drop(d);
    drop(idle);
    log(&format!(
        "P5 {targets} targets: start {} to READY, VmRSS {rss:.1} MiB (peak {hwm:.1}) after {cycles} cycles, idle cycle {}",
        ms(start),
        ms(cycle)
    ));
    Ok(vec![
        Row {
            figure: format!("P5 `cwreap run` start with {targets} targets (spawn to READY=1)"),
            n,
            m,
            value: ms(start),
            ss: "—".into(),
            ratio: "—".into(),
            target: format!("< {}", ms(P5_MAX_START)),
            verdict: verdict(start < P5_MAX_START),
        },
        Row {
            figure: format!(
                "P5 `cwreap run` VmRSS with {targets} targets after {cycles} cycles (VmHWM {hwm:.1} MiB)"
            ),
            n,
            m,
            value: format!("{rss:.1} MiB"),
            ss: "—".into(),
            ratio: "—".into(),
            target: format!("≤ {P5_MAX_RSS_MIB:.0} MiB"),
            verdict: verdict(rss <= P5_MAX_RSS_MIB),
        },
        Row {
            figure: format!(
                "P5 idle daemon cycle with {targets} targets, nothing to do (in-process, median)"
            ),
            n,
            m,
            value: ms(cycle),
            ss: "—".into(),
            ratio: "—".into(),
            target: format!("≤ {}", ms(P5_MAX_CYCLE)),
            verdict: verdict(cycle <= P5_MAX_CYCLE),
        },
    ])
}

// ---------------------------------------------------------------------------------------
// Report.

fn machine() -> String {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let ss = Command::new("ss")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("nproc {nproc}, kernel {}, CPU {cpu}, {ss}", kernel.trim())
}

fn print_report(args: &Args, rows: &[Row]) {
    let mode = if let Some(t) = args.targets {
        format!("policy scale, {t} targets")
    } else if args.scaling {
        "scaling".to_owned()
    } else if args.dead_probe {
        format!("dead probing, N={} M={} U={}", args.n, args.m, args.unix)
    } else if args.events && !args.smoke {
        format!("events, N={} M={}", args.n, args.m)
    } else if args.smoke {
        "smoke".to_owned()
    } else {
        format!("N={} M={}", args.n, args.m)
    };
    let mut out = String::new();
    out.push_str(&format!(
        "\n### cwreap scale benchmark ({mode}, {} rep(s), medians)\n\n{}\n\n",
        args.reps,
        machine()
    ));
    out.push_str("| figure | N | M | cwreap | ss | ratio | target | result |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.figure, r.n, r.m, r.value, r.ss, r.ratio, r.target, r.verdict
        ));
    }
    print!("{out}");
}
