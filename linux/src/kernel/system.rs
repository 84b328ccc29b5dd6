//! [`Kernel`]: everything cwreap asks of the system, as one bound. The daemon and the
//! commands are written against it; [`crate::kernel::Linux`] is the real one, and a
//! recording double (feature `testing`) serves scripted sockets and processes.

use crate::kernel::clock::Clock;
use crate::kernel::discover::Discover;
use crate::kernel::effects::{Destroy, Effects};
use crate::kernel::fds::ListFds;
use crate::kernel::procs::ProcRead;

/// The clock, discovery, attribution reads (process by process, and every process's
/// socket fds at once), effects on sockets and processes, and SOCK_DESTROY.
pub trait Kernel: Clock + Discover + ProcRead + ListFds + Effects + Destroy {}

impl<T: Clock + Discover + ProcRead + ListFds + Effects + Destroy> Kernel for T {}
