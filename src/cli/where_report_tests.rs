use super::*;

fn frame(function: &str, line: Option<u32>, library: bool) -> ShownFrame {
    ShownFrame {
        function: Some(function.to_owned()),
        file: line.map(|_| "server.c".to_owned()),
        line,
        module: if library {
            "/usr/lib/libc.so.6"
        } else {
            "/srv/server"
        }
        .to_owned(),
        library,
    }
}

fn leak(pid: i32, eof: EofRead) -> LeakSocket {
    LeakSocket {
        pid,
        pattern: Pattern::EofUnwatched,
        eof,
        opened: Some(vec![
            frame("accept", None, true),
            frame("serve", Some(9), false),
        ]),
    }
}

fn facts(pid: i32) -> WhereProcessFacts {
    WhereProcessFacts {
        pid,
        comm: "server".into(),
        runtime: Runtime::Other,
        runtime_note: None,
    }
}

#[test]
fn library_frames_are_folded_and_the_depth_capped() {
    let mut frames = vec![frame("__libc_read", None, true), frame("read", None, true)];
    for i in 0..8 {
        frames.push(frame(&format!("f{i}"), Some(i), false));
    }
    let shown = fold(&frames);
    assert_eq!(shown.len(), SHOWN_FRAMES);
    assert_eq!(shown[0].function.as_deref(), Some("f0"));
    // Library frames only: shown as they are.
    let lib = vec![frame("epoll_wait", None, true)];
    assert_eq!(fold(&lib), lib);
    assert_eq!(frame("leak", Some(42), false).text(), "leak (server.c:42)");
    assert_eq!(
        frame("read", None, true).text(),
        "read (/usr/lib/libc.so.6)"
    );
}

#[test]
fn sockets_group_by_their_eof_stack_and_the_causes_without_one_are_counted() {
    let leaking = vec![
        frame("read", None, true),
        frame("leak_path", Some(20), false),
        frame("handle", Some(40), false),
    ];
    let other = vec![
        frame("read", None, true),
        frame("other_path", Some(30), false),
    ];
    let mut sockets: Vec<LeakSocket> = (0..3)
        .map(|_| leak(1, EofRead::Seen(leaking.clone())))
        .collect();
    sockets.push(leak(1, EofRead::Seen(other)));
    sockets.push(leak(1, EofRead::BeforeWindow));
    sockets.push(leak(1, EofRead::Unread));
    sockets.push(leak(2, EofRead::Unkept));
    let r = report(&sockets, &[facts(1), facts(2), facts(3)]);
    assert_eq!(r.len(), 2, "a process without sockets has no report");
    assert_eq!(r[0].sockets, 6);
    assert_eq!(r[0].groups.len(), 2);
    assert_eq!(r[0].groups[0].count, 3);
    assert_eq!(
        r[0].groups[0].eof_read[0].function.as_deref(),
        Some("leak_path")
    );
    assert_eq!(r[0].groups[0].opened[0].function.as_deref(), Some("serve"));
    assert_eq!(r[0].groups[1].count, 1);
    assert_eq!(r[0].no_stack.eof_before_window, 1);
    assert_eq!(r[0].no_stack.eof_unread, 1);
    assert_eq!(r[1].no_stack.unkept, 1);
    let text = render(&r);
    assert!(text.contains("3 socket(s), eof_unwatched: EOF read at\n      leak_path (server.c:20)\n      handle (server.c:40)\n"), "{text}");
    assert!(
        text.contains("1 socket(s): EOF before the window: no stack"),
        "{text}"
    );
    let json = serde_json::to_value(&r[0]).unwrap();
    let g = &json["where"][0];
    assert_eq!(g["count"], 3);
    assert_eq!(g["pattern"], "eof_unwatched");
    assert_eq!(g["eof_read"][0]["function"], "leak_path");
    assert_eq!(g["eof_read"][0]["file"], "server.c");
    assert_eq!(g["eof_read"][0]["line"], 20);
    assert_eq!(g["eof_read"][0]["module"], "/srv/server");
    assert_eq!(g["opened"][0]["function"], "serve");
}

#[test]
fn a_background_read_says_the_handler_did_not_return() {
    let frames = vec![
        frame("internal/poll.(*FD).Read", None, true),
        frame("net/http.(*connReader).backgroundRead", None, true),
    ];
    let mut s = leak(1, EofRead::Seen(frames));
    s.pattern = Pattern::EofIgnored;
    let r = report(&[s], &[facts(1)]);
    assert!(
        r[0].groups[0]
            .advice
            .contains("the handler did not return: honour r.Context()"),
        "{:?}",
        r[0].groups[0]
    );
    assert!(
        loop_note(&[frame("uv__read", None, true)])
            .unwrap()
            .contains("libuv")
    );
    assert_eq!(loop_note(&[frame("handle", Some(1), false)]), None);
}
