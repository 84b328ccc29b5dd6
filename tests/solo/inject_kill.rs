//! Whatever happens to cwreap during `reap --close`, the target survives: cwreap is
//! SIGKILLed (or its process group gets Ctrl-C, a hang-up or Ctrl-Z, then SIGKILL) at a
//! random moment of a real injection into a server holding 200 CLOSE_WAIT sockets, over
//! and over, and every time the target is alive, not stopped, not traced, keeps serving,
//! never sees EINTR (the fixture's sleeper and readers print `error` lines) nor a short
//! sleep, and each of its 200 fds is either closed or still the very same socket. The
//! injection runs in a helper process that none of this reaches. And the helper itself,
//! SIGKILLed right after a step outside the injected-registers window, leaves the target
//! just as well.
//!
//! Kill moments come from a seeded PRNG (`CWREAP_KILL_SEED` overrides the seed), spread
//! over a calibrated run: the helper logs its steps with CLOCK_MONOTONIC stamps (a test
//! seam), which also tells each trial whether cwreap died before, during or after the
//! helper's work. Clocks only place the kills and guard against hangs; the verdict is made
//! of conditions and counts.

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cwreap_linux::procfs::parse_socket_link;
use cwreap_linux::sys;
use cwreap_testkit::pause::{SeamDir, monotonic_ns};
use cwreap_testkit::runtimes;
use cwreap_testkit::*;

const SOCKETS: usize = 200;
const KILL_TRIALS: usize = 60;
/// Per signal, sent to cwreap's process group before the SIGKILL.
const GROUP_TRIALS: usize = 5;
const RUNTIME_TRIALS: usize = 20;
pub(crate) const HANG_GUARD: Duration = Duration::from_secs(60);
const DEFAULT_SEED: u64 = 0x00c1_05e5_a17e_5eed;

/// SplitMix64: small, seedable, good enough to spread kill moments.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    pub(crate) fn between(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.next() % (hi - lo)
    }
}

pub(crate) fn seed() -> u64 {
    std::env::var("CWREAP_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

/// What identifies the socket behind an fd: (inode, cookie).
pub(crate) type Identity = (u64, u64);

/// The socket fds of `pid` and their identity, read through a pidfd.
pub(crate) fn identities(pid: i32, fds: impl IntoIterator<Item = i32>) -> BTreeMap<i32, Identity> {
    let pidfd = sys::pidfd_open(pid).expect("pidfd_open the target");
    let mut out = BTreeMap::new();
    for fd in fds {
        let Ok(link) = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")) else {
            continue;
        };
        let Some(inode) = parse_socket_link(&link.to_string_lossy()) else {
            continue;
        };
        let Ok(dup) = sys::pidfd_getfd(pidfd.as_fd(), fd) else {
            continue;
        };
        let Ok(cookie) = sys::socket_cookie(dup.as_fd()) else {
            continue;
        };
        out.insert(fd, (inode, cookie));
    }
    out
}

/// (tid, state letter) of every thread of `pid`, and its TracerPid.
fn threads_and_tracer(pid: i32) -> (Vec<(i32, char)>, i32) {
    let states = thread_states(pid);
    let tracer = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(-1);
    (states, tracer)
}

/// How cwreap is disturbed in one trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Blow {
    /// SIGKILL to cwreap.
    Kill,
    /// This signal to cwreap's process group (as a terminal sends it), then SIGKILL.
    Group(i32),
}

/// Where cwreap was, relative to the (first) helper, when the blow came.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// No helper had started.
    Before,
    /// The helper had started but not stopped the target yet.
    HelperStarting,
    /// The target was stopped (between the helper's `stopped` and `detached`).
    TargetStopped,
    /// The helper had detached but not exited.
    HelperFinishing,
    /// The helper had finished (cwreap was reporting, or done).
    After,
}

/// Step name → first monotonic stamp, and the helpers' pids, from a seam log.
fn read_log(seams: &SeamDir) -> (BTreeMap<String, i128>, Vec<i32>) {
    let mut first = BTreeMap::new();
    let mut pids = Vec::new();
    for (step, ns, pid) in seams.steps() {
        if step == "start" && !pids.contains(&pid) {
            pids.push(pid);
        }
        if pids.first() == Some(&pid) {
            first.entry(step).or_insert(ns);
        }
    }
    (first, pids)
}

