//! The programs under test, found where cargo put them, and running `cwreap` for its output.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace's root directory (README.md, config/, tests/runtimes/, ...).
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ lives in the workspace")
}

/// The directory of the running test or bench executable's profile (`target/debug/`):
/// cargo puts those executables in its `deps/` and the binaries beside `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the path of this executable");
    let dir = exe.parent().expect("the executable's directory");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("the profile directory").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// A binary of the cwreap package. Cargo builds every binary of a package before running
/// its tests or benchmarks, and says where in `CARGO_BIN_EXE_<name>` while it runs them; a
/// test executable started by hand finds it in its profile directory.
fn program(name: &str) -> PathBuf {
    let path = std::env::var_os(format!("CARGO_BIN_EXE_{name}"))
        .map(PathBuf::from)
        .unwrap_or_else(|| profile_dir().join(name));
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build --features testing --bin {name}`, or run \
         through `cargo test`/`cargo bench`, which build it",
        path.display()
    );
    path
}

/// The `cwreap` binary under test.
pub fn cwreap_bin() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| program("cwreap"))
}

/// The `cwreap-fixture` binary (see [`crate::fixture`]).
pub fn fixture_bin() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| program("cwreap-fixture"))
}

/// A scratch directory under the target directory (`target/tmp`, what cargo calls
/// `CARGO_TARGET_TMPDIR`), for files that must outlive no run: build products of the
/// runtimes, injection seams, state files.
pub fn target_tmpdir() -> PathBuf {
    let dir = profile_dir()
        .parent()
        .map(|target| target.join("tmp"))
        .unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&dir).expect("create the target's tmp directory");
    dir
}

/// Run `cmd` to completion; it must succeed (a failure shows its stderr).
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run `cwreap ARGS` to completion, blind to any daemon's pinned entry times (a pin
/// directory that does not exist): what it prints depends on the test alone.
pub fn cwreap(args: &[&str]) -> Output {
    without_pins(Command::new(cwreap_bin()).args(args))
        .output()
        .expect("run cwreap")
}

/// `cmd` (a cwreap command line, or a shell running some) pointed at a pin directory
/// that does not exist, so it never reads ages another daemon on the machine pinned.
pub fn without_pins(cmd: &mut Command) -> &mut Command {
    cmd.env(
        crate::bpffs::BPF_DIR_VAR,
        std::env::temp_dir().join("cwreap-no-pins"),
    )
}

/// `cwreap ARGS`, which must exit 0; the JSON objects of its `--json` output.
pub fn cwreap_json(args: &[&str]) -> Vec<serde_json::Value> {
    json_of_success(&cwreap(args), args)
}

/// The JSON objects `out` (of `cwreap ARGS`) printed, which must have exited 0.
pub fn json_of_success(out: &Output, args: &[&str]) -> Vec<serde_json::Value> {
    assert_eq!(
        out.status.code(),
        Some(0),
        "cwreap {args:?}:\n{}{}",
        stdout(out),
        stderr(out)
    );
    json_lines(out)
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Parse `--json` output: one object per line.
pub fn json_lines(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

pub fn field_i64(v: &serde_json::Value, key: &str) -> i64 {
    v[key]
        .as_i64()
        .unwrap_or_else(|| panic!("no integer {key} in {v}"))
}

pub fn field_str<'a>(v: &'a serde_json::Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("no string {key} in {v}"))
}

/// The port a test server announces as its first line, `listening PORT`; `who` names it
/// in the failure.
pub fn listening_port(stdout: &mut impl std::io::BufRead, who: &str) -> u16 {
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .unwrap_or_else(|e| panic!("{who}: read the port line: {e}"));
    line.trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{who} said {line:?}, not `listening PORT`"))
}
