//! Children that speak one line per event on stdout and take commands on stdin (the
//! fixture, the benchmark's fleet, servers in other runtimes), and children killed on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::fold;

/// Lines a child prints on `reader`, delivered by a background thread.
pub fn lines_of(reader: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// A child killed (and reaped) on drop, also when the test fails.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A child with its stdout read line by line and its stdin open for commands; killed on
/// drop.
pub struct LineChild {
    /// What failure messages call it.
    pub name: String,
    pub child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    /// Every line read so far, in order.
    pub history: Vec<String>,
}

impl LineChild {
    /// Spawn `cmd` with stdin and stdout piped (stderr as `cmd` says, inherited by default).
    pub fn spawn(name: impl Into<String>, cmd: &mut Command) -> std::io::Result<LineChild> {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        let stdin = child.stdin.take();
        let lines = lines_of(child.stdout.take().expect("a piped stdout"));
        Ok(LineChild {
            name: name.into(),
            child,
            stdin,
            lines,
            history: Vec::new(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Send one command line.
    pub fn send(&mut self, line: &str) -> std::io::Result<()> {
        self.write_stdin(format!("{line}\n").as_bytes())
    }

    /// Write raw bytes to the child's stdin.
    pub fn write_stdin(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin was closed")
        })?;
        stdin.write_all(bytes)?;
        stdin.flush()
    }

    /// Close the child's stdin (EOF on its side).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// The next line, if one comes within `wait`.
    pub fn next_line(&mut self, wait: Duration) -> Result<String, RecvTimeoutError> {
        let line = self.lines.recv_timeout(wait)?;
        self.history.push(line.clone());
        Ok(line)
    }

    /// The rest of the next line starting with `prefix`, skipping others, within `wait`. An
    /// `error ...` line, the child's exit or the end of `wait` is an error that says so.
    pub fn expect(&mut self, prefix: &str, wait: Duration) -> Result<String, String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(prefix) {
                        return Ok(rest.trim().to_owned());
                    }
                    if line.starts_with("error") {
                        return Err(format!("{}: {line}", self.name));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!("{}: no `{prefix}` within {wait:?}", self.name));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.try_wait().ok().flatten();
                    return Err(format!(
                        "{}: exited before `{prefix}` ({status:?}); it said:\n{}",
                        self.name,
                        self.transcript()
                    ));
                }
            }
        }
    }

    /// The rest of the next line starting with `prefix` within `wait`, skipping others;
    /// None if none came.
    pub fn maybe_line(&mut self, prefix: &str, wait: Duration) -> Option<String> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.next_line(left).ok()?;
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.trim().to_owned());
            }
        }
    }

    /// Every line printed so far, without waiting.
    pub fn drain(&mut self) -> &[String] {
        while let Ok(line) = self.lines.try_recv() {
            self.history.push(line);
        }
        &self.history
    }

    /// What the child said, folded and cut for a failure message.
    pub fn transcript(&self) -> String {
        fold::fold_log(&self.history)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LineChild {
    fn drop(&mut self) {
        self.kill();
    }
}
