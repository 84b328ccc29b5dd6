//! Unit tests of the pure part of `explain`, on plain values.

use super::*;

fn ev(recv_q: u32, watched: bool, unaccepted: bool) -> Evidence {
    Evidence {
        recv_q,
        watched,
        unaccepted,
        dead: false,
        outgoing: false,
    }
}

/// The evidence of a client's end.
fn out(recv_q: u32, watched: bool) -> Evidence {
    Evidence {
        outgoing: true,
        ..ev(recv_q, watched, false)
    }
}

/// A process whose runtime explain could not tell.
fn unknown_rt() -> Identified {
    runtime::unknown("its memory map could not be read in time")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn sock(pid: i32, fd: i32, remote: &str, local_port: u16, e: Evidence) -> Socket {
    Socket {
        pid,
        fd: (!e.unaccepted).then_some(fd),
        inode: if e.unaccepted { 0 } else { 1000 + fd as u64 },
        local: addr(&format!("10.0.0.1:{local_port}")),
        remote: addr(remote),
        evidence: e,
        age_min_ms: 60_000,
    }
}

fn proc(pid: i32, comm: &str, open_fds: usize, limit: Option<u64>) -> ProcessFacts {
    ProcessFacts {
        pid,
        comm: comm.into(),
        open_fds,
        fd_limit: limit,
        runtime: unknown_rt(),
        full_gc: None,
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[test]
fn pattern_from_evidence() {
    let of = |e| Pattern::of(e, Runtime::Unknown);
    assert_eq!(of(ev(0, true, false)), Pattern::EofIgnored);
    assert_eq!(of(ev(1, true, false)), Pattern::NotRead);
    assert_eq!(of(ev(4097, true, false)), Pattern::NotRead);
    assert_eq!(of(ev(0, false, false)), Pattern::EofUnwatched);
    assert_eq!(of(ev(1, false, false)), Pattern::Abandoned);
    assert_eq!(of(ev(20, false, false)), Pattern::Abandoned);
    // In the accept queue, whatever the rest says.
    assert_eq!(of(ev(1, false, true)), Pattern::Unaccepted);
    assert_eq!(of(ev(0, true, true)), Pattern::Unaccepted);
    let names: Vec<&str> = Pattern::ALL.iter().map(|p| p.name()).collect();
    assert_eq!(
        names,
        [
            "eof_ignored",
            "not_read",
            "eof_unwatched",
            "abandoned",
            "pool_idle",
            "unaccepted",
            "dead_held"
        ]
    );
    // Go's poller keeps dropped connections registered: said where it shows, when the
    // runtime is not known.
    for p in Pattern::ALL {
        let go =
            advice::advice(p, Runtime::Unknown).contains("Go keeps an fd registered until Close()");
        assert_eq!(
            go,
            matches!(p, Pattern::EofIgnored | Pattern::NotRead),
            "{p:?}"
        );
    }
}

#[test]
fn serde_names_match() {
    for p in Pattern::ALL {
        assert_eq!(
            serde_json::to_value(p).expect("json"),
            serde_json::json!(p.name())
        );
    }
    let counts = serde_json::to_value(PatternCounts::default()).expect("json");
    let keys: Vec<&String> = counts.as_object().expect("object").keys().collect();
    assert_eq!(keys.len(), 7);
    for p in Pattern::ALL {
        assert_eq!(counts[p.name()], 0, "{p:?}");
    }
}

#[test]
fn remotes_by_host_with_the_port_they_share() {
    let remotes: Vec<SocketAddr> = [
        "10.0.0.5:5432",
        "10.0.0.5:5432",
        "[::ffff:10.0.0.5]:5432",
        "10.0.0.6:40001",
        "10.0.0.6:40002",
        "[2001:db8::1]:443",
        "[2001:db8::1]:443",
        "10.0.0.7:40003",
    ]
    .iter()
    .map(|a| addr(a))
    .collect();
    let top = top_remotes(&remotes, 5);
    let shown: Vec<String> = top.iter().map(ToString::to_string).collect();
    // A pool to one service keeps its port; clients (varying ports) and a single socket
    // are shown by host only.
    assert_eq!(
        shown,
        [
            "10.0.0.5:5432 (3)",
            "10.0.0.6 (2)",
            "[2001:db8::1]:443 (2)",
            "10.0.0.7 (1)"
        ]
    );
    let json = serde_json::to_value(&top[0]).expect("json");
    assert_eq!(
        json,
        serde_json::json!({"addr": "10.0.0.5", "port": 5432, "count": 3})
    );
    assert!(serde_json::to_value(&top[1]).expect("json")["port"].is_null());
}

#[test]
fn top_counts_most_first_ties_by_key() {
    assert_eq!(
        top([3, 1, 3, 2, 2, 3, 9], 2),
        vec![(3, 3), (2, 2)],
        "ties and truncation"
    );
    assert_eq!(top([5, 4], 5), vec![(4, 1), (5, 1)]);
    assert!(top(Vec::<u16>::new(), 5).is_empty());
    assert_eq!(
        remote_host(&addr("[::ffff:10.1.2.3]:80")),
        "10.1.2.3".parse::<IpAddr>().expect("ip")
    );
    assert_eq!(
        remote_host(&addr("[::1]:80")),
        "::1".parse::<IpAddr>().expect("ip")
    );
}

/// Three samples a second apart; cookies tell sockets apart, even when an inode or a
/// 4-tuple would repeat.
#[test]
fn arrivals_by_cookie_and_fd_growth() {
    let s0 = Sample {
        at: secs(0),
        sockets: vec![((1, 10), Some(7)), ((1, 11), Some(7)), ((1, 12), None)],
        open_fds: BTreeMap::from([(7, 100)]),
    };
    let s1 = Sample {
        at: secs(1),
        // 11 closed; 13 and 14 new for 7; 12 got an owner (not new); same cookie in
        // another namespace is another socket.
        sockets: vec![
            ((1, 10), Some(7)),
            ((1, 12), Some(8)),
            ((1, 13), Some(7)),
            ((2, 10), Some(8)),
            ((1, 14), Some(7)),
        ],
        open_fds: BTreeMap::from([(7, 102), (8, 50)]),
    };
    let s2 = Sample {
        at: secs(2),
        // 11 comes back (cannot: cookies are not reused) and so is not new; 15 has no owner.
        sockets: vec![((1, 11), Some(7)), ((1, 15), None), ((1, 16), Some(8))],
        open_fds: BTreeMap::from([(7, 104), (8, 49)]),
    };
    let t = trends(&[s0.clone(), s1, s2]);
    assert_eq!(t.samples, 3);
    assert_eq!(t.window, Some(secs(2)));
    assert_eq!(t.arrivals, BTreeMap::from([(7, 2), (8, 2)]));
    assert_eq!(
        t.fds[&7],
        FdTrend {
            first: 100,
            last: 104,
            span: secs(2)
        }
    );
    assert_eq!(
        t.fds[&8],
        FdTrend {
            first: 50,
            last: 49,
            span: secs(1)
        }
    );
    let one = trends(&[s0]);
    assert_eq!(one.window, None);
    assert!(one.arrivals.is_empty());
    assert_eq!(trends(&[]), Trends::default());
}

#[test]
fn rate_and_forecast() {
    assert_eq!(leak_per_min(10, Some(secs(5))), Some(120.0));
    assert_eq!(leak_per_min(0, Some(secs(5))), Some(0.0));
    assert_eq!(leak_per_min(3, None), None);
    assert_eq!(leak_per_min(3, Some(Duration::ZERO)), None);
    let grow = |first, last, s| FdTrend {
        first,
        last,
        span: secs(s),
    };
    // +10 fds in 5 s = 2/s; 1100 - 100 = 1000 left: 500 s.
    assert_eq!(emfile_in_s(&grow(90, 100, 5), Some(1100)), Some(500.0));
    // The example of the brief: 61200/65536 at +38/min is ~1h54m.
    let s = emfile_in_s(&grow(61200 - 38, 61200, 60), Some(65536)).expect("forecast");
    assert_eq!(human_age((s * 1000.0) as u64), "1h54m");
    assert_eq!(
        emfile_in_s(&grow(100, 100, 5), Some(1100)),
        None,
        "no growth"
    );
    assert_eq!(
        emfile_in_s(&grow(100, 90, 5), Some(1100)),
        None,
        "shrinking"
    );
    assert_eq!(emfile_in_s(&grow(90, 100, 5), None), None, "unlimited");
    assert_eq!(
        emfile_in_s(&grow(90, 100, 0), Some(1100)),
        None,
        "one sample"
    );
    assert_eq!(emfile_in_s(&grow(1090, 1200, 5), Some(1100)), Some(0.0));
}

fn fixture() -> (Vec<Socket>, Vec<ProcessFacts>) {
    let sockets = vec![
        sock(7, 5, "10.0.0.9:40001", 8080, ev(1, false, false)),
        sock(7, 6, "10.0.0.9:40002", 8080, ev(1, false, false)),
        sock(7, 7, "[::ffff:10.0.0.8]:40003", 8080, ev(3, false, false)),
        sock(7, 8, "10.0.0.8:40004", 9090, ev(0, true, false)),
        sock(7, 3, "10.0.0.7:40005", 8080, ev(1, false, true)),
        sock(8, 9, "10.0.0.7:40006", 443, ev(1, true, false)),
        sock(8, 10, "10.0.0.7:40007", 443, ev(0, false, false)),
        // Held by a process we know nothing of: left out.
        sock(99, 4, "10.0.0.7:40008", 443, ev(0, false, false)),
    ];
    let procs = vec![
        proc(8, "node", 200, Some(1024)),
        proc(7, "game-srv", 61200, Some(65536)),
    ];
    (sockets, procs)
}

#[test]
fn reports_group_per_process() {
    let (sockets, procs) = fixture();
    let reports = explain(&sockets, &procs, &trends(&[Sample::default()]));
    assert_eq!(reports.len(), 2);
    let r = &reports[0];
    assert_eq!((r.pid, r.close_wait), (7, 5));
    assert_eq!(
        r.patterns,
        PatternCounts {
            eof_ignored: 1,
            not_read: 0,
            eof_unwatched: 0,
            abandoned: 3,
            pool_idle: 0,
            unaccepted: 1,
            dead_held: 0,
        }
    );
    assert_eq!(
        r.top_remotes,
        vec![
            RemoteCount {
                addr: "10.0.0.8".parse().expect("ip"),
                port: None,
                count: 2
            },
            RemoteCount {
                addr: "10.0.0.9".parse().expect("ip"),
                port: None,
                count: 2
            },
            RemoteCount {
                addr: "10.0.0.7".parse().expect("ip"),
                port: None,
                count: 1
            },
        ]
    );
    assert_eq!(
        r.top_local_ports,
        vec![
            PortCount {
                port: 8080,
                count: 4
            },
            PortCount {
                port: 9090,
                count: 1
            }
        ]
    );
    // Sockets by pattern, then fd; the unaccepted one has no fd.
    let order: Vec<(Pattern, Option<i32>)> = r.sockets.iter().map(|s| (s.pattern, s.fd)).collect();
    assert_eq!(
        order,
        vec![
            (Pattern::EofIgnored, Some(8)),
            (Pattern::Abandoned, Some(5)),
            (Pattern::Abandoned, Some(6)),
            (Pattern::Abandoned, Some(7)),
            (Pattern::Unaccepted, None),
        ]
    );
    // One sample: no rate, no forecast.
    assert_eq!(
        (r.leak_per_min, r.emfile_in_s, r.arrivals),
        (None, None, None)
    );
    let n = &reports[1];
    assert_eq!(n.pid, 8);
    assert_eq!((n.patterns.not_read, n.patterns.eof_unwatched), (1, 1));
}

#[test]
fn reports_carry_rate_and_forecast() {
    let (sockets, procs) = fixture();
    let mut t = Trends {
        samples: 61,
        window: Some(secs(60)),
        ..Trends::default()
    };
    t.arrivals.insert(7, 38);
    t.fds.insert(
        7,
        FdTrend {
            first: 61200 - 38,
            last: 61200,
            span: secs(60),
        },
    );
    t.fds.insert(
        8,
        FdTrend {
            first: 200,
            last: 200,
            span: secs(60),
        },
    );
    let reports = explain(&sockets, &procs, &t);
    let r = &reports[0];
    assert_eq!(r.leak_per_min, Some(38.0));
    // 4336 fds left at 38 a minute.
    assert_eq!(r.emfile_in_s, Some(6846));
    assert_eq!(r.fd_growth, Some(38));
    assert_eq!(
        forecast_line(r),
        "pid 7 (game-srv): +38 CLOSE_WAIT/min, 61200/65536 fds, EMFILE in ~1h54m"
    );
    // No arrivals and no growth: a rate of 0, no forecast.
    let n = &reports[1];
    assert_eq!((n.leak_per_min, n.emfile_in_s), (Some(0.0), None));
    assert_eq!(
        forecast_line(n),
        "pid 8 (node): +0 CLOSE_WAIT/min, 200/1024 fds, no fd growth"
    );

    let json = serde_json::to_value(r).expect("json");
    for key in [
        "pid",
        "comm",
        "patterns",
        "leak_per_min",
        "emfile_in_s",
        "open_fds",
        "fd_limit",
        "top_remotes",
        "top_local_ports",
        "sockets",
    ] {
        assert!(json.get(key).is_some(), "no {key} in {json}");
    }
    assert_eq!(json["patterns"]["abandoned"], 3);
    assert_eq!(json["top_remotes"][0]["addr"], "10.0.0.8");
    assert_eq!(json["top_local_ports"][0]["port"], 8080);
    let s = &json["sockets"][1];
    assert_eq!(s["fd"], 5);
    assert_eq!(s["local"], "10.0.0.1:8080");
    assert_eq!(s["remote"], "10.0.0.9:40001");
    assert_eq!(s["recv_q"], 1);
    assert_eq!(s["watched"], false);
    assert_eq!(s["pattern"], "abandoned");
    assert!(json["sockets"][4]["fd"].is_null());
    let one =
        serde_json::to_value(&explain(&sockets, &procs, &Trends::default())[0]).expect("json");
    assert!(one["leak_per_min"].is_null() && one["emfile_in_s"].is_null());
}

#[test]
fn text_report_patterns_then_figures() {
    let (sockets, procs) = fixture();
    let one = render(&explain(&sockets, &procs, &trends(&[Sample::default()])));
    let lines: Vec<&str> = one.lines().collect();
    assert_eq!(lines[0], "pid 7 (game-srv): 5 CLOSE_WAIT socket(s)");
    assert!(
        lines[1].starts_with("      1  eof_ignored (watched, recv_q 0): the event loop"),
        "{one}"
    );
    assert!(
        lines[2].starts_with("         check the read()==0 branch."),
        "{one}"
    );
    assert!(!one.contains("Forecast"), "{one}");
    let t = Trends {
        samples: 6,
        window: Some(secs(5)),
        arrivals: BTreeMap::from([(8, 1)]),
        fds: BTreeMap::from([(
            8,
            FdTrend {
                first: 190,
                last: 200,
                span: secs(5),
            },
        )]),
    };
    let measured = render(&explain(&sockets, &procs, &t));
    let tail: Vec<&str> = measured
        .lines()
        .skip_while(|l| !l.starts_with("Forecast"))
        .collect();
    assert_eq!(
        tail,
        [
            "Forecast, soonest EMFILE first:",
            "  pid 8 (node): +12 CLOSE_WAIT/min, 200/1024 fds, EMFILE in ~6m52s",
            "  pid 7 (game-srv): +0 CLOSE_WAIT/min, 61200/65536 fds, no fd growth",
        ],
        "{measured}"
    );
    assert!(
        measured.contains(
            "  rate: +12 CLOSE_WAIT/min, 200/1024 fds, EMFILE in ~6m52s\n  measured: 1 new \
CLOSE_WAIT and +10 fds in 5s (6 samples)\n"
        ),
        "{measured}"
    );
    let at = |needle: &str| {
        one.find(needle)
            .unwrap_or_else(|| panic!("no {needle:?} in\n{one}"))
    };
    assert!(at("abandoned (not watched, recv_q ≥ 1): no code") < at("CLOSE_WAIT/min unknown"));
    assert!(at("  rate: CLOSE_WAIT/min unknown") < at("top remotes: 10.0.0.8 (2)"));
    assert!(at("top local ports: 8080 (4), 9090 (1)") > 0);
    assert!(one.contains("Run with --for 30s"), "{one}");
    assert!(one.lines().all(|l| l.chars().count() <= WIDTH), "{one}");
    let first_block = one.split("\n\n").next().unwrap_or("");
    assert!(
        !first_block.contains("not_read") && !first_block.contains("eof_unwatched"),
        "patterns with no socket are left out:\n{first_block}"
    );
}

#[test]
fn a_dead_held_socket_has_its_own_pattern_and_count() {
    let dead = Evidence {
        dead: true,
        ..ev(0, false, false)
    };
    assert_eq!(Pattern::of(dead, Runtime::Unknown), Pattern::DeadHeld);
    assert!(
        advice::advice(Pattern::DeadHeld, Runtime::Unknown).contains("Only close() or a restart")
    );
    let sockets = [
        Socket {
            pid: 7,
            fd: Some(4),
            inode: 1,
            local: addr("10.0.0.1:80"),
            remote: addr("10.0.0.2:5000"),
            evidence: ev(1, false, false),
            age_min_ms: 1000,
        },
        Socket {
            pid: 7,
            fd: Some(5),
            inode: 2,
            local: addr("10.0.0.1:80"),
            remote: addr("0.0.0.0:0"),
            evidence: dead,
            age_min_ms: 1000,
        },
    ];
    let procs = [ProcessFacts {
        pid: 7,
        comm: "srv".into(),
        open_fds: 10,
        fd_limit: Some(100),
        runtime: unknown_rt(),
        full_gc: None,
    }];
    let r = &explain(&sockets, &procs, &trends(&[Sample::default()]))[0];
    assert_eq!((r.close_wait, r.dead, r.patterns.dead_held), (1, 1, 1));
    assert!(
        r.top_remotes.iter().all(|t| !t.addr.is_unspecified()),
        "a dead socket has no peer to count"
    );
}

/// What explain says where a collection can close a socket the program dropped.
const GC_HINT: &str = "GC may close";

#[test]
fn advice_fits_the_runtime() {
    let runtimes = [
        Runtime::Jvm,
        Runtime::Node,
        Runtime::Python,
        Runtime::Go,
        Runtime::Other,
        Runtime::Unknown,
    ];
    for p in Pattern::ALL {
        for rt in runtimes {
            let a = advice::advice(p, rt);
            // The GC hint belongs to the collector's notes, never to a pattern.
            assert!(!a.contains(GC_HINT), "{p:?} {rt:?}: {a}");
            if p == Pattern::PoolIdle {
                assert!(
                    a.contains("safe to reap") && a.contains("next checkout"),
                    "{rt:?}: {a}"
                );
            }
        }
    }
    let eof = |rt| advice::advice(Pattern::EofUnwatched, rt);
    assert!(eof(Runtime::Node).contains("allowHalfOpen"));
    for rt in [Runtime::Jvm, Runtime::Python, Runtime::Other] {
        assert!(
            !eof(rt).contains("allowHalfOpen") && !eof(rt).contains("Node"),
            "{rt:?}: {}",
            eof(rt)
        );
    }
    assert!(eof(Runtime::Other).contains("read() returned 0"));
    assert!(eof(Runtime::Other).contains("close(fd)"));
    assert!(eof(Runtime::Jvm).contains("try-with-resources"));
    assert!(eof(Runtime::Python).contains("still referenced"));
    let paused = advice::advice(Pattern::NotRead, Runtime::Node);
    assert!(paused.contains("paused") && paused.contains("backpressure"));

    // The collector's notes: a JVM's say what a full collection tells; Go's may; the rest
    // have no collector that closes sockets.
    let may = advice::gc_note(Runtime::Jvm, true, 2, 7).expect("a JVM note");
    assert!(
        may.contains(GC_HINT) && may.contains("jcmd 7 GC.run"),
        "{may}"
    );
    let kept = advice::gc_note(Runtime::Jvm, false, 1, 7).expect("a JVM note");
    assert!(
        !kept.contains(GC_HINT)
            && kept.contains("survived a full collection")
            && kept.contains("still references"),
        "{kept}"
    );
    assert!(
        advice::gc_note(Runtime::Go, true, 1, 7)
            .expect("a Go note")
            .contains(GC_HINT)
    );
    for rt in [
        Runtime::Python,
        Runtime::Node,
        Runtime::Other,
        Runtime::Unknown,
    ] {
        for may in [true, false] {
            assert_eq!(advice::gc_note(rt, may, 1, 7), None, "{rt:?}");
        }
    }
}

fn jvm_process(full_gc: Option<FullGc>) -> ProcessFacts {
    ProcessFacts {
        runtime: Identified {
            runtime: Runtime::Jvm,
            clue: "libjvm.so in its memory map".into(),
        },
        full_gc,
        ..proc(9, "java", 40, Some(4096))
    }
}

#[test]
fn a_jvm_report_tells_what_a_full_collection_proved() {
    // One full collection started 10 s ago.
    let ran = FullGc {
        full_collections: 1,
        last_started_ms_ago: Some(10_000),
        last_ended_ms_ago: Some(9_900),
    };
    let at = |fd, e, age_min_ms| Socket {
        age_min_ms,
        ..sock(9, fd, "10.0.0.7:40001", 8080, e)
    };
    let sockets = [
        // In CLOSE_WAIT for a minute, still open after the collection: referenced.
        at(5, ev(1, false, false), 60_000),
        // For 5 s: after the collection, which proves nothing about it.
        at(6, ev(0, false, false), 5_000),
        // Registered with a selector: reachable from it.
        at(7, ev(0, true, false), 60_000),
    ];
    let reports = explain(&sockets, &[jvm_process(Some(ran))], &Trends::default());
    let r = &reports[0];
    let may: Vec<(Option<i32>, bool)> = r.sockets.iter().map(|s| (s.fd, s.gc_may_close)).collect();
    assert_eq!(
        may,
        [(Some(7), false), (Some(6), true), (Some(5), false)],
        "sorted by pattern: eof_ignored, eof_unwatched, abandoned"
    );
    let json = serde_json::to_value(r).expect("json");
    assert_eq!(json["runtime"], "jvm");
    assert_eq!(json["runtime_clue"], "libjvm.so in its memory map");
    assert_eq!(
        json["gc"],
        serde_json::json!({"full_collections": 1, "last_ended_ms_ago": 9900})
    );
    assert_eq!(json["sockets"][0]["direction"], "in");
    assert_eq!(json["sockets"][1]["gc_may_close"], true);

    let text = render(&reports);
    assert!(
        text.contains(
            "\n  runtime: jvm (libjvm.so in its memory map); 1 full collection(s), the last ended \
9s ago\n"
        ),
        "{text}"
    );
    let notes: Vec<&str> = text.split("\n  gc: ").skip(1).collect();
    assert_eq!(notes.len(), 2, "{text}");
    assert!(
        notes[0].starts_with("1 not yet through a full collection") && notes[0].contains(GC_HINT)
    );
    assert!(
        notes[1].starts_with("1 survived a full collection"),
        "{text}"
    );
    assert!(
        !notes[1]
            .split("\n  rate")
            .next()
            .unwrap_or("")
            .contains(GC_HINT),
        "{text}"
    );
    assert!(text.lines().all(|l| l.chars().count() <= WIDTH), "{text}");

    // Without perf data nothing is known: every unwatched socket may go.
    let blind = explain(&sockets, &[jvm_process(None)], &Trends::default());
    let may: Vec<bool> = blind[0].sockets.iter().map(|s| s.gc_may_close).collect();
    assert_eq!(may, [false, true, true]);
    assert!(serde_json::to_value(&blind[0]).expect("json")["gc"].is_null());
}

#[test]
fn a_pools_idle_ends_are_pool_idle_and_no_gc_note() {
    let python = ProcessFacts {
        runtime: Identified {
            runtime: Runtime::Python,
            clue: "its executable is python3.11".into(),
        },
        ..proc(11, "python3", 30, Some(1024))
    };
    let sockets: Vec<Socket> = (0..3)
        .map(|i| sock(11, 3 + i, "10.0.0.9:6379", 40000 + i as u16, out(1, false)))
        .chain([sock(11, 9, "10.0.0.9:6379", 40100, out(40, false))])
        .collect();
    let r = &explain(&sockets, &[python], &Trends::default())[0];
    assert_eq!((r.patterns.pool_idle, r.patterns.abandoned), (3, 1));
    assert!(
        r.sockets
            .iter()
            .all(|s| s.direction == "out" && !s.gc_may_close)
    );
    let text = render(std::slice::from_ref(r));
    assert!(
        text.contains("      3  pool_idle (client end, not watched, only the FIN unread): an idle"),
        "{text}"
    );
    assert!(
        text.contains("  runtime: python (its executable is python3.11)\n"),
        "{text}"
    );
    assert!(!text.contains("  gc:") && !text.contains(GC_HINT), "{text}");
}
