//! Native journald logging against a real journal socket. The daemon runs in a mount
//! namespace of its own where /run/systemd/journal is this test's directory, whose
//! `socket` is a Unix datagram socket the test bound and reads; its stderr is a file whose
//! device and inode `JOURNAL_STREAM` names, as systemd sets them. The test parses the
//! native protocol (`KEY=value` lines, the binary length-prefixed form, and takes an entry
//! too large for a datagram, which comes as a memfd with SCM_RIGHTS, though the daemon's
//! entries here are small) and filters entries as
//! `journalctl CWREAP_TARGET=<target> OUTCOME=reaped` would: two targets, real CLOSE_WAIT
//! sockets, and each filter selects exactly the sockets reaped in that target.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};

use crate::support::*;

type Entry = BTreeMap<String, String>;

/// One native-protocol payload: `KEY=value\n`, or `KEY\n` + 64-bit little-endian length +
/// value + `\n`. None when malformed.
fn parse(mut p: &[u8]) -> Option<Entry> {
    let mut e = Entry::new();
    while !p.is_empty() {
        let nl = p.iter().position(|&b| b == b'\n')?;
        let line = &p[..nl];
        if let Some(eq) = line.iter().position(|&b| b == b'=') {
            e.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            p = &p[nl + 1..];
        } else {
            let key = String::from_utf8_lossy(line).into_owned();
            let rest = &p[nl + 1..];
            let len = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?) as usize;
            let value = rest.get(8..8 + len)?;
            if rest.get(8 + len) != Some(&b'\n') {
                return None;
            }
            e.insert(key, String::from_utf8_lossy(value).into_owned());
            p = &rest[9 + len..];
        }
    }
    Some(e)
}

/// The journal's end: a thread receives every datagram (or memfd) and keeps the entries.
struct Journal {
    entries: Arc<Mutex<Vec<Entry>>>,
    malformed: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Journal {
    fn bind(path: &std::path::Path) -> Journal {
        let sock = UnixDatagram::bind(path).expect("bind the journal socket");
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let entries = Arc::new(Mutex::new(Vec::new()));
        let malformed = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (e, m, s) = (entries.clone(), malformed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            while !s.load(Ordering::Relaxed) {
                let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
                let mut cmsg = RecvAncillaryBuffer::new(&mut space);
                let Ok(got) = recvmsg(
                    &sock,
                    &mut [IoSliceMut::new(&mut buf)],
                    &mut cmsg,
                    RecvFlags::CMSG_CLOEXEC,
                ) else {
                    continue;
                };
                let mut payloads = Vec::new();
                if got.bytes > 0 {
                    payloads.push(buf[..got.bytes].to_vec());
                }
                for msg in cmsg.drain() {
                    if let RecvAncillaryMessage::ScmRights(fds) = msg {
                        for fd in fds {
                            let mut data = Vec::new();
                            File::from(fd)
                                .read_to_end(&mut data)
                                .expect("read the memfd");
                            payloads.push(data);
                        }
                    }
                }
                for p in payloads {
                    if p.is_empty() {
                        continue; // tracing-journald's probe
                    }
                    match parse(&p) {
                        Some(entry) => e.lock().expect("entries").push(entry),
                        None => m.lock().expect("malformed").push(p),
                    }
                }
            }
        });
        Journal {
            entries,
            malformed,
            stop,
            thread: Some(thread),
        }
    }

    fn entries(&self) -> Vec<Entry> {
        self.entries.lock().expect("entries").clone()
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `journalctl FIELD=value ...`: the entries with every field given.
fn select<'a>(entries: &'a [Entry], filter: &[(&str, &str)]) -> Vec<&'a Entry> {
    entries
        .iter()
        .filter(|e| {
            filter
                .iter()
                .all(|(k, v)| e.get(*k).is_some_and(|x| x == v))
        })
        .collect()
}