fn phase_at(steps: &BTreeMap<String, i128>, t: i128) -> Phase {
    let reached = |s: &str| steps.get(s).is_some_and(|&ns| ns <= t);
    if !reached("start") {
        Phase::Before
    } else if reached("done") {
        Phase::After
    } else if reached("detached") {
        Phase::HelperFinishing
    } else if reached("stopped") {
        Phase::TargetStopped
    } else {
        Phase::HelperStarting
    }
}

/// Our children that are, or are about to become, an injection helper for `target`: an
/// `inject-helper`, or a copy of cwreap forked for one and not yet exec'd.
pub(crate) fn orphans(target: i32) -> Vec<i32> {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let ppid = status
                .lines()
                .find_map(|l| l.strip_prefix("PPid:"))
                .map(str::trim);
            if ppid != Some(me.as_str()) {
                return false;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            args.iter().any(|a| a == "inject-helper")
                || (args.iter().any(|a| a == "reap")
                    && args.iter().any(|a| *a == target.to_string()))
        })
        .collect()
}

/// Top the leaked sockets up to SOCKETS and identify them all (a few rounds, in case one
/// went away meanwhile).
fn fill(target: &mut dyn Target, leaked: &mut Vec<(TcpStream, i32)>) -> BTreeMap<i32, Identity> {
    let pid = target.pid();
    let mut ids = BTreeMap::new();
    for _ in 0..3 {
        target.top_up(leaked);
        ids = identities(pid, leaked.iter().map(|(_, fd)| *fd));
        leaked.retain(|(_, fd)| ids.contains_key(fd));
        if ids.len() == SOCKETS {
            break;
        }
    }
    ids
}

