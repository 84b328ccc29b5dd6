//! A daemon nothing can wedge or corrupt: the real `cwreap run` as a child process, treated
//! the way an adversarial user or a bad day would treat it.
//!
//! * SIGKILL, ten times, in the middle of enforcing cycles over 3000 CLOSE_WAIT sockets:
//!   every line of the audit log stays JSON, and every socket that left CLOSE_WAIT (by `ss`
//!   and by its peer's EOF) has a record with its inode. A torn last line left by an
//!   earlier crash is cut at the next start.
//! * A full file system under the audit log: cycles go on, the lost records are counted,
//!   and once space is back every line is whole.
//! * Rotation: after `mv` and SIGHUP the daemon writes a new file.
//! * Refusals, each an immediate exit 2 from both `check` and `run`: an audit log that is a
//!   symlink or a FIFO, a policy in a world-writable directory, a FIFO policy (also on
//!   SIGHUP), and a non-root user swapping the policy while `check` reads it.
//! * Outputs nobody reads: stderr a full pipe, NOTIFY_SOCKET never drained. Cycles go on,
//!   and SIGTERM still ends the daemon.
//!
//! Tests decide by conditions and counts; clocks only guard against hangs.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{OpenOptions, Permissions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::metrics::{self, free_addr};
use crate::support::runtimes::PYTHON;
use crate::support::*;
use rustix::process::{Pid, Signal};
use serde_json::Value;

/// How long anything that must end may take before the test calls it a hang: far past
/// every wait of the program's own (a stalled read's deadline, a stuck disk's), so that on a
/// loaded host only a real hang reaches it. Tests decide by what happened, not by this.
pub(super) const HANG: Duration = Duration::from_secs(30);
pub(super) const NOBODY: &str = "65534";

// ---------------------------------------------------------------------------------------
// Scratch space, policies, the daemon.

/// An enforcing policy with one `shutdown` target per pid, due at once.
pub(super) fn policy(pids: &[i32], extra: &str) -> String {
    let mut y = format!("interval: 200ms\ndry_run: false\nlog_format: json\n{extra}targets:\n");
    for (i, pid) in pids.iter().enumerate() {
        y.push_str(&format!(
            "  - name: t{i}\n    match: {{pid: {pid}}}\n    older_than: 1ms\n    action: shutdown\n"
        ));
    }
    y
}

/// A command that must end: (exit code, stdout, stderr, time taken). A hang past
/// [`HANG`] kills it and fails the test.
pub(super) fn run_guarded(cmd: &mut Command) -> (Option<i32>, String, String, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break status;
        }
        if started.elapsed() >= HANG {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after {HANG:?}: it hangs");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = started.elapsed();
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    (status.code(), out, err, took)
}

/// `check` and `run` on `cfg` both exit 2 at once, with one `cwreap:` line containing
/// every one of `needles`.
pub(super) fn refused(what: &str, cfg: &Path, needles: &[&str]) {
    refused_by(what, cfg, needles, |sub, cfg| {
        let mut cmd = Command::new(cwreap_bin());
        cmd.arg(sub).arg("--config").arg(cfg);
        cmd
    });
}

/// [`refused`], with `cwreap SUB --config CFG` as `command` builds it (behind another
/// program, in another namespace).
pub(super) fn refused_by(
    what: &str,
    cfg: &Path,
    needles: &[&str],
    command: impl Fn(&str, &Path) -> Command,
) {
    for sub in ["check", "run"] {
        let mut cmd = command(sub, cfg);
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "RUST_LOG"] {
            cmd.env_remove(var);
        }
        // A `run` that gets as far as discovery before it is refused pins nothing on the
        // host and publishes no ages under the host's /run/cwreap.
        without_pins(&mut cmd).env(
            "CWREAP_RUN_DIR",
            std::env::temp_dir().join(format!("cwreap-refused-{}", std::process::id())),
        );
        let (code, out, err, took) = run_guarded(&mut cmd);
        let lines: Vec<String> = err.lines().map(str::to_owned).collect();
        assert_eq!(
            code,
            Some(2),
            "{what}: `cwreap {sub}` exited {code:?}; stdout:\n{out}\nstderr:\n{}",
            fold_log(&lines)
        );
        let msg = lines
            .iter()
            .find(|l| l.starts_with("cwreap: "))
            .unwrap_or_else(|| {
                panic!(
                    "{what}: no `cwreap:` line from {sub}:\n{}",
                    fold_log(&lines)
                )
            });
        for n in needles {
            assert!(
                msg.contains(n),
                "{what}: `cwreap {sub}` said {msg:?}, without {n:?}"
            );
        }
        assert!(
            !out.contains(": OK"),
            "{what}: `cwreap {sub}` said OK:\n{out}"
        );
        println!("{what}: `cwreap {sub}` exit 2 in {took:?}: {msg}");
    }
}

// ---------------------------------------------------------------------------------------
// Sockets and records.

/// A connection by its two ends, as the server sees them: (local, remote). Clients of
/// different servers may share a source port, so the client's address alone is not enough.
type Ends = (SocketAddr, SocketAddr);

/// Server-side socket inode of each connection of `pid`.
fn inodes_by_ends(pid: i32) -> HashMap<Ends, u64> {
    let out = cwreap(&["scan", "--pid", &pid.to_string(), "--json"]);
    assert!(out.status.success(), "scan: {}", stderr(&out));
    json_lines(&out)
        .iter()
        .map(|r| {
            let local: SocketAddr = field_str(r, "local").parse().expect("local");
            let remote: SocketAddr = field_str(r, "remote").parse().expect("remote");
            ((local, remote), field_i64(r, "inode") as u64)
        })
        .collect()
}

