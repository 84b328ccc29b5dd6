//! What /proc says about a process: its fds, its memory.

/// Open fds of process `pid` (0 once it is gone).
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The socket inode behind fd `fd` of `pid`, or None when that fd is not an open socket.
pub fn fd_inode(pid: i32, fd: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    cwreap_linux::procfs::parse_socket_link(link.to_str()?)
}

/// The state letter of thread `tid` of process `pid` (field 3 of its stat: `R`, `S`, `D`,
/// `t`, `Z`, ...), after the comm, which may hold spaces and parentheses; None once gone.
pub fn thread_state(pid: i32, tid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// (tid, state letter) of every thread of `pid`.
pub fn thread_states(pid: i32) -> Vec<(i32, char)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let tid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        Some((tid, thread_state(pid, tid)?))
    })
    .collect()
}

/// A `Vm...:` line of /proc/PID/status (e.g. `VmRSS:`), in KiB.
pub fn status_kib(pid: i32, key: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Resident memory of `pid`, in KiB.
pub fn rss_kib(pid: i32) -> u64 {
    status_kib(pid, "VmRSS:").unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// Resident anonymous memory of `pid` in KiB (RssAnon: the heap and stacks it allocated,
/// not the pages of its binary that code run since has faulted in).
pub fn anon_kib(pid: i32) -> u64 {
    status_kib(pid, "RssAnon:").unwrap_or_else(|| panic!("no RssAnon for pid {pid}"))
}

/// User plus system CPU time of the whole process `pid` so far, in clock ticks
/// (/proc/PID/stat); None once it is gone.
pub fn cpu_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesized comm: state is field 3, utime 14, stime 15.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| -> Option<u64> { f.get(i - 3)?.parse().ok() };
    Some(tick(14)? + tick(15)?)
}

/// [`cpu_ticks`] as a duration.
pub fn cpu_time(pid: i32) -> Option<std::time::Duration> {
    let hz = rustix::param::clock_ticks_per_second().max(1);
    Some(std::time::Duration::from_nanos(
        cpu_ticks(pid)? * 1_000_000_000 / hz,
    ))
}
