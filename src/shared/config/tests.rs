//! Tests of the policy: parsing, validation, errors, matching, description.

use std::os::unix::fs::MetadataExt;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::*;
use super::model::*;
use super::raw::*;
use crate::shared::selector::{
    Exclude, ProcessFacts, Selector, SocketFacts, parse_cgroup_file, unit_from_cgroup,
};
use crate::shared::values::parse_port;

const MIN: &str = "targets:\n  - name: web\n    match:\n      comm: ^nginx$\n    older_than: 5m\n";

fn ok(text: &str) -> Config {
    match parse(text, "t.yaml") {
        Ok(c) => c,
        Err(e) => panic!("expected a valid policy, got: {e}"),
    }
}

/// The one-line error for `text`.
fn err(text: &str) -> String {
    match parse(text, "t.yaml") {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => {
            let s = e.to_string();
            assert!(!s.contains('\n'), "error spans several lines: {s:?}");
            s
        }
    }
}

/// A one-target policy with `body` as extra target keys (indented 4).
fn with_target(body: &str) -> String {
    format!("targets:\n  - name: web\n    match:\n      comm: ^nginx$\n{body}")
}

#[test]
fn defaults_are_safe_and_explicit() {
    let c = ok(MIN);
    assert_eq!(c.interval, Duration::from_secs(30));
    assert!(c.dry_run);
    assert_eq!(c.log_format, LogFormat::Text);
    assert_eq!(c.audit_log, None);
    assert_eq!(c.limits.max_reaps_per_cycle, 100);
    assert_eq!(c.limits.max_reaps_per_minute, 600);
    assert_eq!(c.metrics.listen, "127.0.0.1:9814".parse().ok());
    let t = &c.targets[0];
    assert_eq!(t.name, "web");
    assert_eq!(t.older_than, Duration::from_secs(300));
    assert_eq!(t.min_close_wait, 1);
    assert_eq!(t.action, Action::Log);
    assert_eq!(t.dry_run, None);
    assert!(t.effective_dry_run(c.dry_run));
    assert_eq!(t.selector.exclude, Exclude::default());
}

#[test]
fn everything_set() {
    let c = ok("interval: 1m30s
dry_run: false
log_format: json
audit_log: /var/log/cwreap/audit.jsonl
limits: {max_reaps_per_cycle: 5, max_reaps_per_minute: 50}
metrics: {listen: '[::1]:9000'}
targets:
  - name: api
    match:
      pid: 42
      pid_file: /run/api.pid
      comm: ^api$
      exe: /usr/bin/api
      cmdline: --port 8080
      systemd_unit: api.service
      cgroup: /system.slice/
      uid: 1000
      local_ports: [8080, '8443']
    older_than: 10m
    min_close_wait: 3
    exclude:
      remote_cidrs: [10.0.0.0/8, 192.0.2.7, 'fd00::/8', 10.1.2.3/16]
      local_ports: [9090]
      remote_ports: [5432]
    action: shutdown
    dry_run: true
");
    assert_eq!(c.interval, Duration::from_secs(90));
    assert!(!c.dry_run);
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(
        c.audit_log.as_deref(),
        Some(Path::new("/var/log/cwreap/audit.jsonl"))
    );
    assert_eq!(c.limits.max_reaps_per_cycle, 5);
    assert_eq!(c.limits.max_reaps_per_minute, 50);
    assert_eq!(c.metrics.listen, "[::1]:9000".parse().ok());
    let t = &c.targets[0];
    let m = &t.selector;
    assert_eq!(m.pids, [42]);
    assert_eq!(m.pid_files, [PathBuf::from("/run/api.pid")]);
    assert_eq!(m.units, ["api.service"]);
    assert_eq!(m.cgroups, ["/system.slice"]);
    assert_eq!(m.uids, [1000]);
    assert_eq!(m.local_ports, vec![8080, 8443]);
    assert_eq!(t.min_close_wait, 3);
    let nets: Vec<String> = m
        .exclude
        .remote_cidrs
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        nets,
        ["10.0.0.0/8", "192.0.2.7/32", "fd00::/8", "10.1.0.0/16"]
    );
    assert_eq!(t.action, Action::Shutdown);
    assert_eq!(t.dry_run, Some(true));
    assert!(t.effective_dry_run(c.dry_run));
}

#[test]
fn target_dry_run_overrides_global() {
    let c = ok(&with_target("    older_than: 5m\n    dry_run: false\n"));
    assert!(c.dry_run);
    assert!(!c.targets[0].effective_dry_run(c.dry_run));
}

#[test]
fn metrics_off() {
    let c = ok(&format!("metrics:\n  listen: off\n{MIN}"));
    assert_eq!(c.metrics.listen, None);
    let e = err(&format!("metrics:\n  listen: localhost:9814\n{MIN}"));
    assert!(e.starts_with("t.yaml:2:11: `metrics.listen`"), "{e}");
    let e = err(&format!("metrics:\n  listen: 127.0.0.1:0\n{MIN}"));
    assert!(e.contains("port 0"), "{e}");
}

#[test]
fn metrics_off_as_a_word_as_the_readme_writes_it() {
    for text in [
        "metrics: off",
        "metrics: \"off\"",
        "metrics: {listen: off}",
        "metrics:\n  listen: \"off\"",
    ] {
        let c = ok(&format!("{text}\n{MIN}"));
        assert_eq!(c.metrics.listen, None, "{text}");
    }
    // An empty block keeps the default listener.
    let c = ok(&format!("metrics:\n{MIN}"));
    assert_eq!(c.metrics.listen, DEFAULT_METRICS_LISTEN.parse().ok());
    let e = err(&format!("metrics: on\n{MIN}"));
    assert_eq!(
        e,
        "t.yaml:1:10: `metrics`: `on` is neither `off` nor a mapping such as `{listen: 127.0.0.1:9814}`"
    );
    let e = err(&format!("metrics: 9814\n{MIN}"));
    assert!(
        e.starts_with("t.yaml:1:10: `metrics`: `9814` is neither"),
        "{e}"
    );
    // Inside the block, errors still point at the key and suggest the right one.
    let e = err(&format!("metrics: {{listne: off}}\n{MIN}"));
    assert!(e.contains("in `metrics`; did you mean `listen`?"), "{e}");
    // The described policy says `off` in a form that reads back the same.
    let described = ok(&format!("metrics: off\n{MIN}")).describe();
    assert_eq!(ok(&described).metrics.listen, None);
}

