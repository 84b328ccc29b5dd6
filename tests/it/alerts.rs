//! The EMFILE forecast the alerts page on (`cwreap_emfile_forecast_seconds`, alert
//! CwreapEmfileSoon in config/cwreap.rules.yml), checked against a real leak: a C server
//! (`tests/runtimes/leak_server.c`) under `prlimit --nofile=600`, fed 15 half-closed
//! connections a second, each of which it keeps (one fd). The daemon's forecast, scraped
//! from its /metrics, is compared with the moment the server really hits EMFILE (its first
//! `accept error` line). promtool tests the rules on synthetic series
//! (config/cwreap.rules.test.yml); this tests the series.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::metrics::{free_addr, sample, scrape};
use crate::support::runtimes;
use crate::support::*;

const LIMIT: u64 = 600;
const RATE: u32 = 15;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn client(exe: &Path, addr: &str) -> LineChild {
    let mut c = LineChild::spawn(
        "leak_server client",
        Command::new(exe)
            .arg("client")
            .arg(addr)
            .arg(RATE.to_string()),
    )
    .expect("start leak_server client");
    c.expect("ready", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    c
}

#[test]
fn the_forecast_gauge_is_within_ten_percent_of_the_real_time_to_emfile() {
    let test = "the_forecast_gauge_is_within_ten_percent_of_the_real_time_to_emfile";
    let Some(exe) = runtimes::c_program(test, "leak_server.c") else {
        return;
    };
    let mut server = LineChild::spawn(
        "leak_server",
        Command::new("prlimit")
            .arg(format!("--nofile={LIMIT}:{LIMIT}"))
            .arg(&exe)
            .arg("--quiet"),
    )
    .expect("start prlimit leak_server");
    let addr = server
        .expect("listen ", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    server
        .expect("ready", Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e}"));
    // The leak runs before the daemon's first sample, so every sample it keeps sees it.
    let _client = client(&exe, &addr);
    let listen = free_addr();
    let mut d = LoggedDaemon::start(
        "alerts-forecast",
        &format!(
            "interval: 1s\ndry_run: true\ndiscovery: poll\nmetrics: {{listen: \"{listen}\"}}\ntargets:\n  - name: leak\n    match: {{pid: {}}}\n    older_than: 1h\n    action: log\n",
            server.pid()
        ),
    );
    let series = "cwreap_emfile_forecast_seconds{target=\"leak\"}";
    // (fd usage ratio, warning gauge) of every scrape: the warning is set at 80 %.
    let mut usage: Vec<(f64, f64)> = Vec::new();
    // (end of the cycle, its forecast), one per cycle, until the server hits EMFILE.
    let mut seen: Vec<(f64, f64)> = Vec::new();
    let mut first_cycle = None;
    let emfile_at = loop {
        if server
            .maybe_line("accept error", Duration::from_millis(200))
            .is_some()
        {
            break unix_now();
        }
        if let Ok(Some(status)) = d.daemon.child.try_wait() {
            panic!("cwreap run exited ({status})\n{}", d.log());
        }
        let Some(text) = scrape(listen) else { continue };
        let Some(cycle_at) = sample(&text, "cwreap_last_cycle_timestamp_seconds") else {
            continue;
        };
        first_cycle.get_or_insert(cycle_at);
        if let (Some(r), Some(w)) = (
            sample(&text, "cwreap_process_fd_usage_ratio{target=\"leak\"}"),
            sample(&text, "cwreap_fd_usage_warning{target=\"leak\"}"),
        ) {
            usage.push((r, w));
        }
        if let Some(f) = sample(&text, series)
            && seen.last().is_none_or(|(t, _)| *t != cycle_at)
        {
            seen.push((cycle_at, f));
        }
        assert!(
            seen.len() < 600,
            "no EMFILE after {} forecasts\n{}",
            seen.len(),
            d.log()
        );
    };
    let first_cycle = first_cycle.expect("a cycle before EMFILE");
    // Judge the forecasts made on at least 5 s of samples, while EMFILE was still 8 s or
    // more away (a forecast seconds before EMFILE is within a cycle of it anyway).
    let judged: Vec<(f64, f64, f64)> = seen
        .iter()
        .map(|&(at, f)| (at - first_cycle, f, emfile_at - at))
        .filter(|&(since, _, left)| since >= 5.0 && left >= 8.0)
        .collect();
    assert!(
        judged.len() >= 5,
        "too few forecasts to judge: {seen:?} (EMFILE at {emfile_at}, first cycle at {first_cycle})\n{}",
        d.log()
    );
    let worst = judged
        .iter()
        .map(|&(_, f, left)| (f - left) / left)
        .fold(0.0f64, |w, e| if e.abs() > w.abs() { e } else { w });
    for &(since, f, left) in &judged {
        println!(
            "after {since:5.1} s of samples: forecast {f:6.1} s, EMFILE came {left:6.1} s later ({:+.1} %)",
            100.0 * (f - left) / left
        );
    }
    println!(
        "{} forecasts judged, worst error {:+.1} % of the time to EMFILE",
        judged.len(),
        100.0 * worst
    );
    // The warning gauge of the same daemon: 0 below 70 %, 1 from 80 % on (the fds only
    // grow here), and set at all before EMFILE.
    for &(ratio, warning) in &usage {
        if ratio >= 0.8 {
            assert_eq!(warning, 1.0, "at {ratio}: {usage:?}");
        } else if ratio < 0.7 {
            assert_eq!(warning, 0.0, "at {ratio}: {usage:?}");
        }
    }
    assert!(
        usage.iter().any(|&(_, w)| w == 1.0),
        "the warning never set before EMFILE: {usage:?}"
    );
    assert!(
        worst.abs() <= 0.10,
        "a forecast was off by {:+.1} %: {judged:?}",
        100.0 * worst
    );
}
