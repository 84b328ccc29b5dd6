//! The shipped policies validate, and each kind of mistake is reported on one line as
//! `file:line:col: problem`, pointing at the offending key or value.

use std::path::{Path, PathBuf};

use cwreap::shared::config;

fn config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml") {
            // Policies only: `*.yml` files here are other tools' (e.g. Prometheus rules).
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_policy_validates() {
    let mut files = Vec::new();
    yaml_files(&config_dir(), &mut files);
    files.sort();
    assert!(
        files.len() >= 2,
        "expected config/cwreap.yaml and examples, found {files:?}"
    );
    for f in &files {
        let c = config::load(f).unwrap_or_else(|e| panic!("{e}"));
        // What `cwreap check` prints is itself a valid policy with the same meaning.
        let described = c.describe();
        let again = config::parse(&described, "describe")
            .unwrap_or_else(|e| panic!("describe() of {} does not parse: {e}", f.display()));
        assert_eq!(again.describe(), described, "{}", f.display());
    }
}

#[test]
fn default_policy_is_safe() {
    let c = config::load(&config_dir().join("cwreap.yaml")).unwrap_or_else(|e| panic!("{e}"));
    assert!(c.dry_run, "config/cwreap.yaml must ship with dry_run: true");
    for t in &c.targets {
        assert!(
            t.effective_dry_run(c.dry_run),
            "target {} overrides dry_run in the default policy",
            t.name
        );
    }
}

