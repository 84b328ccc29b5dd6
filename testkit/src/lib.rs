//! What cwreap's integration tests (tests/it/) and benchmarks (benches/) share, compiled
//! once: the leaky-server fixture program and its drivers ([`Fixture`], [`fleet::Fleet`]),
//! the `cwreap run` runner ([`Running`], [`LoggedDaemon`], [`Notify`]), one `ss` wrapper
//! ([`ss`]), network namespaces, servers written in other runtimes ([`runtimes`]) and a
//! urllib3 pool ([`pool`]), the injection seams ([`pause`]), a pseudo-terminal to run a
//! command on ([`on_terminal`]), and the gate that turns a missing tool into a skip or,
//! under `CI=true`, a failure.
//!
//! It knows the programs under test only by path ([`cwreap_bin`], [`fixture_bin`]) and
//! never links the `cwreap` crate, whose `testing` feature builds the fixture program from
//! here ([`fixture::main`]).
#![forbid(unsafe_code)]

pub mod bpffs;
pub mod daemon;
pub mod fixture;
pub mod fleet;
mod fold;
mod gate;
mod leaky;
mod lines;
pub mod metrics;
mod netns;
pub mod pause;
pub mod pool;
mod procfs;
mod programs;
pub mod runtimes;
mod scratch;
pub mod ss;
mod terminal;

pub use bpffs::{HostBpf, PrivateBpf};
pub use daemon::{LoggedDaemon, Notify, Running, status_of};
pub use fold::{fold, fold_log};
pub use gate::{in_ci, skip_or_fail};
pub use leaky::{Clients, Fixture, close_waits, echoes, reads_eof, reads_reset};
pub use lines::{Killed, LineChild, lines_of};
pub use netns::{Netns, netns_of};
pub use procfs::{
    anon_kib, cpu_ticks, cpu_time, fd_count, fd_inode, rss_kib, status_kib, thread_state,
    thread_states,
};
pub use programs::{
    cwreap, cwreap_bin, cwreap_json, field_i64, field_str, fixture_bin, json_lines,
    json_of_success, listening_port, repo, run_ok, stderr, stdout, target_tmpdir, without_pins,
};
pub use scratch::{Scratch, raise_nofile, write_policy};
pub use ss::{ss_close_wait, ss_close_wait_on_port, ss_count};
pub use terminal::{Screenful, have_script, on_terminal};

use std::time::{Duration, Instant};

/// Upper bound of the waits of [`wait_until`]: only a guard against hangs, never what a
/// test decides by.
pub const HANG_GUARD: Duration = Duration::from_secs(60);

/// Poll `f` until it gives a value; on [`HANG_GUARD`], panic with `what` and `context()`.
pub fn wait_until<T>(
    what: &str,
    context: impl Fn() -> String,
    mut f: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what} after {HANG_GUARD:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
