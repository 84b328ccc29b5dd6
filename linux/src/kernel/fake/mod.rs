//! A recording double of [`crate::kernel::Kernel`] for unit tests of the daemon and the
//! commands: it serves scripted processes and sockets, answers every call as the kernel
//! would for them, applies effects (a shutdown moves the socket to CLOSE, a signal may end
//! the process, SOCK_DESTROY removes the socket), and records every call.
//!
//! Faults are scripted too: a dump that fails, an fd table that cannot be read, an fd that
//! another socket took between attribution and action, a process that exits, a call that
//! fails with an errno. Time moves only when a test moves it ([`FakeKernel::advance`]).
//!
//! - [`world`]: the scripted processes, sockets and faults, and the calls recorded;
//! - [`double`]: [`FakeKernel`] and the builders tests script it with;
//! - [`impls`]: the kernel's answers and effects for that world.

pub mod double;
pub mod impls;
pub mod world;

pub use double::{FakeDup, FakeKernel, FakePin};
pub use impls::keys;
pub use world::{Call, Faults, Fd, NETNS, Process, Socket, World};
