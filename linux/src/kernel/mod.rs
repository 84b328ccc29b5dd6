//! The seam between cwreap's decisions and the system. Everything the daemon and the
//! commands ask of the kernel goes through [`Kernel`]:
//! - [`clock`]: CLOCK_BOOTTIME, the clock BPF stamps events with;
//! - [`discover`]: CLOSE_WAIT sockets per network namespace: a snapshot, the changes since
//!   the last call, and exact entry times where the source saw the state change;
//! - [`procs`]: reading processes for attribution (ids, names, fd tables, limits);
//! - [`fds`]: every process's socket fds in one go, from the BPF iterator or /proc;
//! - [`effects`]: pinning a process with a pidfd, duplicating, identifying and shutting
//!   down a socket, signals and fd limits; and SOCK_DESTROY;
//! - [`system`]: the one bound that gathers them;
//! - [`events`]: discovery from the kernel's events (BPF) instead of dumps;
//! - [`linux`]: the real implementation; [`fake`] (feature `testing`): a recording double
//!   that serves scripted sockets and processes.

pub mod clock;
pub mod discover;
pub mod effects;
pub mod events;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod fds;
pub mod linux;
pub mod procs;
pub mod system;

pub use clock::{Boottime, Clock, SystemClock};
pub use discover::{Changes, Discover, EventCounts, SocketKey, key_of};
pub use effects::{
    Destroy, Effects, Identity, NofileRaise, Pinned, RealOs, SocketFacts, inspect_socket,
};
pub use fds::{FdSource, HostFds, ListFds, ProcFds, ProcWalk, SocketKind};
pub use linux::Linux;
pub use procs::ProcRead;
pub use system::Kernel;
