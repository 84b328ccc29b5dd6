//! `cwreap check` says whether `run` could bind `metrics.listen`: an address another
//! program listens on is an error naming it and why, one a running cwreap serves is fine
//! (the daemon being replaced keeps it), and so is a privileged port, which the shipped
//! unit's transient user cannot bind.

use std::net::{SocketAddr, TcpListener};
use std::process::Command;

use crate::support::metrics::free_addr;
use crate::support::*;

fn check(test: &str, listen: &str) -> (Option<i32>, String, String) {
    let scratch = Scratch::new(test, 0o700);
    let cfg = scratch.path("cwreap.yaml");
    write_policy(
        &cfg,
        &format!(
            "dry_run: true\nmetrics: {{listen: \"{listen}\"}}\ntargets:\n  - {{name: t, match: {{comm: '^no-such-process$'}}, older_than: 1m}}\n"
        ),
    );
    let out = Command::new(cwreap_bin())
        .arg("check")
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run cwreap check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_fails_on_a_metrics_address_another_program_listens_on() {
    let busy = TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = busy.local_addr().expect("addr");
    let (code, out, err) = check("check-listen-busy", &addr.to_string());
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains(&addr.to_string()), "{err}");
    assert!(err.contains("in use by another program"), "{err}");
    drop(busy);
    let (code, out, err) = check("check-listen-free", &addr.to_string());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("OK"), "{out}");
}

#[test]
fn check_accepts_the_address_a_running_cwreap_serves() {
    let addr: SocketAddr = free_addr();
    let mut d = LoggedDaemon::start(
        "check-listen-daemon",
        &format!(
            "interval: 1s\ndry_run: true\ndiscovery: poll\nmetrics: {{listen: \"{addr}\"}}\ntargets:\n  - {{name: t, match: {{comm: '^no-such-process$'}}, older_than: 1m}}\n"
        ),
    );
    d.wait_for("the metrics endpoint", |_| {
        crate::support::metrics::scrape(addr)
            .filter(|t| t.contains("cwreap_build_info"))
            .map(|_| ())
    });
    let (code, out, err) = check("check-listen-cwreap", &addr.to_string());
    assert_eq!(code, Some(0), "{out}{err}\n{}", d.log());
}

#[test]
#[ignore = "needs root: as root, check speaks for the shipped unit, whose transient user has no CAP_NET_BIND_SERVICE"]
fn check_fails_on_a_privileged_metrics_port() {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .expect("sysctl")
        .trim()
        .parse()
        .expect("a port number");
    assert!(
        start > 1,
        "this host has no privileged ports (ip_unprivileged_port_start = {start})"
    );
    let addr = format!("127.0.0.1:{}", start - 1);
    let (code, out, err) = check("check-listen-privileged", &addr);
    assert_eq!(code, Some(2), "{out}{err}");
    assert!(err.contains(&addr), "{err}");
    assert!(err.contains("privileged"), "{err}");
    assert!(err.contains("CAP_NET_BIND_SERVICE"), "{err}");
}
