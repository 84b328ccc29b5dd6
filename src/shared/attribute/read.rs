//! Reading one process for attribution: its fd table (through a live thread once the
//! leader has exited, pinned when pinning), the facts a selector filters on, and the pids
//! of pid files.

use std::io;

use cwreap_linux::kernel::{Effects, ProcRead};
use cwreap_linux::procfs::FdTable;

use crate::shared::selector::{Needs, ProcessFacts};

/// Read the fd table of `pid`, pinned by `handle` when there is one: through the process,
/// or, when that shows no fds and the leader has exited (or other threads remain), through
/// a live thread, pinned first with [`Os::pin_thread`] and confirmed a thread of `pid`
/// after. Finally the process must still be alive: the fd numbers are then its own.
/// Returns the table and the thread it was read through.
pub fn read_fds<P: ProcRead, O: Effects>(
    proc: &P,
    os: Option<&O>,
    handle: Option<&mut O::Process>,
    pid: i32,
) -> io::Result<(FdTable, Option<i32>)> {
    let table = proc.fd_table(pid)?;
    read_fds_from(proc, os, handle, pid, table)
}

/// [`read_fds`] once `table`, the process's own /proc/PID/fd, has been read.
pub(super) fn read_fds_from<P: ProcRead, O: Effects>(
    proc: &P,
    os: Option<&O>,
    mut handle: Option<&mut O::Process>,
    pid: i32,
    mut table: FdTable,
) -> io::Result<(FdTable, Option<i32>)> {
    let mut thread = None;
    if table.open == 0
        && let Some(tid) = proc.thread_for_empty_table(pid)
    {
        if let (Some(os), Some(h)) = (os, handle.as_deref_mut()) {
            os.pin_thread(h, tid)?;
            // Pinned before it is checked: a tid reused by another process after this
            // check cannot be the one pinned.
            if !proc.task_exists(pid, tid) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        table = proc.task_fd_table(pid, tid)?;
        thread = Some(tid);
    }
    if let (Some(os), Some(h)) = (os, handle.as_deref())
        && !os.alive(h)
    {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    Ok((table, thread))
}

/// The facts about process `pid` that a selector with `needs` reads (the pid and the name
/// always), but its command line: see [`read_cmdline`].
pub fn process_facts(proc: &impl ProcRead, pid: i32, needs: Needs) -> io::Result<ProcessFacts> {
    let comm = proc.comm(pid)?;
    Ok(ProcessFacts {
        pid,
        comm,
        exe: if needs.exe { proc.exe(pid).ok() } else { None },
        // Read apart, by [`read_cmdline`], once the cheaper criteria passed.
        cmdline: None,
        cgroup: if needs.cgroup {
            proc.cgroup(pid)
                .ok()
                .and_then(|t| crate::shared::selector::parse_cgroup_file(&t))
        } else {
            None
        },
        uid: if needs.uid { proc.uid(pid).ok() } else { None },
    })
}

/// The command line of `pid`, for a process that passed every cheaper criterion: None when
/// there is none to read (a kernel thread, a process gone). An error only when reading it
/// did not return in time ([`io::ErrorKind::TimedOut`]): its memory map is locked, so whether
/// it matches cannot be known, and the caller skips and counts it.
pub fn read_cmdline(proc: &impl ProcRead, pid: i32) -> io::Result<Option<String>> {
    match proc.cmdline(pid) {
        Ok(c) => Ok(Some(c)),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(e),
        Err(_) => Ok(None),
    }
}

/// The pids the given pid files hold now, read as [`crate::shared::pid_file`] trusts
/// them; and why each of the others gave none (a missing file is no pid and no error of
/// its own: the service may be restarting).
pub fn read_pid_files(
    files: &[std::path::PathBuf],
) -> (Vec<i32>, Vec<crate::shared::pid_file::PidFileError>) {
    let owners = crate::shared::pid_file::trusted_owners();
    let mut pids = Vec::new();
    let mut errors = Vec::new();
    for f in files {
        match crate::shared::pid_file::read(f, &owners) {
            Ok(pid) => pids.push(pid),
            Err(crate::shared::pid_file::PidFileError::Missing(_)) => {}
            Err(e) => errors.push(e),
        }
    }
    (pids, errors)
}

/// Whether an attribution error means "not allowed" rather than "gone".
pub fn is_permission(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM))
}