/// (PID, FD) of the entries.
fn pid_fds(entries: &[&Entry]) -> BTreeSet<(i32, i32)> {
    entries
        .iter()
        .map(|e| {
            let n = |k: &str| -> i32 {
                e.get(k)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("no {k} in {e:?}"))
            };
            (n("PID"), n("FD"))
        })
        .collect()
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
#[ignore = "needs root: a mount namespace puts the test's socket at /run/systemd/journal/socket, and the daemon duplicates the fixtures' sockets (CAP_SYS_PTRACE)"]
fn journal_entries_filter_by_policy_target_and_outcome() {
    let scratch = Scratch::new("journald", 0o700);
    let jdir = scratch.path("journal");
    std::fs::create_dir(&jdir).expect("mkdir");
    let journal = Journal::bind(&jdir.join("socket"));

    let mut fx_a = Fixture::start(&["127.0.0.1:0"], &[]);
    let mut fx_b = Fixture::start(&["127.0.0.1:0"], &[]);
    let mut a: Vec<_> = (0..2).map(|_| fx_a.close_wait(0)).collect();
    let mut b: Vec<_> = (0..3).map(|_| fx_b.close_wait(0)).collect();
    let want_a: BTreeSet<(i32, i32)> = a.iter().map(|(_, fd)| (fx_a.pid(), *fd)).collect();
    let want_b: BTreeSet<(i32, i32)> = b.iter().map(|(_, fd)| (fx_b.pid(), *fd)).collect();

    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &format!(
            "interval: 300ms\ndry_run: false\ndiscovery: poll\nmetrics: {{listen: off}}\ntargets:\n  - {{name: alpha, match: {{pid: {}}}, older_than: 1s, action: shutdown}}\n  - {{name: beta, match: {{pid: {}}}, older_than: 1s, action: shutdown}}\n",
            fx_a.pid(),
            fx_b.pid()
        ),
    );
    let stderr_path = scratch.path("stderr");
    let stderr = File::create(&stderr_path).expect("stderr file");
    let meta = stderr.metadata().expect("stat");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "set -e; if [ -d /run/systemd ]; then m=/run/systemd; else m=/run; fi; \
             mount -t tmpfs cwreap-test \"$m\"; mkdir -p /run/systemd/journal; \
             mount --bind \"$1\" /run/systemd/journal; exec \"$2\" run --config \"$3\"",
        )
        .arg("sh")
        .arg(&jdir)
        .arg(cwreap_bin())
        .arg(&cfg);
    Running::prepare(&mut cmd);
    cmd.stderr(Stdio::from(stderr))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    let mut daemon = Killed(cmd.spawn().expect("spawn unshare … cwreap run"));
    let log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let e = journal.entries();
        let reaped = select(&e, &[("OUTCOME", "reaped")]).len();
        if reaped >= want_a.len() + want_b.len() {
            break;
        }
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!(
                "cwreap run exited ({status}); stderr:\n{}\njournal: {e:?}",
                log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{reaped} reaped entries after 60 s; stderr:\n{}\njournal: {e:?}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.0.id() as i32).expect("pid"),
        rustix::process::Signal::TERM,
    );
    let _ = daemon.0.wait();
    let entries = journal.entries();
    assert!(
        journal.malformed.lock().expect("malformed").is_empty(),
        "payloads that are not the native protocol"
    );

    // The filters select exactly the sockets reaped in each target.
    let got_a = pid_fds(&select(
        &entries,
        &[("CWREAP_TARGET", "alpha"), ("OUTCOME", "reaped")],
    ));
    let got_b = pid_fds(&select(
        &entries,
        &[("CWREAP_TARGET", "beta"), ("OUTCOME", "reaped")],
    ));
    assert_eq!(got_a, want_a, "CWREAP_TARGET=alpha OUTCOME=reaped");
    assert_eq!(got_b, want_b, "CWREAP_TARGET=beta OUTCOME=reaped");
    for (c, _) in a.iter_mut().chain(b.iter_mut()) {
        assert!(reads_eof(c, Duration::from_secs(5)), "a peer saw no EOF");
    }

    // Fields as documented: the message, the priority, the module path in TARGET (never
    // the policy target), cwreap's identifier; the action's own fields in upper case.
    let started = select(&entries, &[("MESSAGE", "cwreap started")]);
    assert_eq!(started.len(), 1, "{entries:?}");
    assert_eq!(started[0].get("DRY_RUN").map(String::as_str), Some("false"));
    assert_eq!(started[0].get("TARGETS").map(String::as_str), Some("2"));
    for e in &entries {
        assert_eq!(
            e.get("SYSLOG_IDENTIFIER").map(String::as_str),
            Some("cwreap"),
            "{e:?}"
        );
        assert!(
            e.contains_key("MESSAGE") && e.contains_key("PRIORITY"),
            "{e:?}"
        );
        let target = e.get("TARGET").map(String::as_str).unwrap_or("");
        assert!(
            target.starts_with("cwreap"),
            "TARGET is the module path: {e:?}"
        );
        assert!(e.contains_key("CODE_LINE"), "{e:?}");
    }
    let one = select(
        &entries,
        &[("CWREAP_TARGET", "alpha"), ("OUTCOME", "reaped")],
    )[0];
    assert_eq!(one.get("ACTION").map(String::as_str), Some("shutdown"));
    assert_eq!(
        one.get("MESSAGE").map(String::as_str),
        Some("close_wait action")
    );
    assert_eq!(
        one.get("PRIORITY").map(String::as_str),
        Some("5"),
        "info is notice"
    );
    // Everything went to the journal, nothing to stderr.
    assert_eq!(log(), "", "stderr");
}

#[test]
#[ignore = "needs root: a mount namespace hides the host's /run/systemd/journal"]
fn without_a_journal_socket_the_daemon_logs_text_lines_to_stderr() {
    let scratch = Scratch::new("journald-none", 0o700);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        "interval: 300ms\ndry_run: true\ndiscovery: poll\nmetrics: {listen: off}\ntargets:\n  - {name: alpha, match: {comm: '^no-such-process$'}, older_than: 1m}\n",
    );
    let stderr_path = scratch.path("stderr");
    let stderr = File::create(&stderr_path).expect("stderr file");
    let meta = stderr.metadata().expect("stat");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(
            "set -e; if [ -d /run/systemd ]; then m=/run/systemd; else m=/run; fi; \
             mount -t tmpfs cwreap-test \"$m\"; exec \"$1\" run --config \"$2\"",
        )
        .arg("sh")
        .arg(cwreap_bin())
        .arg(&cfg);
    Running::prepare(&mut cmd);
    cmd.stderr(Stdio::from(stderr))
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
    let mut daemon = Killed(cmd.spawn().expect("spawn unshare … cwreap run"));
    let log = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !log().contains("cwreap started") {
        if let Ok(Some(status)) = daemon.0.try_wait() {
            panic!("cwreap run exited ({status}); stderr:\n{}", log());
        }
        assert!(Instant::now() < deadline, "no start-up line:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = log();
    let line = text
        .lines()
        .find(|l| l.contains("cwreap started"))
        .expect("the start-up line");
    // A text line, without a timestamp (journald stamps lines itself).
    assert!(line.trim_start().starts_with("INFO"), "{line}");
    assert!(line.contains("targets=1"), "{line}");
}
