//! A test that cannot run here for want of a tool (ss, a runtime, promtool, tmux, ...):
//! outside CI it skips with a visible line, under `CI=true` it fails. Root is not such a
//! condition: tests that need it are `#[ignore = "needs root: ..."]`.

use std::io::Write;

/// Whether tests must not skip (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// A test cannot run here (a missing tool): in CI (`CI=true`) that fails the test;
/// elsewhere it prints a visible `SKIP test: why` line. Written to stderr directly, because
/// libtest captures `eprintln!`.
pub fn skip_or_fail(test: &str, why: &str) {
    if in_ci() {
        panic!("{test}: {why}, and CI=true forbids skipping");
    }
    let _ = writeln!(std::io::stderr(), "SKIP {test}: {why}");
}
