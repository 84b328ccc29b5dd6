//! The embedded object, the checks made before loading it, and the reasons it may not load.

use std::io;
use std::path::{Path, PathBuf};

use aya::Btf;
use rustix::thread::CapabilitySet;

/// linux/bpf/cwreap.bpf.o, built by `make bpf` and checked in, so building the crate never
/// needs clang. Aligned because aya reads the ELF in place.
pub(crate) static OBJECT: &[u8] = aya::include_bytes_aligned!("../../bpf/cwreap.bpf.o");

/// Map and global names in the object (linux/bpf/cwreap.bpf.c).
pub(crate) const MAP_ENTERED: &str = "cw_entered";
pub(crate) const MAP_EVENTS: &str = "cw_events";
pub(crate) const MAP_LOST: &str = "cw_lost";
pub(crate) const MAP_DAEMON: &str = "cw_daemon";
pub(crate) const GLOBAL_NETNS: &str = "cw_netns_filter";
pub(crate) const GLOBAL_ALL_DESTROYS: &str = "cw_all_destroys";

/// Where the kernel publishes its own BTF, which CO-RE relocates against.
pub const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// The oldest kernel whose BTF tracepoints may call `bpf_get_socket_cookie` on a socket.
pub const MIN_KERNEL: (u32, u32) = (5, 12);

/// Why the BPF programs are not available here. Each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The kernel predates what the programs need.
    #[error(
        "kernel {release} is too old for BPF socket events: they need Linux {}.{} or later (socket cookies in BTF tracepoints)",
        MIN_KERNEL.0,
        MIN_KERNEL.1
    )]
    KernelTooOld {
        /// The running kernel's release, as uname prints it.
        release: String,
    },
    /// The kernel does not publish its BTF, so CO-RE cannot relocate the programs.
    #[error("no kernel BTF at {}: the kernel was built without CONFIG_DEBUG_INFO_BTF", path.display())]
    NoBtf {
        /// The path looked at.
        path: PathBuf,
    },
    /// This process lacks capabilities that loading tracing programs needs.
    #[error(
        "missing {}: loading BPF tracing programs needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN)",
        missing.join(" and ")
    )]
    MissingCapabilities {
        /// Capability names as capabilities(7) spells them.
        missing: Vec<&'static str>,
    },
    /// The kernel answered EPERM although the capabilities are there: a seccomp filter
    /// (container runtimes block bpf(2) by default), lockdown, or an LSM.
    #[error("{call} was refused ({error}){}", if *seccomp {
        ": this process runs under a seccomp filter, which likely blocks bpf(2) (container runtimes do by default)"
    } else {
        ": kernel lockdown or an LSM may forbid BPF here"
    })]
    Denied {
        /// What was refused.
        call: String,
        /// Whether this process runs under a seccomp filter (/proc/self/status `Seccomp: 2`).
        seccomp: bool,
        /// The error.
        error: io::Error,
    },
    /// Pinning was asked for a directory that is not on a BPF filesystem.
    #[error(
        "{} is not on a BPF filesystem: mount one there (mount -t bpf bpf DIR, or systemd's /sys/fs/bpf)",
        path.display()
    )]
    NoBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// Another live daemon owns the pins in that directory.
    #[error("{} is pinned by a running daemon, pid {pid}", path.display())]
    PinBusy {
        /// The directory.
        path: PathBuf,
        /// That daemon's pid.
        pid: u32,
    },
    /// Anything else, with the whole error.
    #[error("{context}: {error}")]
    Other {
        /// What was being done.
        context: String,
        /// The error and its causes.
        error: String,
    },
}

/// `major.minor` of a kernel release string (`6.18.44-foo` → (6, 18)).
pub fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The capabilities missing from `effective` to load tracing programs.
pub fn missing_capabilities(effective: CapabilitySet) -> Vec<&'static str> {
    if effective.contains(CapabilitySet::SYS_ADMIN) {
        return Vec::new();
    }
    let mut missing = Vec::new();
    if !effective.contains(CapabilitySet::BPF) {
        missing.push("CAP_BPF");
    }
    if !effective.contains(CapabilitySet::PERFMON) {
        missing.push("CAP_PERFMON");
    }
    missing
}

/// Whether a /proc/PID/status text says the process runs under a seccomp filter.
pub fn seccomp_filtered(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .is_some_and(|v| v.trim() == "2")
}

/// The cheap checks, in the order that gives the most exact reason, then the kernel's BTF.
pub(crate) fn preconditions() -> Result<Btf, Unavailable> {
    if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        && let Some(version) = parse_release(&release)
        && version < MIN_KERNEL
    {
        return Err(Unavailable::KernelTooOld {
            release: release.trim().to_owned(),
        });
    }
    if !Path::new(KERNEL_BTF).exists() {
        return Err(Unavailable::NoBtf {
            path: KERNEL_BTF.into(),
        });
    }
    // Unreadable capabilities: let the kernel decide, and classify its answer.
    if let Ok(caps) = rustix::thread::capabilities(None) {
        let missing = missing_capabilities(caps.effective);
        if !missing.is_empty() {
            return Err(Unavailable::MissingCapabilities { missing });
        }
    }
    Btf::from_sys_fs().map_err(|e| other("read the kernel BTF", &e))
}