#[test]
fn interval_has_a_floor() {
    let e = err(&format!("interval: 99ms\n{MIN}"));
    assert_eq!(
        e,
        "t.yaml:1:11: `interval`: `99ms` is below the floor of 100ms; a shorter interval would keep a core busy"
    );
    let e = err(&format!("interval: 1ns\n{MIN}"));
    assert!(e.contains("below the floor of 100ms"), "{e}");
    assert_eq!(
        ok(&format!("interval: 100ms\n{MIN}")).interval,
        MIN_INTERVAL
    );
}

#[test]
fn where_is_on_or_off_and_off_by_default() {
    assert!(!ok(MIN).where_stacks);
    assert!(ok(&format!("where: on\n{MIN}")).where_stacks);
    assert!(!ok(&format!("where: off\n{MIN}")).where_stacks);
    assert!(
        ok(&format!("where: on\n{MIN}"))
            .describe()
            .contains("where: on")
    );
    let e = err(&format!("interval: 5s\nwhere: always\n{MIN}"));
    assert_eq!(e, "t.yaml:2:8: `where`: `always` is neither `on` nor `off`");
    let e = err(&format!("where: true\n{MIN}"));
    assert!(e.starts_with("t.yaml:1:"), "{e}");
}

#[test]
fn global_values_are_checked() {
    let e = err(&format!("interval: 0s\n{MIN}"));
    assert_eq!(e, "t.yaml:1:11: `interval`: `0s` must be greater than zero");
    let e = err(&format!("interval: soon\n{MIN}"));
    assert!(
        e.starts_with("t.yaml:1:11: `interval`: `soon` is not a duration"),
        "{e}"
    );
    let e = err(&format!("log_format: xml\n{MIN}"));
    assert!(
        e.starts_with("t.yaml:1:13: `log_format`: `xml` is not one of"),
        "{e}"
    );
    let e = err(&format!("audit_log: audit.jsonl\n{MIN}"));
    assert!(e.contains("must be an absolute path"), "{e}");
    let e = err(&format!("limits:\n  max_reaps_per_cycle: 0\n{MIN}"));
    assert_eq!(
        e,
        "t.yaml:2:24: `limits.max_reaps_per_cycle`: must be at least 1"
    );
    let e = err(&format!("limits:\n  max_reaps_per_minute: lots\n{MIN}"));
    assert!(
        e.starts_with("t.yaml:2:25: `limits.max_reaps_per_minute`: `lots`"),
        "{e}"
    );
    let e = err(&format!("dry_run: maybe\n{MIN}"));
    assert!(e.starts_with("t.yaml:1:10: invalid boolean"), "{e}");
}

#[test]
fn explicit_null_is_refused() {
    let e = err(&format!("interval:\n{MIN}"));
    // A null points at the end of its key, where the value is missing.
    assert!(e.starts_with("t.yaml:1:9: `interval` has no value"), "{e}");
    let e = err(&with_target(
        "    older_than: 5m\n    exclude:\n      local_ports:\n",
    ));
    assert!(
        e.contains("`exclude.local_ports` in target `web` has no value"),
        "{e}"
    );
    // An empty block is fine (all defaults).
    ok(&format!("limits:\n{MIN}"));
    ok(&with_target("    older_than: 5m\n    exclude:\n"));
}

#[test]
fn targets_must_be_present_and_non_empty() {
    let e = err("interval: 30s\n");
    assert!(e.starts_with("t.yaml: no `targets`"), "{e}");
    // The example the message gives is valid.
    let (_, example) = e.rsplit_once("e.g. ").expect("an example");
    ok(example.trim_matches('`'));
    assert_eq!(
        err("targets: []\n"),
        "t.yaml:1:10: `targets` is empty: list at least one target"
    );
    let e = err("targets:\n");
    assert!(e.starts_with("t.yaml:1:8: `targets` is empty"), "{e}");
    assert!(err("").starts_with("t.yaml: no `targets`"));
}

#[test]
fn name_rules() {
    let e = err("targets:\n  - match: {pid: 1}\n    older_than: 1m\n");
    assert_eq!(e, "t.yaml:2:5: target #1 has no `name`");
    let e = err("targets:\n  - name: ''\n    match: {pid: 1}\n    older_than: 1m\n");
    assert_eq!(e, "t.yaml:2:11: target #1 has an empty `name`");
    let dup = format!("{MIN}  - name: web\n    match: {{pid: 3}}\n    older_than: 1m\n");
    assert_eq!(
        err(&dup),
        "t.yaml:6:11: duplicate target name `web` (first used at line 2)"
    );
}

#[test]
fn older_than_required_and_positive() {
    let e = err("targets:\n  - name: web\n    match: {pid: 1}\n");
    assert!(
        e.starts_with("t.yaml:2:5: target `web` has no `older_than`; it is required"),
        "{e}"
    );
    let e = err(&with_target("    older_than: 0s\n"));
    assert_eq!(
        e,
        "t.yaml:5:17: `older_than` in target `web`: `0s` must be greater than zero"
    );
    let e = err(&with_target("    older_than: 5 minutes later\n"));
    assert!(
        e.starts_with(
            "t.yaml:5:17: `older_than` in target `web`: `5 minutes later` is not a duration"
        ),
        "{e}"
    );
}

