//! Other network namespaces, SOCK_DESTROY, and connections still in an accept queue: real
//! namespaces made with `ip netns add`, real leaky servers in them, checked with `ss` run
//! inside each namespace and with what the clients observe.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::support::ss::Ss;
use crate::support::*;

#[test]
#[ignore = "needs root: creates a network namespace (ip netns add) and reaps the fixture in it with pidfd_getfd"]
fn scan_and_reap_inside_another_network_namespace() {
    let ns = Netns::create("reap");
    let mut fx = Fixture::start_in(Some(&ns.name), &["127.0.0.1:0"], &[]);
    let mut clients = ns.clients(fx.listen[0], 3);
    for _ in 0..3 {
        fx.expect_line("eof ");
    }
    // A host-namespace leak that must not be touched.
    let mut host = Fixture::start(&["127.0.0.1:0"], &[]);
    let (mut host_client, _) = host.close_wait(0);

    let pid = fx.pid().to_string();
    let their_ns = netns_of(&pid);
    assert_ne!(
        their_ns,
        netns_of("self"),
        "the fixture runs in its own namespace"
    );
    let out = cwreap(&["scan", "--pid", &pid, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let rows = json_lines(&out);
    assert_eq!(rows.len(), 3, "{}", stdout(&out));
    for r in &rows {
        assert_eq!(r["netns"].as_u64(), Some(their_ns), "{r}");
    }
    let scanned: BTreeSet<(i32, std::net::SocketAddr, std::net::SocketAddr)> = rows
        .iter()
        .map(|r| {
            (
                field_i64(r, "fd") as i32,
                field_str(r, "local").parse().expect("local"),
                field_str(r, "remote").parse().expect("remote"),
            )
        })
        .collect();
    assert_eq!(
        scanned,
        ns.ss_close_wait(fx.pid()),
        "scan vs ss inside the namespace"
    );
    // The table shows the namespace too.
    let table = stdout(&cwreap(&["scan", "--pid", &pid]));
    assert!(
        table.contains("NETNS") && table.contains(&their_ns.to_string()),
        "{table}"
    );

    let out = cwreap(&["reap", "--pid", &pid, "--older-than", "0s", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        json_lines(&out)
            .iter()
            .all(|r| field_str(r, "outcome") == "reaped")
    );
    let ends = clients.ends(3, Duration::from_secs(5));
    assert_eq!(
        ends.iter().filter(|l| l.starts_with("eof ")).count(),
        3,
        "{ends:?}"
    );
    assert!(ns.ss_close_wait(fx.pid()).is_empty());

    // The host namespace's socket is untouched.
    assert_eq!(ss_close_wait(host.pid()).len(), 1);
    assert!(!reads_eof(&mut host_client, Duration::from_millis(200)));
}

#[test]
#[ignore = "needs root: creates a network namespace (ip netns add) and destroys sockets in it with SOCK_DESTROY (CAP_NET_ADMIN)"]
fn destroy_inside_another_network_namespace() {
    let ns = Netns::create("destroy");
    let mut fx = Fixture::start_in(Some(&ns.name), &["127.0.0.1:0"], &[]);
    let mut clients = ns.clients(fx.listen[0], 2);
    fx.expect_line("eof ");
    fx.expect_line("eof ");
    let mut host = Fixture::start(&["127.0.0.1:0"], &[]);
    let _host_client = host.close_wait(0);

    let pid = fx.pid().to_string();
    // The dry run proves SOCK_DESTROY works there by destroying a loopback connection of
    // its own made inside that namespace; the fixture's sockets are untouched.
    let rows = cwreap_json(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--destroy",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().all(|r| field_str(r, "outcome") == "dry_run"),
        "{rows:?}"
    );
    assert_eq!(ns.ss_close_wait(fx.pid()).len(), 2);

    let rows = cwreap_json(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--destroy",
        "--json",
    ]);
    assert_eq!(rows.len(), 2);
    for r in &rows {
        assert_eq!(field_str(r, "action"), "destroy");
        assert_eq!(field_str(r, "outcome"), "reaped", "{r}");
    }
    let ends = clients.ends(2, Duration::from_secs(5));
    assert_eq!(
        ends.iter().filter(|l| l.starts_with("reset ")).count(),
        2,
        "RST expected: {ends:?}"
    );
    assert!(ns.ss_close_wait(fx.pid()).is_empty());
    assert_eq!(ss_close_wait(host.pid()).len(), 1, "host socket untouched");
}

#[test]
#[ignore = "needs root: destroys sockets with SOCK_DESTROY (CAP_NET_ADMIN)"]
fn destroy_on_a_host_socket_resets_the_client() {
    let mut fx = Fixture::start(&["127.0.0.1:0", "[::1]:0"], &[]);
    let (mut c4, _) = fx.close_wait(0);
    let (mut c6, _) = fx.close_wait(1);
    let (mut established, _) = fx.connect(0);
    let pid = fx.pid().to_string();

    // Dry run first: verified, nothing changes.
    let out = cwreap(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--destroy",
        "--dry-run",
        "--json",
    ]);
    assert!(
        json_lines(&out)
            .iter()
            .all(|r| field_str(r, "outcome") == "dry_run"),
        "{}",
        stdout(&out)
    );
    assert_eq!(ss_close_wait(fx.pid()).len(), 2);

    let out = cwreap(&["reap", "--pid", &pid, "--older-than", "0s", "--destroy"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("2 reaped"), "{}", stdout(&out));
    assert!(
        reads_reset(&mut c4, Duration::from_secs(5)),
        "IPv4 client got no RST"
    );
    assert!(
        reads_reset(&mut c6, Duration::from_secs(5)),
        "IPv6 client got no RST"
    );
    assert!(ss_close_wait(fx.pid()).is_empty(), "ss still shows them");
    assert!(echoes(&mut established), "ESTABLISHED connection harmed");
    assert_eq!(ss_count(fx.pid(), "listening"), 2);
}

#[test]
#[ignore = "needs root: destroys sockets with SOCK_DESTROY (CAP_NET_ADMIN)"]
fn unaccepted_connections_are_listed_and_only_destroy_reaps_them() {
    let fx = Fixture::start(&["127.0.0.1:0"], &["--no-accept"]);
    let mut clients: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let c = std::net::TcpStream::connect(fx.listen[0]).expect("connect");
            c.shutdown(std::net::Shutdown::Write).expect("half-close");
            c
        })
        .collect();
    let pid = fx.pid().to_string();
    // Wait until both show up in CLOSE_WAIT (the FIN is processed asynchronously).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let rows = loop {
        let rows = json_lines(&cwreap(&["scan", "--pid", &pid, "--json"]));
        if rows.len() == 2 || std::time::Instant::now() > deadline {
            break rows;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(rows.len(), 2, "{rows:?}");
    let listener_fd = Ss::new()
        .state("listening")
        .sport(fx.listen[0].port())
        .run()
        .iter()
        .find_map(|l| l.fd_of(fx.pid()))
        .expect("the fixture's listener in ss");

    for r in &rows {
        assert_eq!(r["unaccepted"].as_bool(), Some(true), "{r}");
        assert!(r["fd"].is_null(), "{r}");
        assert_eq!(field_i64(r, "inode"), 0);
        assert_eq!(field_i64(r, "pid"), i64::from(fx.pid()));
        assert_eq!(field_i64(r, "listener_fd"), i64::from(listener_fd), "{r}");
    }
    let table = stdout(&cwreap(&["scan", "--pid", &pid]));
    assert_eq!(table.matches("unaccepted").count(), 2, "{table}");

    // shutdown cannot reach them: skipped, with the reason.
    let out = cwreap(&["reap", "--pid", &pid, "--older-than", "0s", "--json"]);
    assert_eq!(out.status.code(), Some(0));
    for r in json_lines(&out) {
        assert_eq!(field_str(&r, "outcome"), "skipped");
        assert!(field_str(&r, "error").contains("--destroy"), "{r}");
    }
    assert_eq!(
        ss_close_wait_on_port(fx.listen[0].port()),
        2,
        "skipping changed nothing"
    );

    let rows = cwreap_json(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--destroy",
        "--json",
    ]);
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter().all(|r| field_str(r, "outcome") == "reaped"),
        "{rows:?}"
    );
    for c in clients.iter_mut() {
        assert!(reads_reset(c, Duration::from_secs(5)));
    }
    assert_eq!(ss_close_wait_on_port(fx.listen[0].port()), 0);
}