/// Write `text` to a file named `name` in a fresh directory and load it; returns the path
/// and the one-line error.
/// The README's enforce step (two `sed` edits) on the packaged policy enforces: dry_run off
/// and a socket-touching action. One edit alone would not.
#[test]
fn the_readme_enforce_step_enforces_the_packaged_policy() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README");
    let sed = readme
        .lines()
        .find(|l| l.contains("sed -i") && l.contains("/etc/cwreap/cwreap.yaml"))
        .expect("the README's enforce step");
    let edits: Vec<(String, String)> = sed
        .split(" -e ")
        .skip(1)
        .map(|e| {
            let e = e
                .trim()
                .trim_start_matches('\'')
                .split('\'')
                .next()
                .unwrap_or("");
            let parts: Vec<&str> = e.split('/').collect();
            assert_eq!(parts.len(), 4, "a s/FROM/TO/ edit: {e}");
            (
                parts[1].trim_start_matches('^').to_owned(),
                parts[2].to_owned(),
            )
        })
        .collect();
    assert_eq!(edits.len(), 2, "{sed}");
    let text = std::fs::read_to_string(config_dir().join("cwreap.yaml")).expect("policy");
    let mut edited = text.clone();
    for (from, to) in &edits {
        assert!(
            text.lines().any(|l| l.starts_with(from.as_str())),
            "the packaged policy has no line starting with {from:?}"
        );
        edited = edited
            .lines()
            .map(|l| match l.strip_prefix(from.as_str()) {
                Some(rest) => format!("{to}{rest}"),
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
            .join("\n");
    }
    let c = config::parse(&edited, "edited.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert!(!c.dry_run);
    assert!(
        c.targets
            .iter()
            .all(|t| t.action == config::Action::Shutdown && !t.effective_dry_run(c.dry_run)),
        "every target enforces after the two edits"
    );
}

fn load_error(name: &str, text: &str) -> (String, String) {
    let dir =
        std::env::temp_dir().join(format!("cwreap-config-files-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, text).expect("write policy");
    let result = config::load(&path);
    let _ = std::fs::remove_dir_all(&dir);
    let err = match result {
        Ok(_) => panic!("{name}: expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    };
    assert!(!err.contains('\n'), "{name}: not one line: {err:?}");
    (path.display().to_string(), err)
}

/// Assert the error is at `line:col` of the file and mentions every one of `needles`.
fn assert_error(name: &str, text: &str, line: u32, col: u32, needles: &[&str]) {
    let (path, err) = load_error(name, text);
    let prefix = format!("{path}:{line}:{col}: ");
    assert!(
        err.starts_with(&prefix),
        "{name}: expected position {line}:{col}, got: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "{name}: expected {n:?} in: {err}");
    }
}

const HEAD: &str = "interval: 30s\ndry_run: true\ntargets:\n  - name: web\n";

#[test]
fn unknown_key_with_suggestion() {
    // line 5: "    older_then: 5m"
    let text = format!("{HEAD}    older_then: 5m\n    match:\n      comm: ^nginx$\n");
    assert_error(
        "unknown-key",
        &text,
        5,
        5,
        &["unknown key `older_then` in target `web`; did you mean `older_than`?"],
    );
}

#[test]
fn bad_duration() {
    let text = format!("{HEAD}    match:\n      comm: ^nginx$\n    older_than: 10 minits\n");
    assert_error(
        "bad-duration",
        &text,
        7,
        17,
        &[
            "`older_than` in target `web`",
            "`10 minits` is not a duration",
        ],
    );
}

#[test]
fn bad_regex() {
    let text = format!("{HEAD}    match:\n      comm: \"^(nginx\"\n    older_than: 5m\n");
    assert_error(
        "bad-regex",
        &text,
        6,
        13,
        &["`match.comm` in target `web`", "invalid regex `^(nginx`"],
    );
}

#[test]
fn bad_cidr() {
    let text = format!(
        "{HEAD}    match:\n      comm: ^nginx$\n    older_than: 5m\n    exclude:\n      remote_cidrs:\n        - 10.0.0.0/8\n        - 10.300.0.0/16\n"
    );
    assert_error(
        "bad-cidr",
        &text,
        11,
        11,
        &[
            "`exclude.remote_cidrs` in target `web`",
            "`10.300.0.0/16` is not a CIDR or IP address",
        ],
    );
}

#[test]
fn bad_ports() {
    let text = |port: &str| {
        format!("{HEAD}    match:\n      local_ports: [80, {port}]\n    older_than: 5m\n")
    };
    // "      local_ports: [80, " is 24 columns wide.
    assert_error(
        "port-zero",
        &text("0"),
        6,
        25,
        &[
            "`match.local_ports` in target `web`",
            "port 0 is out of range 1-65535",
        ],
    );
    assert_error(
        "port-too-big",
        &text("70000"),
        6,
        25,
        &["port 70000 is out of range 1-65535"],
    );
    assert_error(
        "port-name",
        &text("http"),
        6,
        25,
        &["`http` is not a port number (1-65535)"],
    );
}

#[test]
fn missing_older_than() {
    let text = format!("{HEAD}    match:\n      comm: ^nginx$\n");
    // Reported at the target (its first key).
    assert_error(
        "missing-older-than",
        &text,
        4,
        5,
        &["target `web` has no `older_than`", "required"],
    );
}

#[test]
fn zero_older_than() {
    let text = format!("{HEAD}    match:\n      comm: ^nginx$\n    older_than: 0s\n");
    assert_error(
        "zero-older-than",
        &text,
        7,
        17,
        &["`older_than` in target `web`", "must be greater than zero"],
    );
}

#[test]
fn duplicate_target_names() {
    let text = format!(
        "{HEAD}    match:\n      comm: ^nginx$\n    older_than: 5m\n  - name: web\n    match:\n      pid: 42\n    older_than: 5m\n"
    );
    // The second occurrence.
    assert_error(
        "duplicate-names",
        &text,
        8,
        11,
        &["duplicate target name `web`", "first used at line 4"],
    );
}

#[test]
fn empty_match() {
    let text = format!("{HEAD}    match: {{}}\n    older_than: 5m\n");
    assert_error(
        "empty-match",
        &text,
        5,
        12,
        &[
            "the `match` block of target `web` is empty",
            "would select every process",
        ],
    );
}

#[test]
fn yaml_syntax_error() {
    // An unclosed quote.
    let text = format!("{HEAD}    match:\n      comm: \"nginx\n    older_than: 5m\n");
    assert_error("syntax", &text, 6, 13, &["unclosed quote"]);
}

#[test]
fn empty_targets() {
    let text = "interval: 30s\ntargets: []\n";
    assert_error("empty-targets", text, 2, 10, &["`targets` is empty"]);
}

#[test]
fn unreadable_file() {
    let err = config::load(Path::new("/nonexistent/cwreap.yaml"))
        .expect_err("a missing file is an error")
        .to_string();
    assert!(
        err.starts_with("/nonexistent/cwreap.yaml: cannot read the policy"),
        "{err}"
    );
}
