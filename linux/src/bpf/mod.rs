//! Event-driven socket discovery with BPF: the kernel tells cwreap when a TCP socket enters
//! and leaves CLOSE_WAIT and when it is destroyed, and which fds hold which sockets.
//!
//! This module owns the BPF object (linux/bpf/cwreap.bpf.c, built by `make bpf` with a
//! pinned clang and checked in, so cargo never needs a C compiler), its loading with aya,
//! the record formats the programs write, and the pins shared with other processes:
//! - [`Events`]: two BTF tracepoint programs (`inet_sock_set_state`, `tcp_destroy_sock`), a
//!   ring buffer of [`Event`]s, a count of events lost when it was full, and a map of
//!   CLOSE_WAIT entry times by socket cookie (CLOCK_BOOTTIME, see [`boottime_ns`]).
//! - [`SocketIter`] and [`task_sockets`]: a `task_file` iterator listing every socket fd of
//!   every process (pid, fd, inode, state) in one pass. It cannot read cookies: join with
//!   sock_diag on the inode.
//! - [`PinnedAges`]: the daemon's entry times read from another process, trusted only while
//!   that daemon is alive and its heartbeat recent.
//! - [`is_bpffs`], [`mount_bpffs`], [`enter_private_mount_namespace`]: the BPF filesystem the
//!   pins live on. Loading never mounts anything.
//!
//! Needs Linux ≥ 5.12 with BTF, and CAP_BPF with CAP_PERFMON (or CAP_SYS_ADMIN); when any is
//! missing, loading returns an [`Unavailable`] saying which. Uses no fentry/fexit (they are
//! refused on some kernels) and no tracefs or perf events.
//!
//! [`Events`]: crate::bpf::Events
//! [`Event`]: crate::bpf::Event
//! [`boottime_ns`]: crate::bpf::boottime_ns
//! [`SocketIter`]: crate::bpf::SocketIter
//! [`task_sockets`]: crate::bpf::task_sockets
//! [`PinnedAges`]: crate::bpf::PinnedAges
//! [`is_bpffs`]: crate::bpf::is_bpffs
//! [`mount_bpffs`]: crate::bpf::mount_bpffs
//! [`enter_private_mount_namespace`]: crate::bpf::enter_private_mount_namespace
//! [`Unavailable`]: crate::bpf::Unavailable

mod bpffs;
mod clock;
mod event;
mod events;
mod iter;
mod load;
pub(crate) use load::wait_readable;
mod pin;
mod where_load;
mod where_record;

pub use bpffs::{BPF_FS_MAGIC, enter_private_mount_namespace, is_bpffs, mount_bpffs};
pub use clock::boottime_ns;
pub use event::{BadRecord, EVENT_LEN, Event, parse_event};
pub use events::{Events, Options};
pub use iter::{
    BadOutput, IterError, SocketIter, TASK_SOCK_LEN, TaskEpoll, TaskFds, TaskSocket,
    TaskSocketsError, parse_task_fds, parse_task_sockets, task_sockets,
};
pub use load::{
    KERNEL_BTF, MIN_KERNEL, Unavailable, missing_capabilities, parse_release, seccomp_filtered,
};
pub use pin::{DEFAULT_PIN_DIR, DaemonRecord, NotExact, PinnedAges, ProcStat, judge, parse_stat};
pub use where_load::{
    WHERE_LAYOUT_DEPTH, WHERE_LAYOUT_SPAN, WHERE_MIN_KERNEL, WhereCounts, WhereOptions, WhereProbe,
};
pub use where_record::{
    BadWhere, StackCapture, WHERE_FRAMES, WHERE_HEADER_LEN, WHERE_STACK_MAX, WhereAt, WhereKind,
    WhereRecord, parse_where,
};
