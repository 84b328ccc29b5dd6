//! Capturing a program blocked in read(0): its registers (ptrace) and stack copy
//! (/proc/PID/mem), and what binutils says of its addresses.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use cwreap_linux::stacks::{self, Frame, Symbolizer, UserRegs, is_library_frame};
use cwreap_linux::sys::ptrace;

const DEADLINE: Duration = Duration::from_secs(60);

/// The most stack copied, as the BPF capture copies at most.
const STACK_COPY: u64 = 30 * 1024;

pub fn which(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed (.ci/run installs it)"))
}

/// This test process's build directory; those of test processes that are gone are removed.
pub fn dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("stacks");
    static CLEAN: std::sync::Once = std::sync::Once::new();
    CLEAN.call_once(|| {
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name();
            let pid = name.to_str().and_then(|n| n.parse::<u32>().ok());
            if pid.is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    });
    let d = root.join(std::process::id().to_string());
    std::fs::create_dir_all(&d).expect("create the build directory");
    d
}

pub fn run(what: &str, cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output();
    let out = out.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A program blocked in read(0) on a pipe: its thread, registers and stack copy.
pub struct Blocked {
    child: Child,
    _stdin: ChildStdin,
    pub pid: u32,
    pub regs: UserRegs,
    pub stack: Vec<u8>,
}

impl Drop for Blocked {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn spawn_blocked(cmd: &mut Command) -> Blocked {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let stdin = child.stdin.take().expect("piped stdin");
    let pid = child.id();
    let end = Instant::now() + DEADLINE;
    let (tid, sp, pc) = loop {
        if let Some(found) = thread_in_read(pid) {
            break found;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{cmd:?} exited ({status}) before blocking in read");
        }
        assert!(
            Instant::now() < end,
            "{cmd:?}: no thread blocked in read(0) within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let regs = stopped_regs(tid);
    assert_eq!(
        regs.sp, sp,
        "ptrace and /proc/PID/task/TID/syscall agree on sp"
    );
    assert!(
        regs.ip == pc || regs.ip + 2 == pc,
        "ip {:#x}, syscall pc {pc:#x}",
        regs.ip
    );
    let regs = UserRegs { ip: pc, ..regs };
    let stack = copy_stack(pid, sp);
    Blocked {
        child,
        _stdin: stdin,
        pid,
        regs,
        stack,
    }
}

/// The registers of `tid` (blocked in read): seized, interrupted, read, and let go again
/// (the read restarts).
pub fn stopped_regs(tid: i32) -> UserRegs {
    ptrace::seize(tid).expect("PTRACE_SEIZE");
    ptrace::interrupt(tid).expect("PTRACE_INTERRUPT");
    let end = Instant::now() + DEADLINE;
    loop {
        match ptrace::wait_nohang(tid).expect("waitpid") {
            Some(ptrace::Wait::Stopped { .. }) => break,
            Some(ptrace::Wait::Exited) => panic!("thread {tid} exited"),
            None => {}
        }
        assert!(
            Instant::now() < end,
            "thread {tid} did not stop within {DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let regs = stacks::stopped_thread_regs(tid).expect("PTRACE_GETREGS");
    ptrace::detach(tid, 0).expect("PTRACE_DETACH");
    regs
}

/// (tid, sp, pc) of a thread of `pid` blocked in read(0, ...), from
/// /proc/PID/task/TID/syscall: `NR ARG0..ARG5 SP PC`, NR 0 being read on x86_64.
pub fn thread_in_read(pid: u32) -> Option<(i32, u64, u64)> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let Ok(text) = std::fs::read_to_string(task.path().join("syscall")) else {
            continue;
        };
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() == 9 && f[0] == "0" && f[1] == "0x0" {
            let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
            let tid = task.file_name().to_str()?.parse().ok()?;
            return Some((tid, hex(f[7])?, hex(f[8])?));
        }
    }
    None
}

/// (start, end, offset, path) of each line of /proc/PID/maps.
pub fn maps(pid: u32) -> Vec<(u64, u64, u64, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (s, e) = f.first()?.split_once('-')?;
            let hex = |x: &str| u64::from_str_radix(x, 16).ok();
            let path = f.get(5).map(|p| p.to_string()).unwrap_or_default();
            Some((hex(s)?, hex(e)?, hex(f.get(2)?)?, path))
        })
        .collect()
}

/// The stack from `sp` to the end of its mapping, at most [`STACK_COPY`] bytes.
pub fn copy_stack(pid: u32, sp: u64) -> Vec<u8> {
    let m = maps(pid);
    let (_, end, _, _) = m
        .iter()
        .find(|(s, e, _, _)| *s <= sp && sp < *e)
        .unwrap_or_else(|| panic!("sp {sp:#x} is in no mapping"));
    let mut buf = vec![0u8; (end - sp).min(STACK_COPY) as usize];
    let mem = File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let n = mem.read_at(&mut buf, sp).expect("read the stack");
    buf.truncate(n);
    buf
}

/// binutils' answer for `addr` (a return address) of `pid`: readelf's load segments turn
/// it into the file's address, and `addr2line -f -i -C` names the frames there, innermost
/// first, as (function, file name, line).
pub fn addr2line(pid: u32, bin: &Path, addr: u64) -> Vec<(String, Option<(String, u32)>)> {
    let probe = addr - 1;
    let m = maps(pid);
    let (start, _, offset, _) = m
        .iter()
        .find(|(s, e, _, _)| *s <= probe && probe < *e)
        .expect("address mapped");
    let file_off = probe - start + offset;
    let segs = run(
        "readelf -lW",
        Command::new(which("readelf")).arg("-lW").arg(bin),
    );
    let hex = |x: &str| u64::from_str_radix(x.trim_start_matches("0x"), 16).expect("hex");
    let svma = segs
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD "))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| hex(f[1]) <= file_off && file_off < hex(f[1]) + hex(f[4]))
        .map(|f| file_off - hex(f[1]) + hex(f[2]))
        .expect("a LOAD segment holds the address");
    let out = run(
        "addr2line",
        Command::new(which("addr2line"))
            .args(["-f", "-i", "-C", "-e"])
            .arg(bin)
            .arg(format!("{svma:#x}")),
    );
    let lines: Vec<&str> = out.lines().collect();
    lines
        .chunks(2)
        .map(|c| {
            let place = c.get(1).and_then(|p| {
                let p = p.split(" (discriminator").next()?;
                let (file, line) = p.rsplit_once(':')?;
                let name = file.rsplit('/').next()?.to_string();
                Some((name, line.parse().ok()?))
            });
            (c[0].to_string(), place)
        })
        .collect()
}

pub fn show(stack: &[Vec<Frame>]) -> String {
    let mut s = String::new();
    for (i, frames) in stack.iter().enumerate() {
        for f in frames {
            s += &format!(
                "#{i:<3} {:#x} {} ({}:{}) [{}]{}{}\n",
                f.addr,
                f.function.as_deref().unwrap_or("??"),
                f.file.as_deref().unwrap_or("?"),
                f.line.map(|l| l.to_string()).unwrap_or_default(),
                f.module,
                if f.inlined { " inlined" } else { "" },
                if is_library_frame(f) {
                    " (library)"
                } else {
                    ""
                },
            );
        }
    }
    s
}

pub fn base(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Unwind and symbolize; the stack is printed for the log.
pub fn unwind_and_symbolize(b: &Blocked) -> Vec<Vec<Frame>> {
    let addrs = stacks::unwind_cfi(b.pid, &b.regs, &b.stack).expect("unwind");
    let syms = Symbolizer::new().symbolize(b.pid, &addrs);
    eprintln!(
        "{} bytes of stack, {} frames:\n{}",
        b.stack.len(),
        addrs.len(),
        show(&syms)
    );
    assert_eq!(syms.len(), addrs.len());
    syms
}
