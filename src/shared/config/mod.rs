//! The YAML policy of `cwreap run`: the validated [`Config`] and the pure process and
//! socket matching a [`Target`] describes. No /proc reading here: the daemon gathers
//! [`ProcessFacts`] and [`SocketFacts`] and asks.
//!
//! Targets are matched per socket: a socket belongs to the first target (in policy order)
//! whose process criteria accept its process and whose socket criteria (local and remote
//! ports and addresses, `exclude`) accept the socket ([`Target::selects`]). The criteria
//! are a [`Selector`], the same type the command line builds, so `cwreap check` can print
//! the `cwreap scan` line that selects what a target does. Two targets on one process, split by
//! port, each get their own sockets; [`shadow`] finds a target an earlier one leaves
//! nothing to.
//!
//! - [`raw`]: the file as written (every value with its position) and YAML errors;
//! - [`validate`]: raw → [`Config`] in one step (regexes compiled, durations, ports,
//!   CIDRs and addresses parsed, every rule checked);
//! - [`describe`]: the effective policy, every default explicit (`cwreap check`);
//! - [`file`]: opening the policy file safely, and the usage errors of the whole program.
//!
//! Every error is one line, `<file>:<line>:<col>: <problem>`, pointing at the offending key or
//! value whenever its position is known.

mod describe;
pub mod error;
pub mod file;
pub mod model;
mod raw;
pub mod shadow;
#[cfg(test)]
mod tests;
mod validate;

pub use error::{ConfigError, Position};
pub use file::{check_file_permissions, load, load_config, parse};
pub use model::*;