/// Wait until every helper in `pids` has exited (reaping those that became our children
/// when cwreap died: this process is a child subreaper). Returns those still alive after
/// the guard.
pub(crate) fn wait_helpers(pids: &[i32]) -> Vec<i32> {
    let deadline = Instant::now() + HANG_GUARD;
    let mut left: Vec<i32> = pids.to_vec();
    while !left.is_empty() && Instant::now() < deadline {
        left.retain(|&pid| {
            let Some(p) = rustix::process::Pid::from_raw(pid) else {
                return false;
            };
            match rustix::process::waitpid(Some(p), rustix::process::WaitOptions::NOHANG) {
                Ok(Some(_)) => false,
                Ok(None) => true,
                // Not our child: reaped by cwreap already, or gone.
                Err(_) => std::path::Path::new(&format!("/proc/{pid}")).exists(),
            }
        });
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    left
}

fn spawn_reap(pid: i32, seams: &SeamDir, own_group: bool) -> Child {
    let mut cmd = Command::new(cwreap_bin());
    cmd.args([
        "reap",
        "--pid",
        &pid.to_string(),
        "--older-than",
        "1ms",
        "--close",
        "--yes",
    ])
    .envs(seams.env(None))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if own_group {
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    cmd.spawn().expect("start cwreap reap")
}

/// Deliver `blow` to the running `cwreap`; returns the moment (monotonic ns).
fn strike(cwreap: &mut Child, blow: Blow) -> i128 {
    let pid = rustix::process::Pid::from_raw(cwreap.id() as i32).expect("pid");
    let t = monotonic_ns();
    if let Blow::Group(sig) = blow {
        let signal = rustix::process::Signal::from_named_raw(sig).expect("signal");
        let _ = rustix::process::kill_process_group(pid, signal);
        // Let it act (a handler, a stop) before the SIGKILL.
        std::thread::sleep(Duration::from_millis(2));
    }
    let _ = cwreap.kill();
    t
}

/// A target under test, as the trials see it.
trait Target {
    fn pid(&self) -> i32;
    /// Bring the leaked sockets back to SOCKETS, returning their fds.
    fn top_up(&mut self, leaked: &mut Vec<(TcpStream, i32)>);
    /// Problems seen since the last call: `error` lines, short sleeps, a dead process,
    /// a new connection that does not echo.
    fn problems(&mut self) -> Vec<String>;
}

struct FixtureTarget {
    fx: Fixture,
    checked: usize,
}

impl Target for FixtureTarget {
    fn pid(&self) -> i32 {
        self.fx.pid()
    }

    fn top_up(&mut self, leaked: &mut Vec<(TcpStream, i32)>) {
        while leaked.len() < SOCKETS {
            leaked.push(self.fx.close_wait(0));
        }
    }

    fn problems(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if !matches!(self.fx.child.try_wait(), Ok(None)) {
            out.push(format!("the fixture died: {:?}", self.fx.child.try_wait()));
            return out;
        }
        // Everything it printed up to a fresh pong.
        self.fx.send("ping");
        loop {
            let line = self.fx.next_line();
            if line == "pong" {
                break;
            }
        }
        let (mut c, fd) = self.fx.connect(0);
        if !echoes(&mut c) {
            out.push("a new connection does not echo".into());
        }
        // Its end, seen before anything else expects an `eof` line of its own.
        drop(c);
        self.fx.expect_line(&format!("eof {fd}"));
        for line in &self.fx.history[self.checked..] {
            if line.starts_with("error") {
                out.push(format!("fixture: {line}"));
            }
            if let Some(ms) = line
                .strip_prefix("slept ")
                .and_then(|v| v.parse::<u64>().ok())
                && ms < 1500
            {
                out.push(format!("a 1500 ms sleep took {ms} ms"));
            }
        }
        self.checked = self.fx.history.len();
        out
    }
}

struct RuntimeTarget {
    server: runtimes::Server,
    checked_errors: usize,
}

impl Target for RuntimeTarget {
    fn pid(&self) -> i32 {
        self.server.pid()
    }

    fn top_up(&mut self, leaked: &mut Vec<(TcpStream, i32)>) {
        while leaked.len() < SOCKETS {
            leaked.push(self.server.close_wait(0));
        }
    }

    fn problems(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.server.alive() {
            out.push(format!("the {} server died", self.server.runtime.name()));
            return out;
        }
        let errors = self.server.errors();
        out.extend(errors[self.checked_errors..].iter().cloned());
        self.checked_errors = errors.len();
        let (mut c, _) = self.server.connect(0);
        if let Err(e) = runtimes::echo_token(&mut c, b"still-serving") {
            out.push(format!("a new connection does not echo: {e}"));
        }
        out
    }
}

#[derive(Default)]
struct Tally {
    /// (blow, phase) → trials.
    trials: BTreeMap<(Blow, Phase), usize>,
    /// Trials where cwreap had exited on its own before the blow.
    finished_first: usize,
    /// Helper SIGKILLed right after this step → trials.
    helper_killed_after: BTreeMap<&'static str, usize>,
    closed: usize,
    kept: usize,
    failures: Vec<String>,
}

impl Tally {
    fn summary(&self, name: &str) -> String {
        let mut by_blow: BTreeMap<Blow, Vec<String>> = BTreeMap::new();
        for ((blow, phase), n) in &self.trials {
            by_blow
                .entry(*blow)
                .or_default()
                .push(format!("{phase:?} {n}"));
        }
        let mut s = format!(
            "{name}: {} trials; fds closed {}, kept (same socket) {}; cwreap had already exited in {}",
            self.trials.values().sum::<usize>() + self.helper_killed_after.values().sum::<usize>(),
            self.closed,
            self.kept,
            self.finished_first
        );
        for (blow, phases) in by_blow {
            s.push_str(&format!("\n  {blow:?}: {}", phases.join(", ")));
        }
        if !self.helper_killed_after.is_empty() {
            let steps: Vec<String> = self
                .helper_killed_after
                .iter()
                .map(|(step, n)| format!("{step} {n}"))
                .collect();
            s.push_str(&format!("\n  helper SIGKILLed after: {}", steps.join(", ")));
        }
        s
    }
}

/// One trial: fill up, start `cwreap reap --close`, strike it after `delay_us`, let the
/// helper finish, check the target.
fn trial(
    target: &mut dyn Target,
    leaked: &mut Vec<(TcpStream, i32)>,
    blow: Blow,
    timeline: &mut Timeline,
    rng: &mut Rng,
    tally: &mut Tally,
    n: usize,
) {
    let moment = timeline.moment(rng);
    let pid = target.pid();
    let before = fill(target, leaked);
    if before.len() != SOCKETS {
        tally.failures.push(format!(
            "trial {n}: only {} of {SOCKETS} leaked fds could be identified",
            before.len()
        ));
        return;
    }
    let seams = SeamDir::new("kill");
    let t_spawn = monotonic_ns();
    let mut cwreap = spawn_reap(pid, &seams, matches!(blow, Blow::Group(_)));
    match moment {
        Moment::AfterSpawn(us) => std::thread::sleep(Duration::from_micros(us)),
        Moment::AfterHelperStart(us) => {
            let deadline = Instant::now() + HANG_GUARD;
            while !seams.steps().iter().any(|(s, _, _)| s == "start")
                && matches!(cwreap.try_wait(), Ok(None))
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_micros(50));
            }
            std::thread::sleep(Duration::from_micros(us));
        }
    }
    let finished_first = matches!(cwreap.try_wait(), Ok(Some(_)));
    let t_blow = strike(&mut cwreap, blow);
    let _ = cwreap.wait();
    let (steps, mut helpers) = read_log(&seams);
    // A helper forked just before the blow may not have logged anything yet: with cwreap
    // dead it is our child now (we are a subreaper), so look for it there too.
    helpers.extend(orphans(pid));
    let phase = if finished_first {
        tally.finished_first += 1;
        Phase::After
    } else {
        phase_at(&steps, t_blow)
    };
    *tally.trials.entry((blow, phase)).or_default() += 1;
    let lingering = wait_helpers(&helpers);
    timeline.learn(&read_log(&seams).0, t_spawn);
    let mut problems = Vec::new();
    if !lingering.is_empty() {
        problems.push(format!(
            "helpers {lingering:?} still running after {HANG_GUARD:?}"
        ));
    }
    let (states, tracer) = threads_and_tracer(pid);
    if states.iter().any(|(_, s)| matches!(s, 't' | 'T')) || tracer != 0 {
        problems.push(format!(
            "left stopped or traced: {states:?}, tracer {tracer}"
        ));
    }
    // Before the serving check, whose new connection may take a freed number.
    let after = identities(pid, before.keys().copied());
    let open: std::collections::BTreeSet<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    problems.extend(target.problems());
    for (fd, id) in &before {
        match after.get(fd) {
            Some(now) if now == id => tally.kept += 1,
            Some(now) => problems.push(format!("fd {fd} changed from {id:?} to {now:?}")),
            None if open.contains(fd) => {
                problems.push(format!("fd {fd} is open but not the socket"))
            }
            None => tally.closed += 1,
        }
    }
    leaked.retain(|(_, fd)| after.contains_key(fd));
    for p in problems {
        tally
            .failures
            .push(format!("trial {n} ({blow:?} {moment:?}, {phase:?}): {p}"));
    }
}

