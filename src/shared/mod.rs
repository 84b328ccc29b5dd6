//! What the command line and the daemon both use, along the path of one socket:
//! - [`attribute`]: which process holds each CLOSE_WAIT socket, through which fd;
//! - [`age`]: one age for every socket, with its bounds and its source;
//! - [`selector`]: which sockets a command or a policy target is about;
//! - [`dead`]: dead held sockets: ended connections a process still holds by an fd;
//! - [`forecast`]: when a process runs out of fds, from the growth of its open fds;
//! - [`pid_file`]: reading a pid file as systemd trusts one (owner, no symlink, no FIFO,
//!   64 bytes at most);
//! - [`config`]: the YAML policy, validated in one step;
//! - [`audit_file`]: where the daemon's audit log may live, and opening it (`check` asks
//!   too);
//! - [`act`]: duplicate, verify and shut down (or destroy) one socket;
//! - [`recount`]: what an injected close() batch that failed as a whole did, fd by fd,
//!   read back from the target's fd table;
//! - [`usage`]: the error that means "fix the command line, the policy or the privileges"
//!   (exit code 2), and [`values`]: the value parsers shared by flags and policy keys;
//! - [`where_capture`]: the stacks `explain --where` and the daemon's `where: on` record
//!   per socket, and their published form.

pub mod act;
pub mod age;
pub mod attribute;
pub mod audit_file;
pub mod config;
pub mod dead;
pub mod forecast;
pub mod pid_file;
pub mod recount;
pub mod selector;
pub mod usage;
pub mod values;
pub mod where_capture;
