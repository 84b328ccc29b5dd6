//! `cwreap scan` on a terminal on a host with 20000 CLOSE_WAIT sockets spread over several
//! processes (a process may hold at most 20000 fds here): one screen, worst first, and what
//! to run next; the same scan into a pipe still gives one JSON object per socket.

use std::collections::BTreeMap;

use cwreap_testkit::fleet::{BULK_SERVER_COMM, Fleet};
use cwreap_testkit::*;

const SOCKETS: usize = 20_000;

#[test]
fn twenty_thousand_close_wait_sockets_take_one_screen_that_says_what_to_run_next() {
    let _machine = super::alone();
    if !have_script() {
        skip_or_fail(
            "twenty_thousand_close_wait_sockets_take_one_screen_that_says_what_to_run_next",
            "script(1) is not installed (apt-get install bsdutils)",
        );
        return;
    }
    let fleet = Fleet::start(SOCKETS, 0).expect("the fleet of leaky servers");
    let servers = fleet.server_pids();
    let comm = BULK_SERVER_COMM.to_str().expect("an ASCII name");
    assert!(
        servers.len() >= 3,
        "spread over several processes: {servers:?}"
    );

    let (rows, cols) = (40u16, 120u16);
    let screen = on_terminal(rows, cols, cwreap_bin(), &["scan"], &[("NO_COLOR", "1")]);
    assert_eq!(screen.code, Some(0), "{}", screen.text);
    let text = &screen.text;
    let lines = screen.lines();
    // At most one screen, the prompt's row left: the rows the lines take, a long one
    // wrapping (notes on stderr, such as a stale daemon's, share the terminal); scan's own
    // lines are never wider than the terminal.
    let used: usize = lines
        .iter()
        .map(|l| l.chars().count().div_ceil(usize::from(cols)).max(1))
        .sum();
    assert!(used < usize::from(rows), "{used} rows:\n{text}");
    let note = |l: &&&str| l.starts_with("note: ") || l.starts_with("warning: ");
    assert!(
        lines
            .iter()
            .filter(|l| !note(l))
            .all(|l| l.chars().count() <= usize::from(cols)),
        "{text}"
    );
    assert!(!text.contains('\x1b'), "NO_COLOR: {text:?}");
    // Notes on stderr (a stale daemon's pins, say) share the terminal; then the header.
    let header = lines
        .iter()
        .position(|l| l.contains("never called close()"))
        .unwrap_or_else(|| panic!("no header line:\n{text}"));

    // Each server's row, with its exact count; they add up to every socket of the fleet.
    let mut counts: BTreeMap<i32, usize> = BTreeMap::new();
    for l in &lines {
        let cells: Vec<&str> = l.split_whitespace().collect();
        if let [pid, _, n, ..] = cells[..]
            && cells[1] == comm
            && let (Ok(pid), Ok(n)) = (pid.parse::<i32>(), n.parse::<usize>())
            && servers.contains(&pid)
        {
            counts.insert(pid, n);
        }
    }
    assert_eq!(counts.len(), servers.len(), "a row per server:\n{text}");
    assert_eq!(counts.values().sum::<usize>(), SOCKETS, "{text}");

    // What to run next, for the worst process: the first row of the table.
    let worst: i32 = lines[header + 2]
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no first row:\n{text}"));
    assert!(
        text.contains(&format!("cwreap explain --pid {worst} ")),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "cwreap reap --pid {worst} --older-than 10m --dry-run "
        )),
        "{text}"
    );
    assert!(text.contains("cwreap scan --sockets (all "), "{text}");
    assert!(
        text.contains(&format!("cwreap scan --pid {worst}")),
        "{text}"
    );
    eprintln!("--- the first screen ({} lines):\n{text}", lines.len());

    // Into a pipe, the JSON is one object per socket, as before.
    let objects = cwreap_json(&["scan", "--json"]);
    let mut per_server: BTreeMap<i64, usize> = BTreeMap::new();
    for o in &objects {
        if let Some(pid) = o["pid"].as_i64()
            && servers.contains(&(pid as i32))
        {
            *per_server.entry(pid).or_default() += 1;
        }
    }
    assert_eq!(per_server.values().sum::<usize>(), SOCKETS);
    for (pid, n) in &counts {
        assert_eq!(per_server.get(&i64::from(*pid)), Some(n), "pid {pid}");
    }
}