#[test]
fn match_rules() {
    let e = err("targets:\n  - name: web\n    older_than: 1m\n");
    assert!(
        e.starts_with("t.yaml:2:5: target `web` has no `match` block"),
        "{e}"
    );
    let e = err("targets:\n  - name: web\n    match: {}\n    older_than: 1m\n");
    assert!(
            e.starts_with("t.yaml:3:12: the `match` block of target `web` is empty, which would select every process"),
            "{e}"
        );
    let e = err("targets:\n  - name: web\n    match:\n    older_than: 1m\n");
    assert!(
        e.contains("is empty, which would select every process"),
        "{e}"
    );
    let m = |body: &str| {
        format!("targets:\n  - name: web\n    older_than: 1m\n    match:\n      {body}\n")
    };
    let e = err(&m("pid: 0"));
    assert!(
        e.starts_with("t.yaml:5:12: `match.pid` in target `web`: `0` is not a process id"),
        "{e}"
    );
    let e = err(&m("pid_file: run/x.pid"));
    assert!(e.contains("must be an absolute path"), "{e}");
    let e = err(&m("comm: '(nginx'"));
    assert!(
        e.starts_with(
            "t.yaml:5:13: `match.comm` in target `web`: invalid regex `(nginx`: unclosed group"
        ),
        "{e}"
    );
    assert!(err(&m("exe: '['")).contains("invalid regex"));
    assert!(err(&m("cmdline: '*'")).contains("invalid regex"));
    let e = err(&m("systemd_unit: nginx"));
    assert!(e.contains("did you mean `nginx.service`?"), "{e}");
    assert!(err(&m("systemd_unit: a/b.service")).contains("is not a unit name"));
    let e = err(&m("cgroup: system.slice"));
    assert!(e.contains("must be a cgroup path starting with `/`"), "{e}");
    assert!(err(&m("uid: -1")).contains("is neither a numeric user id"));
    assert!(err(&m("uid: no-such-user-here")).contains("nor a user in /etc/passwd"));
    // A user name is looked up, as on the command line.
    assert_eq!(ok(&m("uid: root")).targets[0].selector.uids, [0]);
    // The socket criteria of a client pool's target: lists, none of them empty.
    let c = ok(&m(
        "{remote_ports: [6379, 5432], remote_cidrs: [10.0.0.0/8, 192.0.2.7], local_cidrs: ['::1']}",
    ));
    let sel = &c.targets[0].selector;
    assert_eq!(sel.remote_ports, [6379, 5432]);
    assert_eq!(sel.remote_cidrs[1].to_string(), "192.0.2.7/32");
    assert_eq!(sel.local_cidrs[0].to_string(), "::1/128");
    assert!(err(&m("remote_ports: []")).contains("`match.remote_ports` in target `web` is empty"));
    assert!(err(&m("remote_cidrs: [10.0.0.0/33]")).contains("is not a CIDR"));
    // A socket criterion alone is enough: any process, only those sockets.
    ok(&m("remote_ports: [6379]"));
    let e = err(&m("local_ports: []"));
    assert!(
        e.starts_with("t.yaml:5:20: `match.local_ports` in target `web` is empty"),
        "{e}"
    );
    // local_ports alone is a criterion.
    ok(&m("local_ports: [8080]"));
}

#[test]
fn ports() {
    let m = |ports: &str| {
        format!(
            "targets:\n  - name: web\n    older_than: 1m\n    match:\n      local_ports: [80, {ports}]\n"
        )
    };
    assert_eq!(
        err(&m("0")),
        "t.yaml:5:25: `match.local_ports` in target `web`: port 0 is out of range 1-65535"
    );
    assert!(err(&m("70000")).contains("port 70000 is out of range 1-65535"));
    assert!(err(&m("http")).contains("`http` is not a port number (1-65535)"));
    assert_eq!(parse_port("65535"), Ok(65535));
    assert_eq!(parse_port(" 1 "), Ok(1));
}

#[test]
fn exclude_rules() {
    let e = err(&with_target(
        "    older_than: 1m\n    exclude:\n      remote_cidrs: [10.0.0.0/8, 10.0.0.0/33]\n",
    ));
    assert!(
        e.starts_with(
            "t.yaml:7:34: `exclude.remote_cidrs` in target `web`: `10.0.0.0/33` is not a CIDR"
        ),
        "{e}"
    );
    assert!(
        err(&with_target(
            "    older_than: 1m\n    exclude:\n      remote_ports: [99999]\n"
        ))
        .contains("`exclude.remote_ports` in target `web`: port 99999")
    );
    let both = "targets:\n  - name: web\n    older_than: 1m\n    match: {local_ports: [80, 443]}\n    exclude: {local_ports: [22, 443]}\n";
    assert_eq!(
        err(both),
        "t.yaml:5:33: `exclude.local_ports` in target `web`: port 443 is both matched and excluded, so it selects nothing"
    );
}

#[test]
fn a_tab_is_reported_where_it_is() {
    let text = "targets:\n  - name: a\n    match: {comm: x}\n    older_than: 1m\n\tdry_run: true\n";
    assert_eq!(
        err(text),
        "t.yaml:5:1: a tab character: YAML indents with spaces only"
    );
    let deeper = "targets:\n  - name: a\n  \t match: {comm: x}\n    older_than: 1m\n";
    assert_eq!(
        err(deeper),
        "t.yaml:3:3: a tab character: YAML indents with spaces only"
    );
}

#[test]
fn escalate_rules() {
    let ok = parse(
        &with_target(
            "    older_than: 1m\n    action: shutdown\n    escalate: {raise_fd_limit_at: 80%, signal_at: '95%'}\n",
        ),
        "t.yaml",
    )
    .expect("valid escalate");
    assert_eq!(
        ok.targets[0].escalate,
        Escalate {
            raise_fd_limit_at: Some(80),
            signal_at: Some(95),
            signal: Signal::Term,
            ..Escalate::default()
        }
    );
    let described = ok.describe();
    assert!(described.contains(RAISE_FD_LIMIT_TEXT), "{described}");
    assert!(described.contains(SIGNAL_TEXT), "{described}");
    assert!(
        described.contains("1024"),
        "check says when raising never fires"
    );
    let again = parse(&described, "described.yaml").expect("describe round-trips");
    assert_eq!(again.targets[0].escalate, ok.targets[0].escalate);
    // Any action may escalate; a log-only target too (escalations touch no socket).
    let log = ok_policy("    older_than: 1m\n    escalate: {signal_at: 95, signal: usr1}\n");
    assert_eq!(log.targets[0].escalate.signal, Signal::Usr1);
    assert_eq!(log.targets[0].escalate.raise_fd_limit_at, None);

    // The daemon never closes fds inside a target: the old key fails with the reason and
    // the replacements, pointing at it.
    let e = err(&with_target(
        "    older_than: 1m\n    action: shutdown\n    escalate:\n      close_after: 10m\n",
    ));
    assert!(
        e.starts_with("t.yaml:8:20: `escalate.close_after` is gone"),
        "{e}"
    );
    assert!(
        e.contains("misdelivered") && e.contains("raise_fd_limit_at") && e.contains("signal_at"),
        "{e}"
    );
    for (body, want) in [
        ("escalate: {}", "`escalate` is empty"),
        ("escalate: {signal_at: 0%}", "not a percentage"),
        ("escalate: {signal_at: 101%}", "not a percentage"),
        ("escalate: {raise_fd_limit_at: lots}", "not a percentage"),
        ("escalate: {signal: TERM}", "`signal` needs `signal_at`"),
        (
            "escalate: {signal_at: 95%, signal: SIGSEGV}",
            "is not one of SIGTERM",
        ),
        (
            "escalate: {raise_fd_limit_at: 95%, signal_at: 80%}",
            "must be above `raise_fd_limit_at`",
        ),
        (
            "escalate: {raise_before_emfile: 1m, signal_before_emfile: 2m}",
            "must be longer than `signal_before_emfile`",
        ),
        ("escalate: {signal_before_emfile: 0s}", "greater than zero"),
        ("escalate: {signal_before_emfile: 2d}", "no forecast"),
        ("escalate: {raise_before_emfile: soon}", "not a duration"),
    ] {
        let e = err(&with_target(&format!("    older_than: 1m\n    {body}\n")));
        assert!(e.contains(want), "{body}: {e}");
    }
}

