//! The commands: `scan` and `reap` run discovery → attribution → selection → action →
//! report once; `explain` samples and diagnoses; `check` validates a policy. This is the
//! edge: errors carry context here, and usage errors become exit code 2.

mod check;
mod close;
pub mod common;
mod explain;
mod explain_where;
mod reap;
mod scan;
#[cfg(test)]
mod tests;

pub use check::check;
pub use common::Status;
pub use explain::explain;
pub use reap::{reap, reap_row};
pub use scan::scan;