/// Where the helper's steps fall, in µs after spawning cwreap: medians of what the trials
/// saw, seeded by one uninterrupted run.
#[derive(Default)]
struct Timeline {
    seen: BTreeMap<&'static str, Vec<u64>>,
}

const TIMELINE_STEPS: [&str; 4] = ["start", "stopped", "detached", "done"];

impl Timeline {
    fn learn(&mut self, steps: &BTreeMap<String, i128>, t_spawn: i128) {
        for s in TIMELINE_STEPS {
            if let Some(&ns) = steps.get(s) {
                let us = u64::try_from((ns - t_spawn) / 1000).unwrap_or(0);
                self.seen.entry(s).or_default().push(us);
            }
        }
    }

    fn median(&self, step: &str) -> u64 {
        let mut v = self.seen.get(step).cloned().unwrap_or_default();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    }

    /// A kill moment. A third of them count from the spawn of cwreap, over the whole run
    /// and a bit after; the others count from the moment the helper logs its start (the
    /// run's timing varies by milliseconds), over the helper's work.
    fn moment(&self, rng: &mut Rng) -> Moment {
        let (start, done) = (self.median("start"), self.median("done"));
        if rng.next().is_multiple_of(3) {
            Moment::AfterSpawn(rng.between(0, done + done / 4 + 1))
        } else {
            Moment::AfterHelperStart(rng.between(0, done.saturating_sub(start) + 1))
        }
    }

