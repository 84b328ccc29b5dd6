//! Driving the injection helper's test seams (see `cwreap_linux::inject`, module `seam`):
//! pause it at a step to look at the stopped target or to SIGKILL it there, and read the
//! log of the steps it reached. The helper is cwreap itself (`cwreap inject-helper`),
//! built with the `testing` feature for the tests.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use std::os::fd::AsFd;

use cwreap_linux::inject::{Helper, Victim};
use cwreap_linux::sys;

use crate::programs::{cwreap_bin, target_tmpdir};

/// The helper as the tests start it.
pub fn helper() -> Helper {
    Helper {
        exe: cwreap_bin().into(),
        args: vec!["inject-helper".into()],
    }
}

/// Fd `fd` of `pid` named as attribution names it for an injection: the socket inode from
/// /proc, the cookie through a duplicate (pidfd_getfd).
pub fn victim(pid: i32, fd: i32) -> Victim {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).expect("fd link");
    let inode =
        cwreap_linux::procfs::parse_socket_link(&link.to_string_lossy()).expect("fd is a socket");
    let pidfd = sys::pidfd_open(pid).expect("pidfd_open");
    let dup = sys::pidfd_getfd(pidfd.as_fd(), fd).expect("pidfd_getfd");
    let cookie = sys::socket_cookie(dup.as_fd()).expect("SO_COOKIE");
    Victim { fd, inode, cookie }
}

/// A fresh, empty directory for one injection's handshake and log; removed on drop.
pub struct SeamDir {
    pub dir: PathBuf,
}

impl SeamDir {
    pub fn new(tag: &str) -> SeamDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = target_tmpdir().join(format!(
            "inject-seams/{}-{tag}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the seam directory");
        SeamDir { dir }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("log")
    }

    /// Environment for a helper that logs its steps here and, with `pause`, stops at that
    /// step (`STEP` or `STEP:N`) until [`SeamDir::release`].
    pub fn env(&self, pause: Option<&str>) -> Vec<(String, String)> {
        let mut env = vec![
            (
                "CWREAP_INJECT_TEST_LOG".to_string(),
                self.log_path().to_string_lossy().into_owned(),
            ),
            (
                "CWREAP_INJECT_TEST_DIR".to_string(),
                self.dir.to_string_lossy().into_owned(),
            ),
        ];
        if let Some(step) = pause {
            env.push(("CWREAP_INJECT_TEST_PAUSE".into(), step.into()));
        }
        env
    }

    /// The helper's pid once it is paused, or None if `done()` turns true first or after
    /// `guard` (a hang guard only).
    pub fn wait_paused(&self, guard: Duration, mut done: impl FnMut() -> bool) -> Option<i32> {
        let deadline = Instant::now() + guard;
        loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.join("paused")) {
                return text.split_whitespace().next().and_then(|p| p.parse().ok());
            }
            if done() || Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Let a paused helper go on.
    pub fn release(&self) {
        std::fs::write(self.dir.join("go"), b"").expect("write the go file");
    }

    /// (step, monotonic ns, helper pid) of every step the helper logged so far.
    pub fn steps(&self) -> Vec<(String, i128, i32)> {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                Some((
                    w.next()?.to_string(),
                    w.next()?.parse().ok()?,
                    w.next()?.parse().ok()?,
                ))
            })
            .collect()
    }
}

impl Drop for SeamDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// As `env` pairs for `close_in_target_with_env`.
pub fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Now on CLOCK_MONOTONIC, in ns: comparable with the helper's log.
pub fn monotonic_ns() -> i128 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    i128::from(t.tv_sec) * 1_000_000_000 + i128::from(t.tv_nsec)
}