#[test]
fn forecast_escalations_and_their_budget_and_the_still_held_window() {
    let c = ok_policy(
        "    older_than: 1m\n    escalate: {raise_before_emfile: 5m, signal_before_emfile: 2m, signal: HUP}\n",
    );
    let e = c.targets[0].escalate;
    assert_eq!(e.raise_before_emfile, Some(Duration::from_secs(300)));
    assert_eq!(e.signal_before_emfile, Some(Duration::from_secs(120)));
    assert_eq!(e.signal, Signal::Hup);
    assert!(e.raises() && e.signals());
    assert_eq!(
        c.limits.max_escalations_per_minute,
        DEFAULT_MAX_ESCALATIONS_PER_MINUTE
    );
    // The default window: 3 intervals, at least 30 s.
    assert_eq!(
        c.still_held_window(),
        Duration::from_secs(90),
        "interval 30s"
    );
    let described = c.describe();
    assert!(described.contains(BEFORE_EMFILE_TEXT), "{described}");
    assert!(
        described.contains("# still_held_after: \"1m 30s\""),
        "{described}"
    );
    let again = parse(&described, "described.yaml").expect("describe round-trips");
    assert_eq!(again.targets[0].escalate, e);
    assert_eq!(again.limits, c.limits);

    let short = parse(
        "interval: 2s\nstill_held_after: 45s\nlimits: {max_escalations_per_minute: 3}\ntargets: [{name: a, match: {comm: x}, older_than: 1m}]\n",
        "t.yaml",
    )
    .expect("valid");
    assert_eq!(short.still_held_window(), Duration::from_secs(45));
    assert_eq!(short.limits.max_escalations_per_minute, 3);
    let fast = parse(
        "interval: 2s\ntargets: [{name: a, match: {comm: x}, older_than: 1m}]\n",
        "t.yaml",
    )
    .expect("valid");
    assert_eq!(
        fast.still_held_window(),
        Duration::from_secs(30),
        "at least 30 s"
    );
    let e = parse(
        "still_held_after: 0s\ntargets: [{name: a, match: {comm: x}, older_than: 1m}]\n",
        "t.yaml",
    )
    .expect_err("zero");
    assert!(e.to_string().contains("`still_held_after`"), "{e}");
}

fn ok_policy(body: &str) -> Config {
    match parse(&with_target(body), "t.yaml") {
        Ok(c) => c,
        Err(e) => panic!("expected a valid policy, got: {e}"),
    }
}

#[test]
fn action_rules() {
    let e = err(&with_target("    older_than: 1m\n    action: shotdown\n"));
    assert_eq!(
        e,
        "t.yaml:6:13: `action` in target `web`: `shotdown` is not one of `log`, `shutdown`, `destroy`; did you mean `shutdown`?"
    );
    let ok = parse(
        &with_target("    older_than: 1m\n    action: destroy\n"),
        "t.yaml",
    )
    .expect("destroy is an action");
    assert_eq!(ok.targets[0].action, Action::Destroy);
    let e = err(&with_target("    older_than: 1m\n    min_close_wait: 0\n"));
    assert_eq!(
        e,
        "t.yaml:6:21: `min_close_wait` in target `web`: must be at least 1"
    );
}

#[test]
fn unknown_keys_name_the_place_and_suggest() {
    let e = err(&with_target("    older_then: 5m\n"));
    assert_eq!(
        e,
        "t.yaml:5:5: unknown key `older_then` in target `web`; did you mean `older_than`?"
    );
    let e = err("targets:\n  - name: web\n    match:\n      pdi: 1\n    older_than: 1m\n");
    assert_eq!(
        e,
        "t.yaml:4:7: unknown key `pdi` in the `match` block of target `web`; did you mean `pid`?"
    );
    let e = err(&format!("intervall: 30s\n{MIN}"));
    assert_eq!(
        e,
        "t.yaml:1:1: unknown key `intervall` at the top level; did you mean `interval`?"
    );
    let e = err(&format!("limits:\n  max_reaps: 3\n{MIN}"));
    assert!(
        e.starts_with("t.yaml:2:3: unknown key `max_reaps` in `limits`; valid keys:"),
        "{e}"
    );
    let e = err(&format!("metrics:\n  listne: off\n{MIN}"));
    assert!(e.contains("in `metrics`; did you mean `listen`?"), "{e}");
    let e = err(&with_target(
        "    older_than: 1m\n    exclude:\n      remote_cidr: []\n",
    ));
    assert!(
            e.contains("unknown key `remote_cidr` in the `exclude` block of target `web`; did you mean `remote_cidrs`?"),
            "{e}"
        );
    let e = err("targets:\n  - name: web\n    comm: nginx\n    older_than: 1m\n");
    assert!(
        e.contains("`comm` is a criterion: put it under `match:`"),
        "{e}"
    );
    // The second target, named after the typo.
    let e = err(&format!("{MIN}  - older_thn: 1m\n    name: api\n"));
    assert_eq!(
        e,
        "t.yaml:6:5: unknown key `older_thn` in target `api`; did you mean `older_than`?"
    );
    // A top-level key after the list is not blamed on the last target.
    let e = err(&format!("{MIN}dryrun: true\n"));
    assert!(
        e.starts_with("t.yaml:6:1: unknown key `dryrun` at the top level; did you mean `dry_run`?"),
        "{e}"
    );
}

#[test]
fn yaml_errors_are_one_line_with_position() {
    let e = err("targets:\n  - name: \"web\n    match: {}\n");
    assert!(e.starts_with("t.yaml:2:11: "), "{e}");
    let e = err("targets:\n  - name: web\n   match: {}\n");
    assert!(e.starts_with("t.yaml:3:4: "), "{e}");
    let e = err(&with_target("    older_than: 1m\n    dry_run: perhaps\n"));
    assert_eq!(e, "t.yaml:6:14: invalid boolean (in target `web`)");
    assert_eq!(
        err("- 1\n"),
        "t.yaml:1:1: expected a mapping (`key: value` lines) here"
    );
    let e = err("targets:\n  - name: [web]\n");
    assert_eq!(
        e,
        "t.yaml:2:11: expected a single value here, not a list or a mapping (in target #1)"
    );
    assert!(err("targets: web\n").starts_with("t.yaml:1:10: expected a list"));
    let e = err(&format!("{MIN}    name: again\n"));
    assert!(e.starts_with("t.yaml:6:5: duplicate mapping key"), "{e}");
}

