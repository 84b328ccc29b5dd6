//! `cwreap scan` on a terminal and into a pipe. `--watch` under a real pseudo-terminal
//! (tmux) draws the per-process view and follows changes between refreshes; into a pipe it
//! writes no terminal escapes. A plain `scan` on a small terminal (script(1)) keeps to one
//! screen and says what to run next; into a pipe it lists every socket, as scripts expect.

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

#[test]
fn watch_into_a_pipe_writes_no_terminal_escapes() {
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _a = fx.close_wait(0);
    let pid = fx.pid();
    let child = Command::new(cwreap_bin())
        .args(["scan", "--watch", "100ms", "--pid", &pid.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("cwreap scan --watch");
    let mut child = Killed(child);
    let stdout = child.0.stdout.take().expect("stdout");
    let lines = lines_of(stdout);
    // Three refreshes, each with its title line and the fixture's row.
    let mut seen = Vec::new();
    let refreshes = |seen: &[String]| {
        seen.iter()
            .filter(|l| l.starts_with("cwreap scan --watch 100ms"))
            .count()
    };
    while refreshes(&seen) < 3 {
        match lines.recv_timeout(HANG_GUARD) {
            Ok(l) => seen.push(l),
            Err(e) => panic!("{e}: only {seen:?}"),
        }
    }
    let text = seen.join("\n");
    assert!(
        !text.contains('\x1b'),
        "a terminal escape in a pipe:\n{text:?}"
    );
    let rows = seen.iter().filter(|l| line_of(l, pid).is_some()).count();
    assert!(rows >= 2, "the fixture's row in each refresh:\n{text}");
}

/// The lines of a socket table (STATE is its eighth column) in `text`.
fn socket_rows(text: &str) -> usize {
    text.lines()
        .filter(|l| l.split_whitespace().nth(7) == Some("CLOSE_WAIT"))
        .count()
}

#[test]
fn scan_on_a_small_terminal_keeps_to_one_screen_and_a_pipe_gets_every_socket() {
    if !have_script() {
        skip_or_fail(
            "scan_on_a_small_terminal_keeps_to_one_screen_and_a_pipe_gets_every_socket",
            "script(1) is not installed (apt-get install bsdutils)",
        );
        return;
    }
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _clients = close_waits(&mut fx, 30);
    let pid = fx.pid();
    let port = fx.listen[0].port().to_string();
    let (rows, cols) = (20, 120);

    // A pipe: every socket, the summary and the totals, no header, no escapes.
    let piped = cwreap(&["scan", "--port", &port]);
    assert_eq!(piped.status.code(), Some(0), "{}", stderr(&piped));
    let piped = String::from_utf8_lossy(&piped.stdout).into_owned();
    assert_eq!(socket_rows(&piped), 30, "{piped}");
    assert!(piped.trim_start().starts_with("PID  FD  COMM"), "{piped}");
    assert!(piped.contains("30 CLOSE_WAIT socket(s). AGE is"), "{piped}");
    assert!(!piped.contains("cwreap explain"), "{piped}");
    assert!(!piped.contains('\x1b'), "{piped:?}");

    // A terminal of 20 rows: the per-process view, in colour as a terminal gets it.
    let screen = on_terminal(rows, cols, cwreap_bin(), &["scan", "--port", &port], &[]);
    assert_eq!(screen.code, Some(0), "{}", screen.text);
    let plain = strip_escapes(&screen.text);
    let lines: Vec<&str> = plain.lines().collect();
    // One screen, the prompt's row left: the rows the lines take, a long one wrapping
    // (notes on stderr, such as a stale daemon's, share the terminal); scan's own lines
    // are never wider than the terminal.
    let used = screen_rows(&lines, cols);
    assert!(used < usize::from(rows), "{used} rows:\n{plain}");
    assert!(
        lines
            .iter()
            .filter(|l| !is_note(l))
            .all(|l| l.chars().count() <= usize::from(cols)),
        "{plain}"
    );
    assert!(
        screen.text.contains("\x1b[1m"),
        "a terminal gets colour: {:?}",
        screen.text
    );
    // Notes on stderr (a stale daemon's pins, say) share the terminal; then the header.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("CLOSE_WAIT") && l.contains("never called close()")),
        "{plain}"
    );
    assert_eq!(socket_rows(&plain), 0, "{plain}");
    let row = line_of(&plain, pid).unwrap_or_else(|| panic!("no row for {pid}:\n{plain}"));
    let cols_of_row: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols_of_row.get(1..3),
        Some(&["cwreap-fixture", "30"][..]),
        "{row}"
    );
    assert!(
        plain.contains(&format!(
            "cwreap scan --sockets (all 30), or cwreap scan --pid {pid}"
        )),
        "{plain}"
    );
    assert!(
        plain.contains(&format!("cwreap explain --pid {pid} ")),
        "{plain}"
    );
    assert!(
        plain.contains(&format!(
            "cwreap reap --pid {pid} --older-than 10m --dry-run "
        )),
        "{plain}"
    );

    // --sockets on the same terminal: every socket, between the header and the next steps.
    let all = on_terminal(
        rows,
        cols,
        cwreap_bin(),
        &["scan", "--port", &port, "--sockets"],
        &[("NO_COLOR", "1")],
    );
    assert_eq!(all.code, Some(0), "{}", all.text);
    assert!(!all.text.contains('\x1b'), "NO_COLOR: {:?}", all.text);
    assert_eq!(socket_rows(&all.text), 30, "{}", all.text);
    assert!(
        all.text.contains(&format!("cwreap explain --pid {pid} ")),
        "{}",
        all.text
    );
}

/// The rows `lines` take on a terminal `cols` wide.
pub fn screen_rows(lines: &[&str], cols: u16) -> usize {
    lines
        .iter()
        .map(|l| l.chars().count().div_ceil(usize::from(cols)).max(1))
        .sum()
}

/// A line cwreap writes to stderr.
pub fn is_note(line: &str) -> bool {
    line.starts_with("note: ") || line.starts_with("warning: ")
}

/// `text` without its SGR escapes (colours, bold).
pub fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