/// Every line of the audit log as JSON; a line that is not fails the test, naming it.
pub(super) fn audit_records(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).expect("read the audit log");
    assert!(
        text.is_empty() || text.ends_with('\n'),
        "the audit log ends in a partial line: {:?}",
        text.rsplit('\n').next()
    );
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("audit line {} is not JSON ({e}): {l}", i + 1))
        })
        .collect()
}

fn inodes_of(records: &[Value], event: &str) -> BTreeSet<u64> {
    records
        .iter()
        .filter(|r| r["event"] == event)
        .filter_map(|r| r["inode"].as_u64())
        .collect()
}

/// Counts `"event":"action"` lines appended to a file, reading only what is new.
struct Tail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    actions: usize,
    lines: usize,
}

impl Tail {
    fn new(path: &Path) -> Tail {
        Tail {
            path: path.to_path_buf(),
            offset: 0,
            partial: Vec::new(),
            actions: 0,
            lines: 0,
        }
    }

    fn poll(&mut self) -> &Tail {
        let Ok(mut f) = std::fs::File::open(&self.path) else {
            return self;
        };
        let len = f.metadata().map_or(0, |m| m.len());
        if len < self.offset {
            // Cut (a torn tail repaired) or replaced: start over.
            *self = Tail::new(&self.path);
        }
        if f.seek(SeekFrom::Start(self.offset)).is_err() {
            return self;
        }
        let mut new = Vec::new();
        let _ = f.read_to_end(&mut new);
        self.offset += new.len() as u64;
        self.partial.extend_from_slice(&new);
        while let Some(i) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=i).collect();
            self.lines += 1;
            const ACTION: &[u8] = b"\"event\":\"action\"";
            if line.windows(ACTION.len()).any(|w| w == ACTION) {
                self.actions += 1;
            }
        }
        self
    }
}

