//! Attribution from a host-wide listing of socket fds ([`HostFds`]: the BPF iterator's one
//! pass, or the /proc walk's) instead of reading /proc/PID/fd process by process.
//!
//! A listing is a picture of a moment before the process is pinned, so a record is used
//! only once the pin is known to hold the process it describes: the pidfd is opened first
//! (by the caller), then the process's start time is read from /proc and compared with the
//! listing's, then the pidfd must still be alive (so the start time read was the pinned
//! process's). A process the listing saw through a thread (its leader had exited) is pinned
//! through that thread, checked to belong to it, as the /proc walk does. When the start
//! times differ (the pid was reused since the pass) or the listing does not have the
//! process, the caller reads /proc for it as before.

use std::io;

use cwreap_linux::kernel::{Effects, HostFds, ProcRead};
use cwreap_linux::procfs::FdTable;

/// The fd table of `pid` from `host`, checked as above; None when the listing cannot
/// vouch for the process pinned now (then read /proc instead).
pub fn table_from_host<P: ProcRead, O: Effects>(
    proc: &P,
    os: Option<&O>,
    mut handle: Option<&mut O::Process>,
    pid: i32,
    host: &HostFds,
) -> Option<io::Result<(FdTable, Option<i32>)>> {
    let entry = host.procs.get(&pid)?;
    match proc.start_time(pid) {
        Ok(start) if start == entry.start_ticks => {}
        Ok(_) => return None, // another process has the pid now
        Err(e) => return Some(Err(e)),
    }
    if let (Some(tid), Some(os), Some(h)) = (entry.via, os, handle.as_deref_mut()) {
        if let Err(e) = os.pin_thread(h, tid) {
            return Some(Err(e));
        }
        // Pinned before it is checked, as in read_fds.
        if !proc.task_exists(pid, tid) {
            return Some(Err(io::Error::from_raw_os_error(libc::ESRCH)));
        }
    }
    if let (Some(os), Some(h)) = (os, handle.as_deref())
        && !os.alive(h)
    {
        return Some(Err(io::Error::from_raw_os_error(libc::ESRCH)));
    }
    // The listing has socket and epoll fds only; the count of all is one stat.
    let open = proc
        .fd_count(pid, entry.via)
        .unwrap_or(entry.sockets.len() + entry.epoll.len());
    Some(Ok((
        FdTable {
            open,
            sockets: entry.sockets.clone(),
            epoll: entry.epoll.clone(),
        },
        entry.via,
    )))
}
