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
/// always).
pub fn process_facts(proc: &impl ProcRead, pid: i32, needs: Needs) -> io::Result<ProcessFacts> {
    let comm = proc.comm(pid)?;
    Ok(ProcessFacts {
        pid,
        comm,
        exe: if needs.exe { proc.exe(pid).ok() } else { None },
        cmdline: if needs.cmdline {
            proc.cmdline(pid).ok()
        } else {
            None
        },
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

/// The pids the given pid files hold now (a missing or unreadable file gives none).
pub fn read_pid_files(files: &[std::path::PathBuf]) -> Vec<i32> {
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .filter_map(|t| crate::shared::selector::parse_pid_file(&t))
        .collect()
}
