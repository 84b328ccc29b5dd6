//! The shipped systemd unit: the lines the daemon relies on, and its hardening as rated by
//! `systemd-analyze security --offline=true`.
//!
//! The rating cannot reach 1.0: the capabilities, pidfd_getfd, AF_NETLINK/AF_INET, the host
//! network and the host user namespace that cwreap needs alone are worth 1.70 (the unit
//! file lists each entry's cost). The test pins the rating reached, 1.9, and the exact set of
//! entries allowed to be exposed, so any loosening fails here. CAP_NET_ADMIN (SOCK_DESTROY)
//! is in the opt-in `destroy` drop-in, not in the default unit.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Best rating reachable with what cwreap needs (systemd 252); see the unit's header.
const MAX_EXPOSURE: f64 = 1.9;

/// The rating with the events drop-in (CAP_BPF, CAP_PERFMON, bpf()): 2.0 with systemd 252.
const MAX_EXPOSURE_EVENTS: f64 = 2.1;

/// Entries `systemd-analyze security` may flag, each needed by cwreap or imposed by systemd.
const ALLOWED_EXPOSED: &[&str] = &[
    "PrivateNetwork=",                                     // host sockets
    "PrivateUsers=",                                       // capabilities on the host
    "RestrictAddressFamilies=~AF_(INET|INET6)",            // metrics, duplicated sockets
    "RestrictAddressFamilies=~AF_NETLINK",                 // sock_diag
    "RestrictAddressFamilies=~AF_UNIX",                    // sd_notify
    "CapabilityBoundingSet=~CAP_SYS_PTRACE",               // pidfd_getfd
    "CapabilityBoundingSet=~CAP_(DAC_*|FOWNER|IPC_OWNER)", // CAP_DAC_READ_SEARCH
    "AmbientCapabilities=",                                // non-root user with caps
    "SystemCallFilter=~@debug",                            // pidfd_getfd only
    "RestrictNamespaces=~net",                             // setns into containers
    "DeviceAllow=",                                        // char-rtc, from ProtectClock=yes
    "RootDirectory=/RootImage=",                           // runs from the host's /usr/bin
    "IPAddressDeny=",                                      // localhost allowed (metrics)
];

fn unit_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/cwreap.service")
}

fn unit_text() -> String {
    let p = unit_path();
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// The unit's `Key=value` settings, comments and section headers left out.
fn settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn values<'a>(s: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    s.iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .collect()
}

fn one<'a>(s: &'a [(String, String)], key: &str) -> &'a str {
    match values(s, key).as_slice() {
        [v] => v,
        other => panic!("expected exactly one {key}=, found {other:?}"),
    }
}

fn words(v: &str) -> Vec<&str> {
    let mut w: Vec<&str> = v.split_whitespace().collect();
    w.sort_unstable();
    w
}

#[test]
fn unit_has_the_lines_the_daemon_relies_on() {
    let s = settings(&unit_text());
    assert_eq!(one(&s, "Type"), "notify");
    assert_eq!(
        one(&s, "ExecStart"),
        "/usr/bin/cwreap run --config /etc/cwreap/cwreap.yaml"
    );
    assert_eq!(one(&s, "ExecReload"), "/bin/kill -HUP $MAINPID");
    assert_eq!(one(&s, "WatchdogSec"), "30s");
    assert_eq!(one(&s, "Restart"), "on-failure");
    assert_eq!(one(&s, "NoNewPrivileges"), "yes");
    assert_eq!(one(&s, "UMask"), "0077");

    // It must see the host's sockets.
    for v in values(&s, "PrivateNetwork") {
        assert!(
            matches!(v, "no" | "false" | "0" | "off"),
            "PrivateNetwork={v}: cwreap must see the host's sockets"
        );
    }
    // It must see other users' processes: only "ptraceable" (all of them, given
    // CAP_SYS_PTRACE) or the default.
    for v in values(&s, "ProtectProc") {
        assert!(
            matches!(v, "ptraceable" | "default"),
            "ProtectProc={v} would hide the target processes"
        );
    }

    let caps = ["CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"];
    assert_eq!(words(one(&s, "CapabilityBoundingSet")), caps);
    assert_eq!(words(one(&s, "AmbientCapabilities")), caps);

    let families = words(one(&s, "RestrictAddressFamilies"));
    assert_eq!(families, ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]);
    assert_eq!(one(&s, "RestrictNamespaces"), "net");

    // pidfd_getfd (in @debug) allowed, and not denied again by a `~` line.
    let filters = values(&s, "SystemCallFilter");
    let allow: Vec<&str> = filters
        .iter()
        .filter(|v| !v.starts_with('~'))
        .flat_map(|v| v.split_whitespace())
        .collect();
    for call in [
        "pidfd_getfd",
        "pidfd_open",
        "pidfd_send_signal",
        "@system-service",
    ] {
        assert!(
            allow.contains(&call),
            "SystemCallFilter does not allow {call}"
        );
    }
    for deny in filters.iter().filter_map(|v| v.strip_prefix('~')) {
        for d in deny.split_whitespace() {
            assert!(
                !matches!(d, "pidfd_getfd" | "pidfd_open" | "@debug" | "@process"),
                "SystemCallFilter=~ denies {d}, which cwreap needs"
            );
        }
    }
}