/// Whether each client has seen its connection end (EOF or reset), without waiting.
fn ended(client: &mut TcpStream) -> bool {
    let mut buf = [0u8; 16];
    match client.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Inodes of `pids`' sockets still in CLOSE_WAIT, by `ss`.
fn still_close_wait(pids: &[i32], inode_of: &HashMap<Ends, u64>) -> BTreeSet<u64> {
    pids.iter()
        .flat_map(|p| ss_close_wait(*p))
        .filter_map(|(_, local, peer)| inode_of.get(&(local, peer)).copied())
        .collect()
}

/// The metrics text, empty while the endpoint does not answer.
fn scrape(addr: SocketAddr) -> String {
    metrics::scrape(addr).unwrap_or_default()
}

/// The value of an unlabelled sample, or of the sum of a labelled family.
fn metric(text: &str, name: &str) -> f64 {
    metrics::sum(text, name, "")
}

// ---------------------------------------------------------------------------------------
// SIGKILL mid-enforcement.

#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn sigkill_mid_enforcement_leaves_a_record_of_every_socket_it_touched() {
    const SERVERS: usize = 3;
    const PER: usize = 1000;
    const KILLS: usize = 10;
    raise_nofile();
    let scratch = Scratch::new("sigkill", 0o700);
    let mut fixtures = Vec::new();
    let mut clients: Vec<(TcpStream, u64)> = Vec::new();
    let mut inode_of: HashMap<Ends, u64> = HashMap::new();
    for i in 0..SERVERS {
        let mut fx = Fixture::start(&[&format!("127.78.0.{}:0", i + 1)], &[]);
        let conns = close_waits(&mut fx, PER);
        let by_ends = inodes_by_ends(fx.pid());
        for c in conns {
            let ends = (
                c.peer_addr().expect("server address"),
                c.local_addr().expect("client address"),
            );
            let inode = *by_ends.get(&ends).expect("scan lists every connection");
            c.set_nonblocking(true).expect("nonblocking client");
            inode_of.insert(ends, inode);
            clients.push((c, inode));
        }
        fixtures.push(fx);
    }
    let pids: Vec<i32> = fixtures.iter().map(Fixture::pid).collect();
    let all: BTreeSet<u64> = clients.iter().map(|(_, i)| *i).collect();
    assert_eq!(all.len(), SERVERS * PER);

    let cfg = scratch.path("cwreap.yaml");
    let audit = scratch.path("audit.jsonl");
    // 60 per cycle, a cycle every 200 ms: fifty cycles of enforcement to land kills in.
    write_policy(
        &cfg,
        &policy(
            &pids,
            &format!(
                "audit_log: {}\nmetrics: {{listen: off}}\nlimits: {{max_reaps_per_cycle: 60, max_reaps_per_minute: 1000000}}\n",
                audit.display()
            ),
        ),
    );
    const FRAGMENT: &[u8] = b"{\"ts\":1.5,\"event\":\"action\",\"inode\":12";
    let mut tail = Tail::new(&audit);
    let mut rounds = Vec::new();
    let mut only_intent_total = 0;
    let mut left_before: BTreeSet<u64> = BTreeSet::new();
    for round in 0..KILLS {
        // Every other start finds a torn last line, as a crash in the middle of a write
        // would leave it; it must be cut, never merged with the next record.
        let torn = round % 2 == 1;
        if torn {
            let mut f = OpenOptions::new()
                .append(true)
                .open(&audit)
                .expect("open the audit log");
            f.write_all(FRAGMENT).expect("tear the last line");
        }
        let mut before = tail.poll().actions;
        let mut d = Running::spawn(&cfg, &[], &[]);
        if torn {
            d.wait_until("the torn line cut", HANG, |r| {
                r.lines().iter().any(|l| {
                    l.contains("ended in a partial line")
                        && l.contains(&format!("\"bytes\":{}", FRAGMENT.len()))
                })
            });
            // Count again from the start: the file was cut under the old count.
            tail = Tail::new(&audit);
            before = tail.poll().actions;
        }
        // Vary the kill point across and inside cycles of 60.
        let want = 20 + 11 * round;
        d.wait_until(
            &format!("{want} new action records"),
            Duration::from_secs(60),
            |_| tail.poll().actions >= before + want,
        );
        d.kill();

        // What has left CLOSE_WAIT so far: by ss, and by the peers (a FIN crosses loopback
        // at once; the guard only covers a slow machine).
        let left: BTreeSet<u64> = all
            .difference(&still_close_wait(&pids, &inode_of))
            .copied()
            .collect();
        let deadline = Instant::now() + HANG;
        let mut eof: BTreeSet<u64> = BTreeSet::new();
        loop {
            for (c, inode) in clients.iter_mut() {
                if !eof.contains(inode) && ended(c) {
                    eof.insert(*inode);
                }
            }
            if eof.is_superset(&left) || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if eof != left {
            let only_eof: Vec<&u64> = eof.difference(&left).take(5).collect();
            let only_ss: Vec<&u64> = left.difference(&eof).take(5).collect();
            panic!(
                "round {round}: {} peers saw EOF but ss says {} sockets left CLOSE_WAIT; EOF only, e.g. {only_eof:?}; ss only, e.g. {only_ss:?}",
                eof.len(),
                left.len()
            );
        }
        let records = audit_records(&audit);
        let recorded: BTreeSet<u64> = inodes_of(&records, "intent")
            .union(&inodes_of(&records, "action"))
            .copied()
            .collect();
        let missing: Vec<&u64> = left.difference(&recorded).collect();
        assert!(
            missing.is_empty(),
            "round {round}: {} sockets left CLOSE_WAIT without an audit record, e.g. {:?}; log:\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            d.log()
        );
        // Shut down by a daemon killed before it wrote the action record: only the intent
        // record tells.
        let actions = inodes_of(&records, "action");
        let only_intent = left
            .difference(&left_before)
            .filter(|i| !actions.contains(i))
            .count();
        left_before = left.clone();
        only_intent_total += only_intent;
        rounds.push((
            round,
            tail.poll().actions - before,
            left.len(),
            only_intent,
            torn,
        ));
    }

    // A last daemon finishes the job.
    let mut d = Running::spawn(&cfg, &[], &[]);
    d.wait_until(
        "every socket out of CLOSE_WAIT",
        Duration::from_secs(120),
        |_| still_close_wait(&pids, &inode_of).is_empty(),
    );
    let (status, took) = d.terminate(HANG);
    assert!(status.success(), "{status}; log:\n{}", d.log());
    let records = audit_records(&audit);
    let mut reaped: BTreeMap<u64, usize> = BTreeMap::new();
    for r in records
        .iter()
        .filter(|r| r["event"] == "action" && r["outcome"] == "reaped")
    {
        *reaped
            .entry(r["inode"].as_u64().expect("inode"))
            .or_default() += 1;
    }
    let twice: Vec<_> = reaped.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "sockets reaped twice: {twice:?}");
    let intents = inodes_of(&records, "intent");
    assert!(
        intents.is_superset(&reaped.keys().copied().collect()),
        "a reaped socket without its intent record"
    );
    let recorded: BTreeSet<u64> = intents
        .union(&inodes_of(&records, "action"))
        .copied()
        .collect();
    assert!(
        recorded.is_superset(&all),
        "{} sockets without a record",
        all.difference(&recorded).count()
    );
    for (c, inode) in clients.iter_mut() {
        assert!(ended(c), "the peer of socket {inode} never saw EOF");
    }
    println!(
        "sigkill: {} CLOSE_WAIT over {SERVERS} servers; {KILLS} kills; per round (round, new action records before the kill, left CLOSE_WAIT so far, of those new this round recorded by their intent only, started on a torn line): {rounds:?}; {only_intent_total} sockets in all recorded only by their intent; finally {} lines, {} reaped with one record each, every inode recorded; the last daemon stopped {took:?} after SIGTERM",
        all.len(),
        records.len(),
        reaped.len()
    );
    drop(clients);
}

// ---------------------------------------------------------------------------------------
// A full file system.

/// A tmpfs of our own, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&dir).expect("mount point");
        run_ok(
            Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={size},mode=0755"),
                    "tmpfs",
                ])
                .arg(&dir),
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Fill the file system of `dir` with `file`, then give back `keep` bytes.
fn fill(file: &Path, keep: u64) {
    let mut f = std::fs::File::create(file).expect("create filler");
    let chunk = vec![b'x'; 4096];
    while f.write_all(&chunk).is_ok() {}
    let len = f.metadata().expect("filler size").len();
    f.set_len(len.saturating_sub(keep))
        .expect("give back some space");
}

#[test]
#[ignore = "needs root: mounts a tmpfs for the audit log, and the daemon duplicates the fixture's sockets with pidfd_getfd"]
fn a_full_disk_loses_counted_records_acts_on_nothing_and_never_leaves_a_torn_line() {
    full_disk(false);
}

/// With `on_audit_failure: act`, the daemon goes on acting on a full disk (the records are
/// lost and counted; the journal has each action).
#[test]
#[ignore = "needs root: mounts a tmpfs for the audit log, and the daemon duplicates the fixture's sockets with pidfd_getfd"]
fn on_audit_failure_act_goes_on_acting_on_a_full_disk() {
    full_disk(true);
}