#[test]
fn edit_distance_and_suggestions() {
    assert_eq!(edit_distance("", ""), 0);
    assert_eq!(edit_distance("abc", ""), 3);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
    assert_eq!(edit_distance("pdi", "pid"), 1);
    assert_eq!(edit_distance("older_then", "older_than"), 1);
    let keys = [
        "name",
        "match",
        "older_than",
        "exclude",
        "action",
        "dry_run",
    ];
    assert_eq!(suggest("older_then", &keys), Some("older_than"));
    assert_eq!(suggest("Action", &keys), Some("action"));
    assert_eq!(suggest("matches", &keys), Some("match"));
    assert_eq!(suggest("frobnicate", &keys), None);
    assert_eq!(suggest("x", &keys), None);
}

#[test]
fn units_from_cgroups() {
    assert_eq!(
        unit_from_cgroup("/system.slice/nginx.service").as_deref(),
        Some("nginx.service")
    );
    assert_eq!(
        unit_from_cgroup("/user.slice/user-1000.slice/user@1000.service/app.slice/foo.service")
            .as_deref(),
        Some("foo.service")
    );
    assert_eq!(
        unit_from_cgroup("/user.slice/user-1000.slice/session-3.scope").as_deref(),
        Some("session-3.scope")
    );
    assert_eq!(
        unit_from_cgroup("/system.slice/docker-ab12.scope/init").as_deref(),
        Some("docker-ab12.scope")
    );
    assert_eq!(unit_from_cgroup("/"), None);
    assert_eq!(unit_from_cgroup("/system.slice"), None);
    assert_eq!(unit_from_cgroup("/a/.service"), None);
}

#[test]
fn cgroup_file() {
    assert_eq!(
        parse_cgroup_file("0::/system.slice/nginx.service\n").as_deref(),
        Some("/system.slice/nginx.service")
    );
    let hybrid = "12:pids:/system.slice/x.service\n1:name=systemd:/system.slice/x.service\n0::/system.slice/x.service\n";
    assert_eq!(
        parse_cgroup_file(hybrid).as_deref(),
        Some("/system.slice/x.service")
    );
    assert_eq!(
        parse_cgroup_file("0::/a:b/c.scope\n").as_deref(),
        Some("/a:b/c.scope")
    );
    assert_eq!(
        parse_cgroup_file("0::/gone.scope (deleted)\n").as_deref(),
        Some("/gone.scope")
    );
    assert_eq!(parse_cgroup_file("1:cpu:/x\n"), None);
    assert_eq!(parse_cgroup_file(""), None);
}

fn facts() -> ProcessFacts {
    ProcessFacts {
        pid: 4242,
        comm: "nginx".into(),
        exe: Some("/usr/sbin/nginx".into()),
        cmdline: Some("nginx: worker process".into()),
        cgroup: Some("/system.slice/nginx.service".into()),
        uid: Some(33),
    }
}

fn matcher(body: &str) -> Selector {
    let c = ok(&format!(
        "targets:\n  - name: t\n    older_than: 1m\n    match: {{{body}}}\n"
    ));
    c.targets[0].selector.clone()
}

/// The old single-pid-file call shape, for the tests below.
trait Matches {
    fn matches(&self, f: &ProcessFacts, pid_from_file: Option<i32>) -> bool;
}

impl Matches for Selector {
    fn matches(&self, f: &ProcessFacts, pid_from_file: Option<i32>) -> bool {
        let pids: Vec<i32> = pid_from_file.into_iter().collect();
        self.process_matches(f, &pids)
    }
}

#[test]
fn process_matching() {
    let f = facts();
    assert!(matcher("comm: ngin").matches(&f, None));
    assert!(!matcher("comm: ^ngin$").matches(&f, None));
    assert!(matcher("pid: 4242").matches(&f, None));
    assert!(!matcher("pid: 4243").matches(&f, None));
    assert!(matcher("exe: /nginx$").matches(&f, None));
    assert!(matcher("cmdline: worker").matches(&f, None));
    assert!(matcher("systemd_unit: nginx.service").matches(&f, None));
    assert!(!matcher("systemd_unit: apache.service").matches(&f, None));
    assert!(matcher("cgroup: /system.slice").matches(&f, None));
    assert!(matcher("cgroup: /system.slice/nginx.service").matches(&f, None));
    assert!(matcher("cgroup: /").matches(&f, None));
    assert!(!matcher("cgroup: /system.sl").matches(&f, None));
    assert!(matcher("uid: 33").matches(&f, None));
    assert!(!matcher("uid: 0").matches(&f, None));
    // pid_file: the pid read this cycle must be this process; none read, no match.
    let pf = matcher("pid_file: /run/nginx.pid");
    assert!(pf.matches(&f, Some(4242)));
    assert!(!pf.matches(&f, Some(1)));
    assert!(!pf.matches(&f, None));
    // All criteria must hold.
    assert!(matcher("comm: nginx, uid: 33").matches(&f, None));
    assert!(!matcher("comm: nginx, uid: 0").matches(&f, None));
    // A criterion on a fact we could not read does not match.
    let bare = ProcessFacts {
        pid: 4242,
        comm: "nginx".into(),
        ..ProcessFacts::default()
    };
    assert!(!matcher("exe: nginx").matches(&bare, None));
    assert!(!matcher("cmdline: nginx").matches(&bare, None));
    assert!(!matcher("systemd_unit: nginx.service").matches(&bare, None));
    assert!(!matcher("cgroup: /").matches(&bare, None));
    assert!(!matcher("uid: 33").matches(&bare, None));
    // local_ports is a socket criterion: any process passes the process check.
    let ports = matcher("local_ports: [80]");
    assert!(!ports.has_process_criteria());
    assert!(ports.matches(&bare, None));
}

