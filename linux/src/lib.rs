//! cwreap-linux: how cwreap talks to Linux. It holds every system call cwreap makes and
//! every `unsafe` block, each with its SAFETY note, and no policy or command line.
//!
//! Along the path of one socket:
//! - **discover**: [`netlink`] dumps CLOSE_WAIT sockets over NETLINK_SOCK_DIAG (and destroys
//!   one with SOCK_DESTROY); [`netns`] keeps one such socket per network namespace.
//! - **attribute**: [`procfs`] is the one reader of /proc (fd tables, limits, cgroups,
//!   threads, maps, fdinfo).
//! - **the seam**: [`kernel::Kernel`] is everything cwreap asks of the system (clock,
//!   discovery, process reads, effects, SOCK_DESTROY), with the real [`kernel::Linux`]
//!   and a recording double for tests; [`kernel::effects`] has the pidfd effects
//!   (pidfd_open, pidfd_getfd, fstat, SO_COOKIE, TCP_INFO, shutdown, signals, prlimit);
//!   [`inject`] runs close(2) inside a stopped target (ptrace), the manual last resort.
//! - **policy and audit files**: [`secure_fs`] opens them without trusting their path
//!   (every directory checked through its own fd, symlinks resolved and shown, no FIFO
//!   hangs) and keeps an append-only line file whole after a crash.
//! - [`published`]: the running daemon's first sight of each socket, published for the
//!   command line, and read only while it speaks for a live daemon;
//! - [`sys`] has the raw calls and capabilities; [`tcp`] the TCP state numbers and names;
//!   [`terminal`] whether an output is a terminal, and its size.

/// BPF programs: CLOSE_WAIT events by socket cookie, a socket-fd iterator, pinned ages.
pub mod bpf;
pub mod inject;
pub mod kernel;
pub mod netlink;
pub mod netns;
pub mod procfs;
pub mod published;
pub mod secure_fs;
/// User stacks: CFI unwinding of a copied stack, symbols and lines, library frames.
pub mod stacks;
pub mod sys;
pub mod tcp;
pub mod terminal;
#[cfg(feature = "testing")]
pub mod testing;