fn full_disk(act: bool) {
    let scratch = Scratch::new(if act { "full-act" } else { "full" }, 0o700);
    let disk = Tmpfs::mount(scratch.path("disk"), "64k");
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _clients = close_waits(&mut fx, 600);
    let audit = disk.0.join("audit.jsonl");
    let metrics = free_addr();
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &policy(
            &[fx.pid()],
            &format!(
                "audit_log: {}\non_audit_failure: {}\nmetrics: {{listen: \"{metrics}\"}}\nlimits: {{max_reaps_per_cycle: 10, max_reaps_per_minute: 1000000}}\n",
                audit.display(),
                if act { "act" } else { "skip" }
            ),
        )
        .replace("interval: 200ms", "interval: 100ms"),
    );
    // One page left: the first records fit, then a batch is written in part and ENOSPC.
    let filler = disk.0.join("filler");
    fill(&filler, 4096);

    let mut d = Running::spawn(&cfg, &[], &[]);
    let value = |name: &str| metric(&scrape(metrics), name);
    d.wait_until(
        "lost records counted and a torn line cut",
        Duration::from_secs(30),
        |_| {
            let text = scrape(metrics);
            metric(&text, "cwreap_audit_write_errors_total") >= 20.0
                && metric(&text, "cwreap_audit_torn_lines_total") >= 1.0
        },
    );
    // Cycles go on while the disk is full: acting on nothing without its record (the
    // default), or acting with the records lost (`on_audit_failure: act`).
    let reaped = value("cwreap_reaped_total");
    let cycle = value("cwreap_last_cycle_timestamp_seconds");
    let skipped = value("cwreap_actions_skipped_unrecorded_total");
    if act {
        d.wait_until(
            "more cycles and reaps on a full disk",
            Duration::from_secs(30),
            |_| {
                let text = scrape(metrics);
                metric(&text, "cwreap_reaped_total") >= reaped + 20.0
                    && metric(&text, "cwreap_last_cycle_timestamp_seconds") > cycle
            },
        );
        assert_eq!(value("cwreap_actions_skipped_unrecorded_total"), skipped);
    } else {
        d.wait_until(
            "more cycles, each skipping its actions for want of a record",
            Duration::from_secs(30),
            |_| {
                let text = scrape(metrics);
                metric(&text, "cwreap_actions_skipped_unrecorded_total") >= skipped + 20.0
                    && metric(&text, "cwreap_last_cycle_timestamp_seconds") > cycle
            },
        );
        assert_eq!(
            value("cwreap_reaped_total"),
            reaped,
            "no socket was touched without its intent on the disk"
        );
        assert!(
            d.lines()
                .iter()
                .any(|l| l.contains("acting on nothing that changes a socket until it can")),
            "the skip is said: {}",
            d.log()
        );
    }
    let full_errors = value("cwreap_audit_write_errors_total");
    let full_lines = audit_records(&audit).len();

    // Space comes back: records land again, each on a line of its own.
    std::fs::remove_file(&filler).expect("free the disk");
    let mut tail = Tail::new(&audit);
    let at_free = tail.poll().actions;
    d.wait_until("records written again", Duration::from_secs(30), |_| {
        tail.poll().actions >= at_free + 20
    });
    let text = scrape(metrics);
    let (status, _) = d.terminate(HANG);
    assert!(status.success(), "{status}; log:\n{}", d.log());
    let records = audit_records(&audit);
    for r in &records {
        let line = r.to_string();
        assert_eq!(
            line.matches("\"ts\":").count(),
            1,
            "two records merged: {line}"
        );
    }
    let log = d.lines();
    assert!(
        log.iter()
            .any(|l| l.contains("cannot write the audit log") && l.contains("ERROR")),
        "no error logged for the full disk:\n{}",
        fold_log(&log)
    );
    // Reported at most once a minute, however many writes failed.
    assert_eq!(
        log.iter()
            .filter(|l| l.contains("cannot write the audit log"))
            .count(),
        1,
        "{}",
        fold_log(&log)
    );
    println!(
        "full disk: {full_errors} records lost and counted while full ({full_lines} lines on disk then), {} torn lines cut; {} lines after space came back, all JSON; cwreap_reaped_total {}",
        metric(&text, "cwreap_audit_torn_lines_total"),
        records.len(),
        metric(&text, "cwreap_reaped_total"),
    );
    drop(d);
    drop(disk);
}

// ---------------------------------------------------------------------------------------
// A stuck disk.

/// An ext4 image of our own, loop-mounted. `fsfreeze` makes it a stuck disk: every write
/// waits, uninterruptibly, until the thaw. Unmounted on drop.
struct LoopFs {
    dir: PathBuf,
}

impl LoopFs {
    fn mount(image: PathBuf, dir: PathBuf) -> LoopFs {
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(16 << 20))
            .expect("disk image");
        run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        std::fs::create_dir_all(&dir).expect("mount point");
        run_ok(
            Command::new("mount")
                .args(["-o", "loop"])
                .arg(&image)
                .arg(&dir),
        );
        LoopFs { dir }
    }

    fn freeze(&self) -> Thaw<'_> {
        run_ok(Command::new("fsfreeze").arg("--freeze").arg(&self.dir));
        Thaw(self)
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// A frozen file system, thawed on drop (before anything waits for a writer on it).
struct Thaw<'a>(&'a LoopFs);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        let _ = Command::new("fsfreeze")
            .arg("--unfreeze")
            .arg(&self.0.dir)
            .status();
    }
}