fn target(extra: &str) -> Target {
    let c = ok(&format!(
        "targets:\n  - name: t\n    older_than: 1m\n    match: {{comm: x, local_ports: [80, 443]}}\n{extra}"
    ));
    c.targets[0].clone()
}

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn socket_selection_and_exclusions() {
    let t = target("");
    assert!(t.socket_selected(sa("10.0.0.1:80"), sa("192.0.2.1:5000")));
    assert!(!t.socket_selected(sa("10.0.0.1:8080"), sa("192.0.2.1:5000")));

    let t = target(
        "    exclude:\n      remote_cidrs: [10.0.0.0/8, '2001:db8::/32', 192.0.2.7, '::ffff:198.51.100.0/120']\n      remote_ports: [5432]\n",
    );
    let local = sa("127.0.0.1:80");
    assert!(!t.socket_selected(local, sa("10.1.2.3:5000")));
    assert!(t.socket_selected(local, sa("11.1.2.3:5000")));
    assert!(!t.socket_selected(local, sa("192.0.2.7:5000")));
    assert!(t.socket_selected(local, sa("192.0.2.8:5000")));
    assert!(!t.socket_selected(local, sa("[2001:db8::1]:5000")));
    assert!(!t.socket_selected(local, sa("11.1.2.3:5432")));
    // A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    let v6local = sa("[::]:443");
    assert!(!t.socket_selected(v6local, sa("[::ffff:10.9.9.9]:5000")));
    assert!(t.socket_selected(v6local, sa("[::ffff:11.9.9.9]:5000")));
    // And an IPv4 peer against a mapped CIDR.
    assert!(!t.socket_selected(local, sa("198.51.100.9:5000")));

    let t = target("    exclude: {local_ports: [22]}\n");
    let no_ports = Target {
        selector: Selector {
            exclude: t.selector.exclude.clone(),
            ..Selector::default()
        },
        ..t
    };
    assert!(!no_ports.socket_selected(sa("127.0.0.1:22"), sa("192.0.2.1:5000")));
    assert!(no_ports.socket_selected(sa("127.0.0.1:23"), sa("192.0.2.1:5000")));
}

#[test]
fn permission_rules() {
    assert_eq!(permission_problem(0o100600, 0), None);
    assert_eq!(permission_problem(0o100644, 0), None);
    assert_eq!(permission_problem(0o100400, 0), None);
    let p = permission_problem(0o100664, 0).expect("group-writable");
    assert!(p.contains("writable by group (mode 0664)"), "{p}");
    let p = permission_problem(0o100666, 0).expect("world-writable");
    assert!(p.contains("writable by group and others"), "{p}");
    let p = permission_problem(0o100600, 1000).expect("not root's");
    assert!(p.contains("owned by uid 1000, not root"), "{p}");
    let p = permission_problem(0o100602, 1000).expect("both");
    assert!(p.contains("uid 1000") && p.contains("others"), "{p}");
    assert_eq!(
        shell_quote("/etc/cwreap/cwreap.yaml"),
        "/etc/cwreap/cwreap.yaml"
    );
    assert_eq!(shell_quote("/tmp/a b"), "'/tmp/a b'");
}