#[test]
#[ignore = "needs root: creates a network namespace (ip netns add) and destroys sockets in it with SOCK_DESTROY (CAP_NET_ADMIN)"]
fn daemon_destroys_in_another_namespace_including_unaccepted() {
    let ns = Netns::create("daemon");
    // One server that accepts and leaks, one that never accepts.
    let mut leaky = Fixture::start_in(Some(&ns.name), &["127.0.0.1:0"], &[]);
    let queue = Fixture::start_in(Some(&ns.name), &["127.0.0.1:0"], &["--no-accept"]);
    let mut leaky_clients = ns.clients(leaky.listen[0], 2);
    leaky.expect_line("eof ");
    leaky.expect_line("eof ");
    let mut queue_clients = ns.clients(queue.listen[0], 2);
    // Host-namespace leak of a process that is not a target.
    let mut host = Fixture::start(&["127.0.0.1:0"], &[]);
    let (mut host_client, _) = host.close_wait(0);

    let _d = LoggedDaemon::start(
        "netns-daemon",
        &format!(
            "interval: 300ms\ndry_run: false\nmetrics: {{listen: off}}\ntargets:\n  - name: leaky\n    match: {{pid: {}}}\n    older_than: 1s\n    action: destroy\n  - name: queue\n    match: {{pid: {}}}\n    older_than: 1s\n    action: destroy\n",
            leaky.pid(),
            queue.pid()
        ),
    );
    let ends = leaky_clients.ends(2, Duration::from_secs(10));
    assert_eq!(
        ends.iter().filter(|l| l.starts_with("reset ")).count(),
        2,
        "{ends:?}"
    );
    let ends = queue_clients.ends(2, Duration::from_secs(10));
    assert_eq!(
        ends.iter().filter(|l| l.starts_with("reset ")).count(),
        2,
        "unaccepted: {ends:?}"
    );
    assert!(ns.ss_close_wait(leaky.pid()).is_empty());
    // The host socket of a non-target is untouched.
    assert_eq!(ss_close_wait(host.pid()).len(), 1);
    assert!(!reads_eof(&mut host_client, Duration::from_millis(200)));
}