#[test]
#[ignore = "needs root: loop-mounts an ext4 image and freezes it (mount, fsfreeze)"]
fn a_stuck_disk_holds_actions_back_never_cycles() {
    let scratch = Scratch::new("stuck", 0o700);
    let disk = LoopFs::mount(scratch.path("disk.img"), scratch.path("disk"));
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let audit = disk.dir.join("audit.jsonl");
    let metrics = free_addr();
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &policy(
            &[fx.pid()],
            &format!(
                "audit_log: {}\nmetrics: {{listen: \"{metrics}\"}}\n",
                audit.display()
            ),
        )
        .replace("interval: 200ms", "interval: 100ms"),
    );
    // A watchdog of 400 ms: pinged every 200 ms while cycles make progress.
    let notify = Notify::bind(scratch.path("notify"));
    let mut d = Running::spawn(
        &cfg,
        &[],
        &[
            ("NOTIFY_SOCKET", scratch.path("notify").into_os_string()),
            ("WATCHDOG_USEC", "400000".into()),
        ],
    );
    let value = |name: &str| metric(&scrape(metrics), name);
    d.wait_until("a first cycle", Duration::from_secs(10), |_| {
        value("cwreap_last_cycle_timestamp_seconds") > 0.0
    });

    // The disk gets stuck, then sockets become due: their intent records cannot reach it.
    let frozen = disk.freeze();
    let mut waiting: Vec<(TcpStream, i32)> = (0..10).map(|_| fx.close_wait(0)).collect();
    for (c, _) in &waiting {
        c.set_nonblocking(true).expect("nonblocking client");
    }
    const AUDIT_ERRORS: &str = "cwreap_cycle_errors_total{kind=\"audit\"}";
    d.wait_until("three cycles held back", Duration::from_secs(30), |_| {
        value(AUDIT_ERRORS) >= 3.0
    });
    let held = value(AUDIT_ERRORS);
    // Each held-back cycle waits 2 s for its intents; the watchdog is fed all along.
    let msgs: Vec<String> = notify.all().into_iter().map(|(_, m)| m).collect();
    let statuses: Vec<usize> = (0..msgs.len())
        .filter(|i| msgs[*i].contains("STATUS="))
        .collect();
    let pings_within: Vec<usize> = statuses
        .windows(2)
        .map(|w| {
            msgs[w[0] + 1..w[1]]
                .iter()
                .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
                .count()
        })
        .collect();
    let longest = *pings_within.iter().max().unwrap_or(&0);
    assert!(
        longest >= 3,
        "no cycle long enough fed the watchdog several times: pings between STATUS messages {pings_within:?}"
    );
    assert_eq!(
        ss_close_wait(fx.pid()).len(),
        10,
        "a socket was shut down while its intent could not be recorded; log:\n{}",
        d.log()
    );
    for (c, fd) in waiting.iter_mut() {
        assert!(
            !ended(c),
            "the peer of fd {fd} saw EOF while the disk was stuck"
        );
    }
    assert_eq!(value("cwreap_reaped_total"), 0.0);

    // Unstuck: the intents land, then the sockets are shut down.
    drop(frozen);
    d.wait_until(
        "every socket reaped after the thaw",
        Duration::from_secs(30),
        |_| ss_close_wait(fx.pid()).is_empty(),
    );
    let (status, took) = d.terminate(HANG);
    assert!(status.success(), "{status}; log:\n{}", d.log());
    let records = audit_records(&audit);
    let line_of = |event: &str, inode: u64| {
        records
            .iter()
            .position(|r| r["event"] == event && r["inode"].as_u64() == Some(inode))
    };
    let reaped: Vec<u64> = records
        .iter()
        .filter(|r| r["event"] == "action" && r["outcome"] == "reaped")
        .filter_map(|r| r["inode"].as_u64())
        .collect();
    assert_eq!(reaped.len(), 10, "{records:?}");
    for inode in &reaped {
        let (intent, action) = (line_of("intent", *inode), line_of("action", *inode));
        assert!(
            intent.is_some() && intent < action,
            "socket {inode}: intent at line {intent:?}, action at line {action:?}"
        );
    }
    for (c, fd) in waiting.iter_mut() {
        c.set_nonblocking(false).expect("blocking client");
        assert!(
            reads_eof(c, HANG),
            "the peer of fd {fd} got no EOF after the thaw"
        );
    }
    println!(
        "stuck disk: {held} cycles held back (intents unconfirmed, nothing shut down), cycles went on, up to {longest} watchdog pings inside one cycle; after the thaw 10 reaped, each after its intent record; stopped {took:?} after SIGTERM"
    );
}

// ---------------------------------------------------------------------------------------
// Rotation.

