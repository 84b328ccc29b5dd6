//! `cwreap scan --watch` under a real pseudo-terminal (tmux): it draws the per-process view
//! and follows changes between refreshes.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

struct Tmux(String);

impl Tmux {
    fn start(cmd: &str) -> Tmux {
        let name = format!("cwreap-watch-{}", std::process::id());
        run_ok(Command::new("tmux").args([
            "new-session",
            "-d",
            "-s",
            &name,
            "-x",
            "160",
            "-y",
            "40",
            cmd,
        ]));
        Tmux(name)
    }

    fn screen(&self) -> String {
        let out = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &self.0])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Wait until the screen satisfies `pred`; the last screen either way.
    fn until(&self, wait: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + wait;
        loop {
            let s = self.screen();
            if pred(&s) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .args(["kill-session", "-t", &self.0])
            .output();
    }
}

fn line_of(screen: &str, pid: i32) -> Option<&str> {
    screen
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{pid} ")))
}

#[test]
fn watch_draws_and_follows_changes() {
    if Command::new("tmux").arg("-V").output().is_err() {
        skip_or_fail(
            "watch_draws_and_follows_changes",
            "tmux is not installed (apt-get install tmux)",
        );
        return;
    }
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _a = fx.close_wait(0);
    let pid = fx.pid();
    let tmux = Tmux::start(&format!(
        "{} scan --watch 300ms --pid {pid}",
        cwreap_bin().display()
    ));

    let screen = tmux.until(Duration::from_secs(10), |s| line_of(s, pid).is_some());
    assert!(screen.contains("cwreap scan --watch 300ms"), "{screen}");
    assert!(
        screen.contains("CLOSE_WAIT") && screen.contains("FDS/LIMIT"),
        "{screen}"
    );
    let line = line_of(&screen, pid).unwrap_or_else(|| panic!("no row for {pid}:\n{screen}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols.get(1), Some(&"cwreap-fixture"), "{line}");
    assert_eq!(cols.get(2), Some(&"1"), "one CLOSE_WAIT: {line}");

    // Two more leak: the next refreshes show 3, with the change (+2) in the Δ column.
    let _b = fx.close_wait(0);
    let _c = fx.close_wait(0);
    let screen = tmux.until(Duration::from_secs(10), |s| {
        line_of(s, pid).is_some_and(|l| l.split_whitespace().nth(2) == Some("3"))
    });
    let line = line_of(&screen, pid).unwrap_or_else(|| panic!("no row:\n{screen}"));
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols.get(2), Some(&"3"), "{screen}");
    assert!(
        matches!(cols.get(3), Some(&"+2") | Some(&"=")),
        "delta column: {line}"
    );
    // The screen is redrawn, not appended to: one header only.
    assert_eq!(screen.matches("cwreap scan --watch").count(), 1, "{screen}");
}