    fn describe(&self) -> String {
        TIMELINE_STEPS
            .iter()
            .map(|s| format!("{s} {} µs", self.median(s)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// When to strike, in µs.
#[derive(Debug, Clone, Copy)]
enum Moment {
    AfterSpawn(u64),
    AfterHelperStart(u64),
}

/// An uninterrupted run, to seed the timeline.
fn calibrate(target: &mut dyn Target, leaked: &mut Vec<(TcpStream, i32)>) -> Timeline {
    target.top_up(leaked);
    let seams = SeamDir::new("calibrate");
    let t0 = monotonic_ns();
    let status = spawn_reap(target.pid(), &seams, false)
        .wait()
        .expect("wait for cwreap");
    assert!(
        status.success(),
        "calibration run of cwreap failed: {status}"
    );
    let (steps, _) = read_log(&seams);
    for s in TIMELINE_STEPS {
        assert!(
            steps.contains_key(s),
            "the calibration run logged no {s}: {steps:?}"
        );
    }
    let mut timeline = Timeline::default();
    timeline.learn(&steps, t0);
    let pid = target.pid();
    leaked.retain(|(_, fd)| std::path::Path::new(&format!("/proc/{pid}/fd/{fd}")).exists());
    assert!(
        leaked.is_empty(),
        "the calibration run left {} fds",
        leaked.len()
    );
    timeline
}

fn report(name: &str, tally: &Tally) {
    println!("{}", tally.summary(name));
    assert!(
        tally.failures.is_empty(),
        "{}\n{} failure(s), first ones:\n{}",
        tally.summary(name),
        tally.failures.len(),
        tally.failures[..tally.failures.len().min(30)].join("\n")
    );
}

pub(crate) fn subreaper() {
    // Helpers orphaned by a killed cwreap become our children, so we can wait for them.
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .expect("PR_SET_CHILD_SUBREAPER");
}

#[test]
#[ignore = "needs root: `reap --close` stops the target with ptrace to close fds inside it (CAP_SYS_PTRACE)"]
fn killing_cwreap_at_random_moments_never_harms_the_threaded_server() {
    let _alone = crate::alone();
    subreaper();
    let mut target = FixtureTarget {
        fx: Fixture::start(&["127.0.0.1:0"], &["--threaded"]),
        checked: 0,
    };
    let mut leaked = Vec::new();
    let mut timeline = calibrate(&mut target, &mut leaked);
    let seed = seed();
    println!("calibration: {}; seed {seed}", timeline.describe());
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    let mut blows = vec![Blow::Kill; KILL_TRIALS];
    for sig in [libc::SIGINT, libc::SIGHUP, libc::SIGTSTP] {
        blows.extend(std::iter::repeat_n(Blow::Group(sig), GROUP_TRIALS));
    }
    for (n, blow) in blows.into_iter().enumerate() {
        trial(
            &mut target,
            &mut leaked,
            blow,
            &mut timeline,
            &mut rng,
            &mut tally,
            n,
        );
    }
    println!(
        "steps after spawning cwreap (medians): {}",
        timeline.describe()
    );
    // The sleeps that were in progress during the last trials end too.
    target.fx.expect_line("slept ");
    target.fx.expect_line("slept ");
    tally.failures.extend(target.problems());
    report("threaded server", &tally);
    let kills: usize = tally
        .trials
        .iter()
        .filter(|((b, _), _)| *b == Blow::Kill)
        .map(|(_, n)| n)
        .sum();
    assert!(kills >= 50, "only {kills} SIGKILL trials");
}

#[test]
#[ignore = "needs root: `reap --close` stops the target with ptrace to close fds inside it (CAP_SYS_PTRACE)"]
fn killing_cwreap_at_random_moments_never_harms_a_go_server() {
    let _alone = crate::alone();
    let test = "killing_cwreap_at_random_moments_never_harms_a_go_server";
    let Some(server) = runtimes::Server::start(test, runtimes::Runtime::Go, &["127.0.0.1:0"])
    else {
        return;
    };
    subreaper();
    let mut target = RuntimeTarget {
        server,
        checked_errors: 0,
    };
    let mut leaked = Vec::new();
    let mut timeline = calibrate(&mut target, &mut leaked);
    let seed = seed() ^ 0x60;
    println!("calibration: {}; seed {seed}", timeline.describe());
    let mut rng = Rng(seed);
    let mut tally = Tally::default();
    for n in 0..RUNTIME_TRIALS {
        trial(
            &mut target,
            &mut leaked,
            Blow::Kill,
            &mut timeline,
            &mut rng,
            &mut tally,
            n,
        );
    }
    println!(
        "steps after spawning cwreap (medians): {}",
        timeline.describe()
    );
    report("go server", &tally);
}

/// SIGKILL of the helper itself right after a step where the target holds its own
/// registers: the target survives and serves, and its fds are closed or untouched.
#[test]
#[ignore = "needs root: `reap --close` stops the target with ptrace to close fds inside it (CAP_SYS_PTRACE)"]
fn killing_the_helper_after_a_step_leaves_the_target_running() {
    let _alone = crate::alone();
    subreaper();
    let mut target = FixtureTarget {
        fx: Fixture::start(&["127.0.0.1:0"], &["--threaded"]),
        checked: 0,
    };
    let mut leaked = Vec::new();
    let mut tally = Tally::default();
    let steps = ["start", "stopped", "restored", "settled", "detached"];
    for (n, step) in steps.iter().cycle().take(3 * steps.len()).enumerate() {
        let pid = target.pid();
        let before = fill(&mut target, &mut leaked);
        let seams = SeamDir::new("helper-kill");
        let mut cmd = Command::new(cwreap_bin());
        cmd.args(["reap", "--pid", &pid.to_string(), "--older-than", "1ms"])
            .args(["--close", "--yes"])
            .envs(seams.env(Some(step)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut cwreap = cmd.spawn().expect("start cwreap");
        let Some(helper) =
            seams.wait_paused(HANG_GUARD, || matches!(cwreap.try_wait(), Ok(Some(_))))
        else {
            tally
                .failures
                .push(format!("trial {n}: the helper never paused at {step}"));
            continue;
        };
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(helper).expect("pid"),
            rustix::process::Signal::KILL,
        )
        .expect("SIGKILL the helper");
        seams.release();
        let status = cwreap.wait().expect("wait for cwreap");
        let lingering = wait_helpers(&orphans(pid));
        *tally.helper_killed_after.entry(step).or_default() += 1;
        let mut problems = Vec::new();
        if !lingering.is_empty() {
            problems.push(format!("helpers {lingering:?} still running"));
        }
        if status.success() {
            problems.push("cwreap reported success although its helper was killed".into());
        }
        let (states, tracer) = threads_and_tracer(pid);
        if states.iter().any(|(_, s)| matches!(s, 't' | 'T')) || tracer != 0 {
            problems.push(format!(
                "left stopped or traced: {states:?}, tracer {tracer}"
            ));
        }
        let after = identities(pid, before.keys().copied());
        problems.extend(target.problems());
        for (fd, id) in &before {
            match after.get(fd) {
                Some(now) if now == id => tally.kept += 1,
                Some(now) => problems.push(format!("fd {fd} changed from {id:?} to {now:?}")),
                None => tally.closed += 1,
            }
        }
        leaked.retain(|(_, fd)| after.contains_key(fd));
        for p in problems {
            tally
                .failures
                .push(format!("trial {n} (helper killed after {step}): {p}"));
        }
    }
    target.fx.expect_line("slept ");
    target.fx.expect_line("slept ");
    tally.failures.extend(target.problems());
    report("helper killed after a step", &tally);
}