#[test]
fn permission_check_on_a_real_file() {
    let dir = std::env::temp_dir().join(format!("cwreap-config-perm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let f = dir.join("policy.yaml");
    std::fs::write(&f, MIN).expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let r = check_file_permissions(&f);
    if rustix::process::geteuid().is_root() {
        let e = r
            .expect_err("world-writable file refused as root")
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
    } else {
        assert!(r.is_ok(), "only root refuses");
    }
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let own = std::fs::metadata(&f).expect("stat").uid();
    assert_eq!(
        check_file_permissions(&f).is_ok(),
        own == 0 || !cwreap_linux::sys::runs_privileged()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn load_reports_unreadable_files() {
    let e = load(Path::new("/nonexistent/cwreap.yaml")).expect_err("missing file");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/cwreap.yaml: cannot read the policy")
    );
}

#[test]
fn describe_is_explicit_and_round_trips() {
    let c = ok(MIN);
    let d = c.describe();
    for line in [
        "interval: \"30s\"",
        "dry_run: true",
        "log_format: text",
        "max_reaps_per_cycle: 100",
        "max_reaps_per_minute: 600",
        "listen: \"127.0.0.1:9814\"",
        "  - name: \"web\"",
        "      comm: \"^nginx$\"",
        "    older_than: \"5m\"",
        "    min_close_wait: 1",
        "    action: log",
        "    # dry_run: true (the global setting)",
    ] {
        assert!(d.contains(line), "missing {line:?} in\n{d}");
    }
    let full = ok(
        "metrics: {listen: off}\naudit_log: /var/log/cwreap/audit.jsonl\ntargets:\n  - name: 'a \"q\" \\\\ b'\n    match: {cmdline: 'x\\d+ \"y\"', local_ports: [80]}\n    older_than: 1h 2m 3s\n    exclude: {remote_cidrs: ['::ffff:10.0.0.0/104']}\n    action: shutdown\n    dry_run: false\n",
    );
    for c in [c, full] {
        let d = c.describe();
        let again = ok(&d);
        assert_eq!(again.describe(), d);
    }
}

/// A policy of targets, each given as `name: match-body | extra keys` (flow mappings).
fn targets(list: &[(&str, &str, &str)]) -> Config {
    let mut y = String::from("targets:\n");
    for (name, m, extra) in list {
        y.push_str(&format!(
            "  - name: {name}\n    older_than: 1m\n    match: {{{m}}}\n"
        ));
        if !extra.is_empty() {
            y.push_str(&format!("    {extra}\n"));
        }
    }
    ok(&y)
}

fn sock(local: &str, remote: &str) -> SocketFacts {
    SocketFacts {
        local: sa(local),
        remote: sa(remote),
    }
}

#[test]
fn a_socket_belongs_to_the_first_target_that_selects_it() {
    let c = targets(&[
        ("api", "comm: nginx, local_ports: [8080]", ""),
        ("admin", "comm: nginx, local_ports: [9090]", ""),
        (
            "rest",
            "comm: nginx",
            "exclude: {remote_cidrs: [10.0.0.0/8]}",
        ),
    ]);
    let f = facts();
    let all: Vec<usize> = (0..c.targets.len())
        .filter(|&i| c.targets[i].selector.matches(&f, None))
        .collect();
    assert_eq!(
        all,
        [0, 1, 2],
        "process criteria alone accept the process for all three"
    );
    let at = |local: &str, remote: &str| c.target_for(&all, &sock(local, remote));
    assert_eq!(at("127.0.0.1:8080", "192.0.2.1:5000"), Some(0));
    assert_eq!(at("127.0.0.1:9090", "192.0.2.1:5000"), Some(1));
    assert_eq!(at("127.0.0.1:7000", "192.0.2.1:5000"), Some(2));
    // Excluded by the only target whose ports it falls under: nobody's.
    assert_eq!(at("127.0.0.1:7000", "10.1.1.1:5000"), None);
    // `selects` is both halves at once.
    let s = sock("127.0.0.1:9090", "192.0.2.1:5000");
    assert!(!c.targets[0].selects(&f, &[], &s));
    assert!(c.targets[1].selects(&f, &[], &s));
    let other = ProcessFacts {
        comm: "apache".into(),
        ..facts()
    };
    assert!(!c.targets[1].selects(&other, &[], &s));
    // Only the targets that accept the process are asked.
    assert_eq!(
        c.target_for(&[2], &sock("127.0.0.1:8080", "192.0.2.1:5000")),
        Some(2)
    );
    assert_eq!(c.target_for(&[], &s), None);
}

fn shadows(c: &Config) -> Vec<(usize, usize)> {
    c.shadowed().iter().map(|s| (s.target, s.by)).collect()
}

#[test]
fn a_target_an_earlier_one_fully_covers_is_found() {
    // Same process criteria, and the earlier one takes any port: the second never acts.
    let c = targets(&[
        ("all", "comm: ^api$", ""),
        ("admin", "comm: ^api$, local_ports: [9090]", ""),
    ]);
    assert_eq!(shadows(&c), [(1, 0)]);
    let msg = c.shadow_message(c.shadowed()[0]);
    assert!(
        msg.starts_with("target `admin` never acts: target `all` (line 2)"),
        "{msg}"
    );
    assert!(
        c.describe()
            .contains("# WARNING: target `admin` never acts")
    );
    // Broader process criteria (fewer of them), a port set that covers, a cgroup prefix
    // over a deeper path, a CIDR exclusion inside the later one's.
    let c = targets(&[
        (
            "wide",
            "cgroup: /system.slice, local_ports: [80, 443]",
            "exclude: {remote_cidrs: [10.1.0.0/16], remote_ports: [5432]}",
        ),
        (
            "narrow",
            "cgroup: /system.slice/api.service, uid: 33, local_ports: [443]",
            "exclude: {remote_cidrs: [10.0.0.0/8], remote_ports: [5432, 6379]}",
        ),
    ]);
    assert_eq!(shadows(&c), [(1, 0)]);
    // A local-port exclusion of the first on a port the later one never selects is fine.
    let c = targets(&[
        ("a", "comm: x", "exclude: {local_ports: [22]}"),
        ("b", "comm: x, local_ports: [80]", ""),
    ]);
    assert_eq!(shadows(&c), [(1, 0)]);
    // The first shadowing target is named, once per shadowed target.
    let c = targets(&[
        ("a", "comm: x", ""),
        ("b", "comm: x", ""),
        ("c", "comm: x, uid: 1", ""),
    ]);
    assert_eq!(shadows(&c), [(1, 0), (2, 0)]);
}

#[test]
fn no_shadow_warning_without_proof() {
    for (first, later) in [
        // Split by port: both act (the reason targets are matched per socket).
        (
            ("comm: x, local_ports: [8080]", ""),
            ("comm: x, local_ports: [9090]", ""),
        ),
        // The later one takes ports the first does not.
        (("comm: x, local_ports: [80]", ""), ("comm: x", "")),
        // The first excludes sockets the later one selects.
        (
            ("comm: x", "exclude: {remote_ports: [5432]}"),
            ("comm: x", ""),
        ),
        (
            ("comm: x", "exclude: {remote_cidrs: [10.0.0.0/8]}"),
            ("comm: x", "exclude: {remote_cidrs: [10.1.0.0/16]}"),
        ),
        (("comm: x", "exclude: {local_ports: [22]}"), ("comm: x", "")),
        // Process criteria the later one does not have, or other regexes (which may well
        // match the same processes: not provable, so no warning).
        (("comm: x, uid: 1", ""), ("comm: x", "")),
        (("comm: ^x$", ""), ("comm: x", "")),
        (
            ("cgroup: /system.slice/a.service", ""),
            ("cgroup: /system.slice", ""),
        ),
        (("pid: 1", ""), ("pid: 2", "")),
        // A later target first: order matters.
    ] {
        let c = targets(&[("first", first.0, first.1), ("later", later.0, later.1)]);
        assert_eq!(shadows(&c), [], "{first:?} then {later:?}");
    }
    let c = targets(&[
        ("narrow", "comm: x, local_ports: [80]", ""),
        ("wide", "comm: x", ""),
    ]);
    assert_eq!(shadows(&c), []);
}

#[test]
fn target_names_are_summarised() {
    let c = targets(&[("a", "comm: x", ""), ("b", "comm: y", "")]);
    assert_eq!(c.target_names(5), "a,b");
    assert_eq!(c.target_names(1), "a and 1 more");
    let many: Vec<(String, String)> = (0..1000)
        .map(|i| (format!("t{i}"), format!("pid: {}", i + 1)))
        .collect();
    let list: Vec<(&str, &str, &str)> = many
        .iter()
        .map(|(n, m)| (n.as_str(), m.as_str(), ""))
        .collect();
    assert_eq!(
        targets(&list).target_names(5),
        "t0,t1,t2,t3,t4 and 995 more"
    );
}

#[test]
fn path_rules_for_directories_and_symlinks() {
    use cwreap_linux::secure_fs::{Kind, Meta};
    let meta = |kind: Kind, uid: u32, mode: u32| Meta {
        kind,
        uid,
        gid: 0,
        mode,
        nlink: 1,
        size: 0,
        dev: 0,
        ino: 0,
    };
    let p = Path::new("/srv/x");
    let root = [0];
    assert_eq!(
        path_problem(p, &meta(Kind::Directory, 0, 0o755), &root),
        None
    );
    // Sticky: others may add entries but not rename ours (/tmp).
    assert_eq!(
        path_problem(p, &meta(Kind::Directory, 0, 0o1777), &root),
        None
    );
    let open = path_problem(p, &meta(Kind::Directory, 0, 0o777), &root).expect("0777");
    assert!(
        open.contains("writable by others (mode 0777) and not sticky"),
        "{open}"
    );
    assert_eq!(
        path_fix(p, &meta(Kind::Directory, 0, 0o777), "root"),
        "fix: chmod go-w /srv/x"
    );
    let group = path_problem(p, &meta(Kind::Directory, 0, 0o775), &root).expect("0775");
    assert!(group.contains("writable by group"), "{group}");
    let theirs = path_problem(p, &meta(Kind::Directory, 1000, 0o755), &root).expect("uid 1000");
    assert!(theirs.contains("owned by uid 1000, not root"), "{theirs}");
    assert_eq!(
        path_fix(p, &meta(Kind::Directory, 1000, 0o755), "root"),
        "fix: chown root /srv/x"
    );
    assert_eq!(
        path_problem(p, &meta(Kind::Directory, 1000, 0o755), &[0, 1000]),
        None
    );
    assert_eq!(
        path_problem(p, &meta(Kind::Directory, 1000, 0o755), &[]),
        None
    );
    // A symlink's mode means nothing; its owner does.
    assert_eq!(path_problem(p, &meta(Kind::Symlink, 0, 0o777), &root), None);
    let link = path_problem(p, &meta(Kind::Symlink, 1000, 0o777), &root).expect("their symlink");
    assert!(
        link.contains("symlink /srv/x is owned by uid 1000"),
        "{link}"
    );
}

#[test]
fn load_refuses_what_is_not_a_regular_file_or_too_big() {
    let dir = std::env::temp_dir().join(format!("cwreap-config-kinds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let e = load(&dir).expect_err("a directory").to_string();
    assert!(e.contains("it is a directory, not a regular file"), "{e}");
    let big = dir.join("big.yaml");
    let mut text = String::from(MIN);
    while (text.len() as u64) <= MAX_POLICY_BYTES {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, &text).expect("write");
    let e = load(&big).expect_err("over 1 MiB").to_string();
    assert!(e.contains("larger than 1024 KiB"), "{e}");
    std::os::unix::fs::symlink(dir.join("missing"), dir.join("dangling")).expect("symlink");
    let e = load(&dir.join("dangling"))
        .expect_err("dangling")
        .to_string();
    assert!(e.contains("cannot read the policy"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `check`'s scan line is marked only where an earlier target may take some of its
/// sockets: targets on different ports, pids, users or networks are apart.
#[test]
fn scan_lines_are_marked_only_where_an_earlier_target_may_take_sockets() {
    let c = ok("targets:\n\
         \x20 - name: web\n    match: {comm: ^nginx$, local_ports: [80]}\n    older_than: 5m\n\
         \x20 - name: tls\n    match: {comm: ^nginx$, local_ports: [443]}\n    older_than: 5m\n\
         \x20 - name: pool\n    match: {uid: 0, remote_cidrs: [10.0.0.0/8]}\n    older_than: 5m\n\
         \x20 - name: lan\n    match: {uid: 0, remote_cidrs: [192.168.0.0/16]}\n    \
         exclude: {local_ports: [80, 443]}\n    older_than: 5m\n\
         \x20 - name: mapped\n    match: {uid: 0, remote_cidrs: ['::ffff:10.1.0.0/112']}\n    older_than: 5m\n\
         \x20 - name: any\n    match: {comm: ^java$}\n    older_than: 5m\n");
    let firsts: Vec<Vec<usize>> = (0..c.targets.len()).map(|i| c.may_take_first(i)).collect();
    assert_eq!(
        firsts,
        [
            vec![],
            vec![],        // another port
            vec![0, 1],    // any port of any process: it may be nginx's
            vec![],        // nginx's ports excluded, and a network apart from `pool`'s
            vec![0, 1, 2], // an IPv4-mapped network inside `pool`'s
            vec![0, 1, 2, 3, 4],
        ]
    );
    let d = c.describe();
    let marks: Vec<&str> = d
        .lines()
        .filter_map(|l| l.trim().strip_prefix("# "))
        .filter(|l| l.contains("cwreap scan"))
        .collect();
    assert_eq!(marks.len(), 6, "{d}");
    assert!(
        marks[0].starts_with("the same sockets: cwreap scan --comm"),
        "{d}"
    );
    assert!(marks[1].starts_with("the same sockets: cwreap scan"), "{d}");
    assert!(
        marks[2].starts_with("the same sockets, minus any `web` or `tls` takes first:"),
        "{d}"
    );
}

#[test]
fn every_duration_and_count_is_bounded() {
    for (yaml, needle) in [
        (format!("interval: 300000000000y\n{MIN}"), "longer than"),
        (format!("interval: 2d\n{MIN}"), "look at least once a day"),
        (
            "targets:\n  - {name: a, match: {comm: x}, older_than: 366d}\n".to_owned(),
            "longer than",
        ),
        (
            format!("limits: {{max_reaps_per_cycle: 10000001}}\n{MIN}"),
            "more than 10000000",
        ),
        (
            "targets:\n  - {name: a, match: {comm: x}, older_than: 1m, min_close_wait: 99999999999}\n"
                .to_owned(),
            "more than 10000000",
        ),
    ] {
        let e = err(&yaml);
        assert!(e.contains(needle), "{yaml}: {e}");
        assert!(e.starts_with("t.yaml:"), "positioned: {e}");
    }
    assert_eq!(
        ok(&format!("interval: 1d\n{MIN}")).interval,
        Duration::from_secs(86_400)
    );
    let long = ok("targets:\n  - {name: a, match: {comm: x}, older_than: 365d}\n");
    assert_eq!(
        long.targets[0].older_than,
        Duration::from_secs(365 * 86_400)
    );
}

#[test]
fn regexes_share_one_budget_and_a_pattern_has_a_length_cap() {
    // 40 targets of `\w{120}` (Unicode word characters): each alone compiles, all together
    // took seconds and hundreds of MB. Now the policy is refused at once, positioned.
    let mut y = String::from("targets:\n");
    for i in 0..40 {
        y.push_str(&format!(
            "  - {{name: t{i}, match: {{cmdline: '\\w{{120}}'}}, older_than: 1m}}\n"
        ));
    }
    let started = std::time::Instant::now();
    let e = err(&y);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(e.contains("size limit"), "{e}");
    assert!(
        e.starts_with("t.yaml:2:"),
        "the first target's pattern: {e}"
    );
    // A few ordinary patterns pass, as before.
    let mut y = String::from("targets:\n");
    for i in 0..200 {
        y.push_str(&format!(
            "  - {{name: t{i}, match: {{comm: '^java-{i}$'}}, older_than: 1m}}\n"
        ));
    }
    assert_eq!(ok(&y).targets.len(), 200);
    // A literal longer than the cap is refused, whatever it compiles to.
    let lit = "x".repeat(2000);
    let e = err(&format!(
        "targets:\n  - {{name: a, match: {{cmdline: '{lit}'}}, older_than: 1m}}\n"
    ));
    assert!(e.contains("at most 1024"), "{e}");
}