#[test]
#[ignore = "needs root: checks that the audit file is created owned by root; the daemon duplicates the fixture's sockets with pidfd_getfd"]
fn rotation_then_sighup_writes_a_new_file() {
    let scratch = Scratch::new("rotate", 0o700);
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let audit = scratch.path("audit.jsonl");
    let rotated = scratch.path("audit.jsonl.1");
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &policy(
            &[fx.pid()],
            &format!("audit_log: {}\nmetrics: {{listen: off}}\n", audit.display()),
        ),
    );
    let reaped_fds = |path: &Path| -> BTreeSet<i64> {
        if !path.exists() {
            return BTreeSet::new();
        }
        audit_records(path)
            .iter()
            .filter(|r| r["event"] == "action" && r["outcome"] == "reaped")
            .map(|r| field_i64(r, "fd"))
            .collect()
    };
    let first: Vec<(TcpStream, i32)> = (0..5).map(|_| fx.close_wait(0)).collect();
    let first_fds: BTreeSet<i64> = first.iter().map(|(_, fd)| i64::from(*fd)).collect();
    let mut d = Running::spawn(&cfg, &[], &[]);
    d.wait_until(
        "the first five reaped in the audit log",
        Duration::from_secs(10),
        |_| reaped_fds(&audit) == first_fds,
    );

    std::fs::rename(&audit, &rotated).expect("mv audit.jsonl audit.jsonl.1");
    let reloads = |r: &Running| {
        r.lines()
            .iter()
            .filter(|l| l.contains("config reloaded"))
            .count()
    };
    d.signal(Signal::HUP);
    d.wait_until("the reload", Duration::from_secs(10), |r| reloads(r) == 1);
    let second: Vec<(TcpStream, i32)> = (0..5).map(|_| fx.close_wait(0)).collect();
    let second_fds: BTreeSet<i64> = second.iter().map(|(_, fd)| i64::from(*fd)).collect();
    d.wait_until(
        "the next five reaped in a new audit.jsonl",
        Duration::from_secs(10),
        |_| reaped_fds(&audit).is_superset(&second_fds),
    );
    let (status, _) = d.terminate(HANG);
    assert!(status.success(), "{status}; log:\n{}", d.log());
    assert_eq!(
        reaped_fds(&rotated),
        first_fds,
        "the moved file has exactly the first five"
    );
    assert_eq!(
        reaped_fds(&audit),
        second_fds,
        "the new file has exactly the next five"
    );
    let meta = std::fs::metadata(&audit).expect("new audit log");
    assert_eq!(meta.mode() & 0o777, 0o600);
    assert_eq!(meta.uid(), 0);
    println!(
        "rotation: {} records in the moved file, {} in the new one",
        audit_records(&rotated).len(),
        audit_records(&audit).len()
    );
}

// ---------------------------------------------------------------------------------------
// Refusals.

pub(super) fn simple_policy(extra: &str) -> String {
    format!(
        "interval: 1s\ndry_run: true\nmetrics: {{listen: off}}\n{extra}targets:\n  - name: good\n    match: {{pid: 1}}\n    older_than: 1h\n    action: log\n"
    )
}

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo")
        .arg(path)
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "mkfifo {}", path.display());
}

#[test]
fn an_audit_log_that_is_a_symlink_is_refused_and_nothing_is_written_through_it() {
    let scratch = Scratch::new("audit-symlink", 0o700);
    let victim = scratch.path("victim");
    std::fs::write(&victim, b"precious\n").expect("victim");
    let audit = scratch.path("audit.jsonl");
    std::os::unix::fs::symlink(&victim, &audit).expect("plant the symlink");
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &simple_policy(&format!("audit_log: {}\n", audit.display())),
    );
    refused(
        "audit_log symlink",
        &cfg,
        &["audit_log", "a symlink, not a regular file"],
    );
    assert_eq!(std::fs::read(&victim).expect("victim"), b"precious\n");
}

