//! The commands: `scan` and `reap` run discovery → attribution → selection → action →
//! report once; `explain` samples and diagnoses; `check` validates a policy. This is the
//! edge: errors carry context here, and usage errors become exit code 2.

mod check;
mod check_listen;
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
pub use reap::{reap, reap_row};
pub use scan::scan;

/// `cwreap explain`, or with `--where` the stacks of the leaking code.
pub fn explain(
    args: &crate::cli::args::ExplainArgs,
    out: &mut impl std::io::Write,
    err: &mut impl std::io::Write,
) -> anyhow::Result<Status> {
    if args.where_ {
        let mut k = common::cli_kernel(&args.selectors);
        explain_where::explain_where(&mut k, args, out, err)
    } else {
        explain::explain(args, out, err)
    }
}