/// An error from aya as a reason: EPERM anywhere in its causes means the kernel refused.
/// (EACCES from BPF_PROG_LOAD is the verifier's rejection, not a permission: it stays
/// `Other`, with the verifier's log.)
pub(crate) fn classify(context: &str, err: &(dyn std::error::Error + 'static)) -> Unavailable {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.raw_os_error() == Some(libc::EPERM)
        {
            let seccomp =
                std::fs::read_to_string("/proc/self/status").is_ok_and(|s| seccomp_filtered(&s));
            return Unavailable::Denied {
                call: format!("{context} ({})", chain(err)),
                seccomp,
                error: io::Error::from_raw_os_error(libc::EPERM),
            };
        }
        cause = e.source();
    }
    other(context, err)
}

pub(crate) fn other(context: &str, err: &(dyn std::error::Error + 'static)) -> Unavailable {
    Unavailable::Other {
        context: context.to_owned(),
        error: chain(err),
    }
}

pub(crate) fn missing(name: &str) -> Unavailable {
    Unavailable::Other {
        context: "the embedded BPF object".to_owned(),
        error: format!("it has no program or map named {name}"),
    }
}

/// Take map `name` out of `ebpf` as a `T` (a ring buffer, a hash, an array); an error
/// names the map.
pub(crate) fn take_map<T>(ebpf: &mut aya::Ebpf, name: &str) -> Result<T, Unavailable>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or_else(|| missing(name))?;
    T::try_from(map).map_err(|e| classify(name, &e))
}

/// An error and its causes on one line, each cause once (aya's messages often repeat
/// their source).
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut cause = err.source();
    while let Some(e) = cause {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        cause = e.source();
    }
    text
}

/// Load each `(program, tracepoint)` of `ebpf` as a BTF tracepoint program and attach it.
pub(crate) fn attach_tracepoints(
    ebpf: &mut aya::Ebpf,
    btf: &Btf,
    programs: &[(&str, &str)],
) -> Result<(), Unavailable> {
    for &(name, tracepoint) in programs {
        let prog: &mut aya::programs::BtfTracePoint = ebpf
            .program_mut(name)
            .ok_or_else(|| missing(name))?
            .try_into()
            .map_err(|e| classify(name, &e))?;
        prog.load(tracepoint, btf)
            .map_err(|e| classify(&format!("load {name} for {tracepoint}"), &e))?;
        prog.attach()
            .map_err(|e| classify(&format!("attach {name} to {tracepoint}"), &e))?;
    }
    Ok(())
}

/// Wait until `fd` (a ring buffer) polls readable or `timeout` passes (`None`: no limit),
/// through signals. True when it is readable.
pub(crate) fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: Option<std::time::Duration>,
) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let ts = timeout.map(|t| Timespec {
        tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    loop {
        match poll(&mut fds, ts.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The page size, the unit of a ring buffer's size.
pub(crate) fn page_size() -> u32 {
    u32::try_from(rustix::param::page_size()).unwrap_or(4096)
}

/// Move every record waiting in `ring` into `out`, oldest first, without blocking, parsed by
/// `parse`; a record that does not parse is counted in `malformed`. How many were added.
pub(crate) fn drain_ring<T, E>(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    parse: impl Fn(&[u8]) -> Result<T, E>,
    out: &mut Vec<T>,
    malformed: &mut u64,
) -> usize {
    let before = out.len();
    while let Some(item) = ring.next() {
        match parse(&item) {
            Ok(r) => out.push(r),
            Err(_) => *malformed += 1,
        }
    }
    out.len() - before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases() {
        assert_eq!(parse_release("6.18.44-fc-v1272\n"), Some((6, 18)));
        assert_eq!(parse_release("5.12.0"), Some((5, 12)));
        assert_eq!(parse_release("5.4.0-150-generic"), Some((5, 4)));
        assert_eq!(parse_release("6.1"), Some((6, 1)));
        assert_eq!(parse_release("6"), None);
        assert_eq!(parse_release("banana"), None);
        assert!(parse_release("5.11.22").unwrap() < MIN_KERNEL);
        assert!(parse_release("5.12.1").unwrap() >= MIN_KERNEL);
        assert!(parse_release("6.0.0").unwrap() >= MIN_KERNEL);
    }

    #[test]
    fn capabilities() {
        assert_eq!(
            missing_capabilities(CapabilitySet::empty()),
            vec!["CAP_BPF", "CAP_PERFMON"]
        );
        assert_eq!(
            missing_capabilities(CapabilitySet::BPF),
            vec!["CAP_PERFMON"]
        );
        assert!(missing_capabilities(CapabilitySet::BPF | CapabilitySet::PERFMON).is_empty());
        assert!(missing_capabilities(CapabilitySet::SYS_ADMIN).is_empty());
        let msg = Unavailable::MissingCapabilities {
            missing: vec!["CAP_BPF", "CAP_PERFMON"],
        }
        .to_string();
        assert!(msg.starts_with("missing CAP_BPF and CAP_PERFMON:"), "{msg}");
    }

    #[test]
    fn seccomp_status() {
        let status = "Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n";
        assert!(seccomp_filtered(status));
        assert!(!seccomp_filtered("Seccomp:\t0\n"));
        assert!(!seccomp_filtered("Name:\tx\n"));
    }

    #[test]
    fn eperm_is_denied_other_errors_are_not() {
        let eperm = io::Error::from_raw_os_error(libc::EPERM);
        assert!(matches!(
            classify("attach", &eperm),
            Unavailable::Denied { .. }
        ));
        let eacces = io::Error::from_raw_os_error(libc::EACCES);
        assert!(matches!(
            classify("load", &eacces),
            Unavailable::Other { .. }
        ));
    }

    #[test]
    fn the_embedded_object_is_an_elf_for_bpf() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        // e_machine (offset 18, little-endian object): EM_BPF = 247.
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }
}
