//! The BPF filesystem, where pinned maps live: whether a path is on one, and mounting one.
//! Nothing here runs unless called: loading programs never mounts anything.

use std::io;
use std::path::Path;

/// `BPF_FS_MAGIC` (include/uapi/linux/magic.h): statfs's `f_type` on a BPF filesystem.
pub const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// Whether `path` lies on a BPF filesystem (statfs).
pub fn is_bpffs(path: &Path) -> io::Result<bool> {
    let st = rustix::fs::statfs(path)?;
    // f_type's width differs between architectures; the magic fits in 32 bits.
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as u64 == u64::from(BPF_FS_MAGIC))
}

/// Mount a new BPF filesystem on the directory `dir` (mode 0700), as systemd does on
/// /sys/fs/bpf. For a daemon started as root outside systemd, and for tests (see
/// [`enter_private_mount_namespace`]). Needs CAP_SYS_ADMIN.
pub fn mount_bpffs(dir: &Path) -> io::Result<()> {
    rustix::mount::mount(
        "bpf",
        dir,
        "bpf",
        rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOEXEC,
        c"mode=0700",
    )?;
    Ok(())
}

/// Move the calling thread into a new mount namespace whose mounts no longer propagate to
/// the parent's, so that mounts made afterwards (a private bpffs, say) are seen only by
/// this thread and the processes it spawns, and vanish with them. The thread's working
/// directory and root become its own (CLONE_NEWNS implies CLONE_FS). Needs CAP_SYS_ADMIN.
pub fn enter_private_mount_namespace() -> io::Result<()> {
    // SAFETY: only a new mount namespace (and, implied, a private copy of the thread's
    // cwd/root/umask) is requested; the fd table stays shared (no CLONE_FILES), which is
    // the hazard rustix marks this call unsafe for.
    unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNS) }?;
    // The new namespace starts with copies of shared mounts; without this, a mount below
    // a shared mount would still propagate back to the host.
    rustix::mount::mount_change(
        "/",
        rustix::mount::MountPropagationFlags::PRIVATE | rustix::mount::MountPropagationFlags::REC,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        assert!(!is_bpffs(Path::new("/")).unwrap());
        assert!(is_bpffs(Path::new("/nonexistent/cwreap")).is_err());
    }
}