#[test]
fn an_audit_log_that_is_a_fifo_is_refused_at_once() {
    let scratch = Scratch::new("audit-fifo", 0o700);
    let audit = scratch.path("audit.jsonl");
    mkfifo(&audit);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &simple_policy(&format!("audit_log: {}\n", audit.display())),
    );
    refused(
        "audit_log FIFO",
        &cfg,
        &["audit_log", "a FIFO, not a regular file"],
    );

    // A directory another user may change is refused too; a missing one is created.
    let open = scratch.path("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, Permissions::from_mode(0o777)).expect("chmod 777");
    write_policy(
        &cfg,
        &simple_policy(&format!(
            "audit_log: {}\n",
            open.join("audit.jsonl").display()
        )),
    );
    refused(
        "audit_log in a 0777 directory",
        &cfg,
        &["audit_log", "writable by others (mode 0777)"],
    );
    let fresh = scratch.path("fresh/logs/audit.jsonl");
    write_policy(
        &cfg,
        &simple_policy(&format!("audit_log: {}\n", fresh.display())),
    );
    let out = cwreap(&["check", "--config", &cfg.display().to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!scratch.path("fresh").exists(), "check created a directory");
}

#[test]
#[ignore = "needs root: cwreap refuses a policy in a directory others may write only when it runs as root"]
fn a_policy_in_a_world_writable_directory_is_refused() {
    let scratch = Scratch::new("open-dir", 0o755);
    let open = scratch.path("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, Permissions::from_mode(0o777)).expect("chmod 777");
    let cfg = open.join("cwreap.yaml");
    write_policy(&cfg, &simple_policy(""));
    refused(
        "policy in a 0777 directory",
        &cfg,
        &[
            &format!(
                "directory {} is writable by others (mode 0777) and not sticky",
                open.display()
            ),
            "chmod go-w",
        ],
    );
    // Sticky, like /tmp: others may add files but not swap ours.
    std::fs::set_permissions(&open, Permissions::from_mode(0o1777)).expect("chmod 1777");
    let out = cwreap(&["check", "--config", &cfg.display().to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn a_fifo_policy_is_refused_at_once_also_on_sighup() {
    let scratch = Scratch::new("fifo-policy", 0o700);
    let fifo = scratch.path("fifo.yaml");
    mkfifo(&fifo);
    refused("FIFO policy", &fifo, &["a FIFO, not a regular file"]);

    // A running daemon whose policy becomes a FIFO: SIGHUP is answered, nothing hangs.
    let cfg = scratch.path("cwreap.yaml");
    let metrics = free_addr();
    write_policy(
        &cfg,
        &simple_policy("").replace(
            "metrics: {listen: off}",
            &format!("metrics: {{listen: \"{metrics}\"}}\nlog_format: json"),
        ),
    );
    let mut d = Running::spawn(&cfg, &[], &[]);
    d.wait_until("a cycle", Duration::from_secs(10), |_| {
        metric(&scrape(metrics), "cwreap_last_cycle_timestamp_seconds") > 0.0
    });
    std::fs::rename(&fifo, &cfg).expect("the policy becomes a FIFO");
    d.signal(Signal::HUP);
    d.wait_until("the reload rejected", Duration::from_secs(10), |r| {
        r.lines()
            .iter()
            .any(|l| l.contains("config reload rejected") && l.contains("FIFO"))
    });
    let cycle = metric(&scrape(metrics), "cwreap_last_cycle_timestamp_seconds");
    d.wait_until(
        "a cycle after the rejected reload",
        Duration::from_secs(10),
        |_| metric(&scrape(metrics), "cwreap_last_cycle_timestamp_seconds") > cycle,
    );
    let (status, took) = d.terminate(HANG);
    assert!(status.success(), "{status}; log:\n{}", d.log());
    println!("FIFO policy on SIGHUP: rejected, cycles went on, stopped {took:?} after SIGTERM");
}

/// A Python swapper: creates `bad` (as whoever runs it) unless it exists, says `ready`,
/// exchanges `a` and `b` with renameat2(RENAME_EXCHANGE) until `stop` exists, then says
/// how many times.
const SWAPPER: &str = r#"
import ctypes, os, sys
a, b, stop, bad = sys.argv[1:5]
if not os.path.exists(b):
    with open(b, "w") as f:
        f.write(bad)
libc = ctypes.CDLL(None, use_errno=True)
libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
AT_FDCWD, RENAME_EXCHANGE = -100, 2
print("ready", flush=True)
n = 0
while not os.path.exists(stop):
    for _ in range(200):
        if libc.renameat2(AT_FDCWD, a.encode(), AT_FDCWD, b.encode(), RENAME_EXCHANGE) != 0:
            print("error", ctypes.get_errno(), flush=True)
            sys.exit(1)
        n += 1
print("swaps", n, flush=True)
"#;

/// Run `check` `runs` times on `cfg` while `swapper` exchanges it with a bad policy;
/// returns (accepted with the good policy, refused, swaps done). Fails on any run that
/// accepts the bad policy.
fn race(mut swapper: Command, cfg: &Path, stop: &Path, runs: usize) -> (usize, usize, u64) {
    let mut child = Killed(
        swapper
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the swapper"),
    );
    let lines = lines_of(child.0.stdout.take().expect("swapper stdout"));
    let first = lines
        .recv_timeout(Duration::from_secs(10))
        .expect("swapper started");
    assert_eq!(first, "ready", "swapper: {first}");
    let (mut good, mut refused) = (0, 0);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..runs {
        let (code, out, err, _) = run_guarded(
            Command::new(cwreap_bin())
                .arg("check")
                .arg("--config")
                .arg(cfg),
        );
        assert!(!out.contains("EVIL"), "the bad policy was accepted:\n{out}");
        match code {
            Some(0) => {
                assert!(out.contains("name: \"good\""), "{out}");
                good += 1;
            }
            Some(2) => {
                refused += 1;
                let reason = err
                    .lines()
                    .next()
                    .unwrap_or("")
                    .replace(&cfg.display().to_string(), "POLICY");
                *reasons.entry(reason).or_default() += 1;
            }
            other => panic!("check exited {other:?}: {err}"),
        }
    }
    std::fs::write(stop, b"").expect("stop the swapper");
    let swaps = lines
        .recv_timeout(Duration::from_secs(10))
        .ok()
        .and_then(|l| l.strip_prefix("swaps ").and_then(|n| n.parse().ok()))
        .unwrap_or_else(|| panic!("the swapper did not report its count"));
    let _ = child.0.wait();
    println!(
        "race over {}: {good} accepted (good), {refused} refused: {reasons:?}; {swaps} swaps",
        cfg.display()
    );
    (good, refused, swaps)
}

#[test]
#[ignore = "needs root: nobody swaps the policy while root's `cwreap check` reads it (setpriv)"]
fn swapping_the_policy_under_check_never_gets_a_bad_one_accepted() {
    assert!(
        Path::new(PYTHON).exists(),
        "{PYTHON} is needed (apt-get install python3)"
    );
    const RUNS: usize = 400;
    let evil = "interval: 1s\ndry_run: false\nmetrics: {listen: off}\ntargets:\n  - name: EVIL\n    match: {comm: .}\n    older_than: 1ms\n    action: shutdown\n";

    // The attack: a non-root user who may write the policy's directory (0777, not sticky)
    // exchanges the root-owned policy with their own, over and over.
    let scratch = Scratch::new("swap", 0o755);
    let open = scratch.path("open");
    std::fs::create_dir(&open).expect("mkdir");
    std::fs::set_permissions(&open, Permissions::from_mode(0o777)).expect("chmod 777");
    let cfg = open.join("cwreap.yaml");
    write_policy(&cfg, &simple_policy(""));
    let stop = open.join("stop");
    let mut swapper = Command::new("setpriv");
    swapper
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            PYTHON,
            "-c",
            SWAPPER,
        ])
        .arg(&cfg)
        .arg(open.join("mine.yaml"))
        .arg(&stop)
        .arg(evil);
    let (good, refused, swaps) = race(swapper, &cfg, &stop, RUNS);
    assert_eq!(
        (good, refused),
        (0, RUNS),
        "a policy in a directory others may write is refused every time"
    );
    assert!(
        swaps >= RUNS as u64,
        "the swapper was not running during the checks ({swaps} swaps)"
    );

    // The same race on the file alone (root swaps a good policy, mode 0600, with a bad
    // one, mode 0666): the file is judged and read through one fd, so what is accepted is
    // always the file that was checked.
    let private = Scratch::new("swap-fd", 0o700);
    let cfg = private.path("cwreap.yaml");
    write_policy(&cfg, &simple_policy(""));
    let bad = private.path("other.yaml");
    write_policy(&bad, evil);
    std::fs::set_permissions(&bad, Permissions::from_mode(0o666)).expect("chmod 666");
    let stop = private.path("stop");
    let mut swapper = Command::new(PYTHON);
    swapper
        .args(["-c", SWAPPER])
        .arg(&cfg)
        .arg(&bad)
        .arg(&stop)
        .arg(evil);
    let (good, refused, swaps) = race(swapper, &cfg, &stop, RUNS);
    assert_eq!(good + refused, RUNS);
    assert!(
        swaps >= RUNS as u64,
        "the swapper was not running during the checks ({swaps} swaps)"
    );
    assert!(
        good > 0 && refused > 0,
        "the race never landed on both files: {good} good, {refused} refused"
    );
}

// ---------------------------------------------------------------------------------------
// Outputs nobody reads.

/// The state of the daemon's log writer thread, for the report.
fn log_thread_state(pid: i32) -> String {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return "?".into();
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "cwreap-log" {
            let wchan = std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("?");
            return format!("state {state}, wchan {wchan:?}");
        }
    }
    "no cwreap-log thread".into()
}

#[test]
#[ignore = "needs root: a dry run still proves permission: pidfd_getfd on the fixture's sockets (CAP_SYS_PTRACE)"]
fn a_stalled_stderr_and_an_undrained_notify_socket_never_stop_cycles_or_sigterm() {
    let scratch = Scratch::new("blocked", 0o700);
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _clients = close_waits(&mut fx, 1000);
    let metrics = free_addr();
    let cfg = scratch.path("cwreap.yaml");
    // Dry run, one socket a cycle: every cycle logs an action and a rate-limit warning.
    write_policy(
        &cfg,
        &policy(
            &[fx.pid()],
            &format!("metrics: {{listen: \"{metrics}\"}}\nlimits: {{max_reaps_per_cycle: 1, max_reaps_per_minute: 1000000}}\n"),
        )
        .replace("dry_run: false", "dry_run: true")
        .replace("interval: 200ms", "interval: 100ms"),
    );
    let notify_path = scratch.path("notify");
    let _notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    // Dropped after the child (declared first): its pins stay off the host's /sys/fs/bpf.
    let bpf = PrivateBpf::new();
    let mut child = Killed(
        bpf.apply(&mut Command::new(cwreap_bin()))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("CWREAP_RUN_DIR", scratch.path("run"))
            .env("NOTIFY_SOCKET", &notify_path)
            .env("WATCHDOG_USEC", "200000")
            .env_remove("WATCHDOG_PID")
            .env_remove("RUST_LOG")
            .env_remove("JOURNAL_STREAM")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn cwreap run"),
    );
    // Never read; one page, so it fills after a few lines.
    let stalled = child.0.stderr.take().expect("stderr");
    let capacity = rustix::pipe::fcntl_setpipe_size(stalled.as_fd(), 4096).expect("F_SETPIPE_SZ");
    let pid = child.0.id() as i32;
    let guard = Instant::now() + Duration::from_secs(30);
    let mut wait = |what: &str, ok: &mut dyn FnMut() -> bool| {
        while !ok() {
            if let Ok(Some(status)) = child.0.try_wait() {
                panic!("the daemon exited ({status}) before {what}");
            }
            assert!(Instant::now() < guard, "no {what} within 30 s");
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // Stalled: the pipe holds what was written and takes nothing more for ten cycles
    // (each of which logs), while the cycles go on.
    let unread = || rustix::io::ioctl_fionread(stalled.as_fd()).unwrap_or(0);
    let (mut held, mut stalled_cycles) = (0, BTreeSet::new());
    wait("stderr stalled for ten cycles", &mut || {
        let n = unread();
        let t = metric(&scrape(metrics), "cwreap_last_cycle_timestamp_seconds");
        if n == 0 || n != held {
            held = n;
            stalled_cycles.clear();
        } else {
            stalled_cycles.insert(t.to_bits());
        }
        stalled_cycles.len() >= 10
    });
    wait("a notify message dropped", &mut || {
        metric(&scrape(metrics), "cwreap_notify_dropped_total") >= 1.0
    });
    // Ten more cycles with both outputs blocked.
    let mut seen = BTreeSet::new();
    wait("ten cycles with both outputs blocked", &mut || {
        let t = metric(&scrape(metrics), "cwreap_last_cycle_timestamp_seconds");
        seen.insert(t.to_bits());
        seen.len() > 10
    });
    let text = scrape(metrics);
    let writer = log_thread_state(pid);
    let sent = Instant::now();
    rustix::process::kill_process(Pid::from_raw(pid).expect("pid"), Signal::TERM).expect("SIGTERM");
    let status = loop {
        if let Ok(Some(status)) = child.0.try_wait() {
            break status;
        }
        assert!(
            sent.elapsed() < HANG,
            "still running {HANG:?} after SIGTERM (log writer: {writer})"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let took = sent.elapsed();
    assert_eq!(status.code(), Some(0), "{status}");
    println!(
        "blocked outputs: stderr pipe of {capacity} bytes holding {held} unread and taking nothing for {} cycles (log writer {writer}); {} log lines dropped, {} notify messages dropped, {} more cycles seen with both blocked; exit {status} {took:?} after SIGTERM",
        stalled_cycles.len(),
        metric(&text, "cwreap_log_lines_dropped_total"),
        metric(&text, "cwreap_notify_dropped_total"),
        seen.len(),
    );
    drop(stalled);
}
