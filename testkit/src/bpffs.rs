//! A private BPF filesystem for each daemon a test starts, so that no test pins under the
//! host's /sys/fs/bpf or makes the daemon mount a BPF filesystem there (it does, as root
//! outside systemd, for its default pin directory only).
//!
//! [`PrivateBpf::new`] mounts a fresh bpffs on a directory of its own under the temp dir
//! (as root; otherwise the directory stays a plain one, where pinning is refused and the
//! daemon says so) and unmounts it on drop: the pins die with it. The daemon and the
//! command lines that should read its pins get `CWREAP_BPF_DIR` = [`PrivateBpf::pins`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The variable that moves the daemon's pins (and the command line's reading of them).
pub const BPF_DIR_VAR: &str = "CWREAP_BPF_DIR";

/// The directory pinned BPF maps live in when nothing moves them.
pub const HOST_PIN_DIR: &str = "/sys/fs/bpf/cwreap";

/// A BPF filesystem of one test's own, on a temporary directory; unmounted and removed on
/// drop.
#[derive(Debug)]
pub struct PrivateBpf {
    mount: PathBuf,
    mounted: bool,
}

impl PrivateBpf {
    /// Mount a new bpffs on `$TMPDIR/cwreap-bpffs-PID-N` (root only; a plain directory
    /// otherwise).
    pub fn new() -> PrivateBpf {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let mount = std::env::temp_dir().join(format!("cwreap-bpffs-{}-{n}", std::process::id()));
        let _ = rustix::mount::unmount(&mount, rustix::mount::UnmountFlags::DETACH);
        let _ = std::fs::remove_dir_all(&mount);
        std::fs::create_dir_all(&mount).expect("create the private bpffs mount point");
        let mounted =
            rustix::process::geteuid().is_root() && cwreap_linux::bpf::mount_bpffs(&mount).is_ok();
        PrivateBpf { mount, mounted }
    }

    /// Whether a BPF filesystem is mounted there (false when not run as root).
    pub fn mounted(&self) -> bool {
        self.mounted
    }

    /// The mount point.
    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The pin directory a daemon is given (it creates it).
    pub fn pins(&self) -> PathBuf {
        self.mount.join("cwreap")
    }

    /// `CWREAP_BPF_DIR` for a daemon or a command line.
    pub fn env(&self) -> (&'static str, OsString) {
        (BPF_DIR_VAR, self.pins().into_os_string())
    }

    /// Point `cmd` at these pins.
    pub fn apply<'c>(&self, cmd: &'c mut Command) -> &'c mut Command {
        let (k, v) = self.env();
        cmd.env(k, v)
    }
}

impl Default for PrivateBpf {
    fn default() -> Self {
        PrivateBpf::new()
    }
}

impl Drop for PrivateBpf {
    fn drop(&mut self) {
        if self.mounted {
            // Lazily: a process started in another mount namespace (`ip netns exec`) may
            // still hold a copy of the mount; the pins go when the last one does.
            let _ = rustix::mount::unmount(&self.mount, rustix::mount::UnmountFlags::DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.mount);
    }
}

/// What the host's pin directory and BPF filesystem look like, to tell that a test left
/// them alone: whether /sys/fs/bpf is a BPF filesystem, and each pin there with its inode
/// (a pin made again is a new inode).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBpf {
    pub bpffs_mounted: bool,
    pub pins: Vec<(String, u64)>,
}

impl HostBpf {
    pub fn now() -> HostBpf {
        use std::os::unix::fs::MetadataExt;
        let bpffs_mounted = cwreap_linux::bpf::is_bpffs(Path::new("/sys/fs/bpf")).unwrap_or(false);
        let mut pins: Vec<(String, u64)> = std::fs::read_dir(HOST_PIN_DIR)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| {
                        let ino = e.metadata().ok()?.ino();
                        Some((e.file_name().to_string_lossy().into_owned(), ino))
                    })
                    .collect()
            })
            .unwrap_or_default();
        pins.sort();
        HostBpf {
            bpffs_mounted,
            pins,
        }
    }
}