/// `systemd-analyze` with `args`, or None (skip) when it is not installed outside CI.
fn systemd_analyze(args: &[&str]) -> Option<String> {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let out = match Command::new("systemd-analyze").args(args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if ci {
                panic!(
                    "systemd-analyze is not installed; CI must install it \
                     (Debian/Ubuntu: apt-get install -y systemd) to rate the unit's hardening"
                );
            }
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                b"SKIP hardening_rating: systemd-analyze is not installed (apt-get install systemd)\n",
            );
            return None;
        }
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "systemd-analyze {args:?} failed ({}): {}{}",
        out.status,
        stdout,
        String::from_utf8_lossy(&out.stderr)
    );
    Some(stdout)
}

/// The number in "Overall exposure level for cwreap.service: 2.1 OK".
fn overall_exposure(report: &str) -> Option<f64> {
    let line = report
        .lines()
        .find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.rsplit_once(": ")?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn parses_the_overall_line() {
    let sample =
        "  NAME  DESCRIPTION  EXPOSURE\n\n→ Overall exposure level for cwreap.service: 2.1 OK 🙂\n";
    assert_eq!(overall_exposure(sample), Some(2.1));
    assert_eq!(overall_exposure("no such line"), None);
}

#[test]
fn hardening_rating() {
    let unit = unit_path();
    let unit = unit.to_str().expect("UTF-8 path");
    let Some(report) = systemd_analyze(&["security", "--offline=true", unit]) else {
        return;
    };
    let exposure = overall_exposure(&report)
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{report}"));
    assert!(
        exposure <= MAX_EXPOSURE,
        "overall exposure {exposure} > {MAX_EXPOSURE}:\n{report}"
    );

    let Some(json) = systemd_analyze(&["security", "--offline=true", "--json=short", unit]) else {
        return;
    };
    let items: Vec<serde_json::Value> = serde_json::from_str(&json).expect("JSON report");
    let exposed: Vec<&str> = items
        .iter()
        .filter(|i| !i["exposure"].is_null())
        .filter_map(|i| i["name"].as_str())
        .collect();
    let unexpected: Vec<&&str> = exposed
        .iter()
        .filter(|n| !ALLOWED_EXPOSED.contains(n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "newly exposed: {unexpected:?}\n{report}"
    );
}

/// The opt-in drop-ins: exactly these, each adding only what its feature needs, and none
/// letting cwreap trace a process (the daemon never closes fds inside a target).
#[test]
fn drop_ins_add_only_what_their_feature_needs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/drop-ins");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("systemd/drop-ins")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "containers.conf",
            "destroy.conf",
            "escalate.conf",
            "events.conf"
        ]
    );
    let expect: &[(&str, &[&str], Option<&str>)] = &[
        ("containers.conf", &["CAP_SYS_ADMIN"], Some("setns")),
        ("destroy.conf", &["CAP_NET_ADMIN"], None),
        ("escalate.conf", &["CAP_KILL", "CAP_SYS_RESOURCE"], None),
        ("events.conf", &["CAP_BPF", "CAP_PERFMON"], Some("bpf")),
    ];
    for (name, caps, calls) in expect {
        let text = std::fs::read_to_string(dir.join(name)).expect("drop-in");
        let s = settings(&text);
        assert_eq!(words(one(&s, "CapabilityBoundingSet")), *caps, "{name}");
        assert_eq!(words(one(&s, "AmbientCapabilities")), *caps, "{name}");
        let filters = values(&s, "SystemCallFilter");
        assert_eq!(filters, calls.iter().copied().collect::<Vec<_>>(), "{name}");
        for forbidden in ["ptrace", "process_vm_readv", "@debug"] {
            assert!(
                !text.contains(&format!("={forbidden}")),
                "{name} allows {forbidden}"
            );
        }
        // Each says how to install it from where the package puts it.
        assert!(
            text.contains(&format!("/usr/share/cwreap/drop-ins/{name}")),
            "{name} does not say how to install it"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The events drop-in: BPF discovery under the unit.

fn drop_in_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd/drop-ins")
        .join(name)
}

/// A directory of the test's own; removed on drop.
struct TempTree(PathBuf);

impl TempTree {
    fn new(tag: &str) -> TempTree {
        let dir = std::env::temp_dir().join(format!("cwreap-unit-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        TempTree(dir)
    }

    /// Write `text` at `rel`, creating its directories.
    fn put(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().expect("a parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        p
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn events_text() -> String {
    std::fs::read_to_string(drop_in_path("events.conf")).expect("events.conf")
}

#[test]
fn events_drop_in_opens_only_the_pin_directory_and_creates_it() {
    let s = settings(&events_text());
    // The pins' directory, writable though ProtectSystem=strict makes /sys read-only; "-":
    // a host without the BPF filesystem starts the unit anyway (and polls).
    assert_eq!(values(&s, "ReadWritePaths"), ["-/sys/fs/bpf/cwreap"]);
    // Created before each start as root ("+"), owned by the unit's dynamic user, named
    // after the unit; "-": its failure does not stop the unit.
    let pre = one(&s, "ExecStartPre");
    assert_eq!(
        pre,
        "-+/usr/bin/install -d -m 0700 -o cwreap -g cwreap /sys/fs/bpf/cwreap"
    );
    let unit = settings(&unit_text());
    assert_eq!(one(&unit, "DynamicUser"), "yes");
    // The default unit stays without BPF: no capability, bpf() denied with @privileged.
    assert!(!unit_text().contains("CAP_BPF") && !unit_text().contains("CAP_PERFMON"));
    assert!(
        values(&unit, "SystemCallFilter")
            .iter()
            .any(|v| v.starts_with('~') && v.contains("@privileged")),
        "the default unit denies @privileged (bpf among it)"
    );
    assert!(values(&unit, "ReadWritePaths").is_empty());
}

#[test]
fn events_drop_in_rating_and_bpf_allowed() {
    let tree = TempTree::new("events-rating");
    let unit = tree.put("cwreap.service", &unit_text());
    tree.put("cwreap.service.d/events.conf", &events_text());
    let unit = unit.to_str().expect("UTF-8 path");
    let Some(report) = systemd_analyze(&["security", "--offline=true", unit]) else {
        return;
    };
    let exposure = overall_exposure(&report)
        .unwrap_or_else(|| panic!("no overall exposure line in:\n{report}"));
    let base = systemd_analyze(&[
        "security",
        "--offline=true",
        unit_path().to_str().expect("UTF-8"),
    ])
    .and_then(|r| overall_exposure(&r))
    .expect("the default unit's rating");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("events_drop_in_rating_and_bpf_allowed: exposure {base} (unit) -> {exposure} (unit + events.conf)\n").as_bytes(),
    );
    assert!(
        exposure <= MAX_EXPOSURE_EVENTS,
        "with events.conf: overall exposure {exposure} > {MAX_EXPOSURE_EVENTS}:\n{report}"
    );
    let Some(json) = systemd_analyze(&["security", "--offline=true", "--json=short", unit]) else {
        return;
    };
    let items: Vec<serde_json::Value> = serde_json::from_str(&json).expect("JSON report");
    let exposed: Vec<&str> = items
        .iter()
        .filter(|i| !i["exposure"].is_null())
        .filter_map(|i| i["name"].as_str())
        .collect();
    // Exactly two more entries than the default unit: what BPF needs.
    let added = [
        "SystemCallFilter=~@privileged",
        "CapabilityBoundingSet=~CAP_BPF",
    ];
    for a in added {
        assert!(
            exposed.contains(&a),
            "{a} not exposed: bpf() is not allowed?\n{report}"
        );
    }
    let unexpected: Vec<&&str> = exposed
        .iter()
        .filter(|n| !ALLOWED_EXPOSED.contains(n) && !added.contains(n))
        .collect();
    assert!(
        unexpected.is_empty(),
        "newly exposed: {unexpected:?}\n{report}"
    );
}

#[test]
fn unit_with_events_drop_in_verifies() {
    // A root of the test's own: the unit and drop-in where systemd reads them, and stand-ins
    // for the programs and targets they name (verify checks that commands are executable).
    let tree = TempTree::new("events-verify");
    tree.put("etc/systemd/system/cwreap.service", &unit_text());
    tree.put(
        "etc/systemd/system/cwreap.service.d/events.conf",
        &events_text(),
    );
    for t in ["sysinit", "basic", "network", "multi-user", "shutdown"] {
        tree.put(
            &format!("etc/systemd/system/{t}.target"),
            &format!("[Unit]\nDescription={t}\n"),
        );
    }
    for exe in ["usr/bin/cwreap", "bin/kill", "usr/bin/install"] {
        let p = tree.put(exe, "#!/bin/sh\n");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let root = format!("--root={}", tree.0.display());
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    let out = match Command::new("systemd-analyze")
        .args(["verify", &root, "cwreap.service"])
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound && !ci => return,
        Err(e) => panic!("running systemd-analyze: {e}"),
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && err.trim().is_empty(),
        "systemd-analyze verify ({}): {err}",
        out.status
    );
}
