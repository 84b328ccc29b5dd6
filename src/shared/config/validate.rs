//! Raw → [`Config`] in one step: each value parsed and checked, each rule applied, and the
//! first problem reported with the position of the offending key or value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use super::error::Position;
use super::model::*;
use super::raw::*;
use crate::shared::selector::{Exclude, Selector};
use crate::shared::values::*;

/// A duration no shorter than [`MIN_INTERVAL`]: a cycle reads /proc and dumps sock_diag,
/// and back to back they would keep a core busy.
pub(super) fn parse_interval(s: &str) -> Result<Duration, String> {
    parse_period(s, MIN_INTERVAL)
}

pub(super) fn parse_listen(s: &str) -> Result<Option<SocketAddr>, String> {
    let t = s.trim();
    if t == "off" {
        return Ok(None);
    }
    match t.parse::<SocketAddr>() {
        Ok(a) if a.port() == 0 => Err(format!("`{s}`: port 0 is not allowed")),
        Ok(a) => Ok(Some(a)),
        Err(_) => Err(format!(
            "`{s}` is not an ip:port address (e.g. 127.0.0.1:9814 or [::1]:9814) or `off`"
        )),
    }
}

pub(super) fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s.trim() {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        other => Err(format!("`{other}` is not one of `text`, `json`")),
    }
}

pub(super) fn parse_action(s: &str) -> Result<Action, String> {
    match s.trim() {
        "log" => Ok(Action::Log),
        "shutdown" => Ok(Action::Shutdown),
        "destroy" => Ok(Action::Destroy),
        other => {
            let hint = suggest(other, &["log", "shutdown", "destroy"])
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            Err(format!(
                "`{other}` is not one of `log`, `shutdown`, `destroy`{hint}"
            ))
        }
    }
}

impl Config {
    pub(super) fn from_raw(raw: RawConfig) -> Result<Config, Problem> {
        let interval = scalar(&raw.interval, "`interval`", parse_interval)?;
        let dry_run = given(&raw.dry_run, "`dry_run`")?.map(|(v, _)| *v);
        let log_format = scalar(&raw.log_format, "`log_format`", parse_log_format)?;
        let audit_log = scalar(&raw.audit_log, "`audit_log`", parse_absolute_path)?;
        let on_audit_failure = scalar(&raw.on_audit_failure, "`on_audit_failure`", |s| {
            match s.trim() {
                "skip" => Ok(OnAuditFailure::Skip),
                "act" => Ok(OnAuditFailure::Act),
                other => Err(format!("`{other}` is neither `skip` nor `act`")),
            }
        })?;
        let discovery = scalar(&raw.discovery, "`discovery`", |s| match s.trim() {
            "auto" => Ok(Discovery::Auto),
            "events" => Ok(Discovery::Events),
            "poll" => Ok(Discovery::Poll),
            other => Err(format!("`{other}` is not one of `auto`, `events`, `poll`")),
        })?;
        let where_stacks = scalar(&raw.where_, "`where`", |s| match s.trim() {
            "on" => Ok(true),
            "off" => Ok(false),
            other => Err(format!("`{other}` is neither `on` nor `off`")),
        })?;
        let still_held_after = scalar(&raw.still_held_after, "`still_held_after`", parse_duration)?;
        let limits = match block(&raw.limits) {
            None => Limits {
                max_reaps_per_cycle: DEFAULT_MAX_REAPS_PER_CYCLE,
                max_reaps_per_minute: DEFAULT_MAX_REAPS_PER_MINUTE,
                max_escalations_per_minute: DEFAULT_MAX_ESCALATIONS_PER_MINUTE,
            },
            Some(l) => Limits {
                max_reaps_per_cycle: scalar(
                    &l.max_reaps_per_cycle,
                    "`limits.max_reaps_per_cycle`",
                    parse_count,
                )?
                .unwrap_or(DEFAULT_MAX_REAPS_PER_CYCLE),
                max_reaps_per_minute: scalar(
                    &l.max_reaps_per_minute,
                    "`limits.max_reaps_per_minute`",
                    parse_count,
                )?
                .unwrap_or(DEFAULT_MAX_REAPS_PER_MINUTE),
                max_escalations_per_minute: scalar(
                    &l.max_escalations_per_minute,
                    "`limits.max_escalations_per_minute`",
                    parse_count,
                )?
                .unwrap_or(DEFAULT_MAX_ESCALATIONS_PER_MINUTE),
            },
        };
        // An empty `metrics:` block means the defaults, like `limits:`.
        let listen = match &raw.metrics {
            Some(Spanned {
                value: Some(RawMetrics::Block(m)),
                ..
            }) => scalar(&m.listen, "`metrics.listen`", parse_listen)?,
            Some(Spanned {
                value: Some(RawMetrics::Word(w)),
                referenced,
                ..
            }) => {
                if w.trim() != "off" {
                    return Err(problem_at(
                        referenced,
                        format!(
                            "`metrics`: `{w}` is neither `off` nor a mapping such as \
                             `{{listen: 127.0.0.1:9814}}`"
                        ),
                    ));
                }
                Some(None)
            }
            _ => None,
        };
        let listen = match listen {
            Some(l) => l,
            None => parse_listen(DEFAULT_METRICS_LISTEN).map_err(|message| Problem {
                position: None,
                message,
            })?,
        };

        let targets = match &raw.targets {
            None => {
                return Err(Problem {
                    position: None,
                    message: "no `targets`: list at least one target, e.g. \
                              `targets: [{name: web, match: {comm: ^nginx$}, older_than: 10m}]`"
                        .to_owned(),
                });
            }
            Some(Spanned {
                value, referenced, ..
            }) => match value {
                Some(list) if !list.is_empty() => list,
                _ => {
                    return Err(problem_at(
                        referenced,
                        "`targets` is empty: list at least one target",
                    ));
                }
            },
        };
        let mut seen: HashMap<String, Option<Position>> = HashMap::new();
        let mut out = Vec::with_capacity(targets.len());
        // Every regex of the policy shares one budget.
        let patterns: usize = targets
            .iter()
            .filter_map(|t| t.value.matcher.as_ref()?.value.as_ref())
            .map(|m| {
                [&m.comm, &m.exe, &m.cmdline]
                    .iter()
                    .filter(|k| k.is_some())
                    .count()
            })
            .sum();
        let regex_limit = regex_share(patterns);
        for (i, t) in targets.iter().enumerate() {
            let target = Target::from_raw(&t.value, &t.referenced, i + 1, regex_limit)?;
            let name_loc = t.value.name.as_ref().map_or(t.referenced, |n| n.referenced);
            if let Some(first) = seen.get(&target.name) {
                let first = first
                    .map(|p| format!(" (first used at line {})", p.line))
                    .unwrap_or_default();
                return Err(problem_at(
                    &name_loc,
                    format!("duplicate target name `{}`{first}", target.name),
                ));
            }
            seen.insert(target.name.clone(), position(&name_loc));
            out.push(target);
        }

        Ok(Config {
            interval: interval.unwrap_or(DEFAULT_INTERVAL),
            // Safe by default: a policy must say `dry_run: false` to shut anything down.
            dry_run: dry_run.unwrap_or(true),
            log_format: log_format.unwrap_or(LogFormat::Text),
            audit_log,
            on_audit_failure: on_audit_failure.unwrap_or_default(),
            still_held_after,
            discovery: discovery.unwrap_or_default(),
            where_stacks: where_stacks.unwrap_or(false),
            limits,
            metrics: Metrics { listen },
            targets: out,
        })
    }
}

impl Target {
    pub(super) fn from_raw(
        raw: &RawTarget,
        at: &Location,
        index: usize,
        regex_limit: usize,
    ) -> Result<Target, Problem> {
        let name = match given(&raw.name, &format!("`name` of target #{index}"))? {
            None => {
                return Err(problem_at(at, format!("target #{index} has no `name`")));
            }
            Some((n, loc)) => {
                let n = n.trim();
                if n.is_empty() {
                    return Err(problem_at(
                        loc,
                        format!("target #{index} has an empty `name`"),
                    ));
                }
                if n.chars().any(char::is_control) {
                    return Err(problem_at(
                        loc,
                        format!("the `name` of target #{index} contains control characters"),
                    ));
                }
                n.to_owned()
            }
        };
        let ctx = format!("in target `{name}`");
        let what = |k: &str| format!("`{k}` {ctx}");

        let matcher = match &raw.matcher {
            None => {
                return Err(problem_at(
                    at,
                    format!(
                        "target `{name}` has no `match` block; give at least one of {MATCH_KEYS}"
                    ),
                ));
            }
            Some(Spanned {
                value, referenced, ..
            }) => {
                let empty = RawMatch::default();
                selector_from_raw(
                    value.as_ref().unwrap_or(&empty),
                    referenced,
                    &name,
                    regex_limit,
                )?
            }
        };

        let older_than = match scalar(&raw.older_than, &what("older_than"), parse_duration)? {
            Some(d) => d,
            None => {
                return Err(problem_at(
                    at,
                    format!(
                        "target `{name}` has no `older_than`; it is required (e.g. `older_than: 10m`, \
                         above the clients' pool idle timeouts)"
                    ),
                ));
            }
        };
        let min_close_wait =
            scalar(&raw.min_close_wait, &what("min_close_wait"), parse_count)?.unwrap_or(1);

        let exclude = match block(&raw.exclude) {
            None => Exclude::default(),
            Some(e) => {
                let w = |k: &str| format!("`exclude.{k}` {ctx}");
                let ports = |k: &List, key: &str| {
                    Ok::<_, Problem>(
                        list(k, &w(key), parse_port)?
                            .map(|(v, _)| v)
                            .unwrap_or_default(),
                    )
                };
                let local_ports = ports(&e.local_ports, "local_ports")?;
                if let Some(p) = local_ports.iter().find(|p| matcher.local_ports.contains(p)) {
                    let loc = e
                        .local_ports
                        .as_ref()
                        .and_then(|s| s.value.as_ref())
                        .and_then(|items| items.iter().find(|i| parse_port(&i.value) == Ok(*p)))
                        .map(|i| i.referenced)
                        .unwrap_or(Location::UNKNOWN);
                    return Err(problem_at(
                        &loc,
                        format!(
                            "{}: port {p} is both matched and excluded, so it selects nothing",
                            w("local_ports")
                        ),
                    ));
                }
                Exclude {
                    remote_cidrs: list(&e.remote_cidrs, &w("remote_cidrs"), parse_cidr)?
                        .map(|(v, _)| v)
                        .unwrap_or_default(),
                    local_ports,
                    remote_ports: ports(&e.remote_ports, "remote_ports")?,
                }
            }
        };

        let action = scalar(&raw.action, &what("action"), parse_action)?.unwrap_or(Action::Log);
        let dry_run = given(&raw.dry_run, &what("dry_run"))?.map(|(v, _)| *v);
        let escalate = match &raw.escalate {
            None => Escalate::default(),
            Some(Spanned {
                value, referenced, ..
            }) => Escalate::from_raw(value.as_ref(), referenced, &name)?,
        };

        Ok(Target {
            name,
            at: position(at),
            selector: Selector { exclude, ..matcher },
            older_than,
            min_close_wait,
            action,
            dry_run,
            escalate,
        })
    }
}

/// A criterion written once, as the list a [`Selector`] holds.
fn one_of<T>(v: Option<T>) -> Vec<T> {
    v.into_iter().collect()
}

/// The `match:` block as a [`Selector`] (its exclusions come from `exclude:`). Each process
/// criterion holds one value in a policy; the socket criteria are lists.
pub(super) fn selector_from_raw(
    raw: &RawMatch,
    at: &Location,
    name: &str,
    regex_limit: usize,
) -> Result<Selector, Problem> {
    let parse_regex = |s: &str| parse_regex_within(s, regex_limit);
    let what = |k: &str| format!("`match.{k}` in target `{name}`");
    /// A list key that is present must not be empty (it would select nothing).
    fn non_empty<T>(got: Option<(Vec<T>, Location)>, what: String) -> Result<Vec<T>, Problem> {
        match got {
            Some((items, loc)) if items.is_empty() => Err(problem_at(
                &loc,
                format!("{what} is empty; list some or remove the key"),
            )),
            Some((items, _)) => Ok(items),
            None => Ok(Vec::new()),
        }
    }
    let m = Selector {
        pids: one_of(scalar(&raw.pid, &what("pid"), parse_pid)?),
        pid_files: one_of(scalar(
            &raw.pid_file,
            &what("pid_file"),
            parse_absolute_path,
        )?),
        comm: one_of(scalar(&raw.comm, &what("comm"), parse_regex)?),
        exe: one_of(scalar(&raw.exe, &what("exe"), parse_regex)?),
        cmdline: one_of(scalar(&raw.cmdline, &what("cmdline"), parse_regex)?),
        units: one_of(scalar(
            &raw.systemd_unit,
            &what("systemd_unit"),
            parse_unit,
        )?),
        cgroups: one_of(scalar(&raw.cgroup, &what("cgroup"), parse_cgroup_prefix)?),
        uids: one_of(scalar(&raw.uid, &what("uid"), parse_uid)?),
        local_ports: non_empty(
            list(&raw.local_ports, &what("local_ports"), parse_port)?,
            what("local_ports"),
        )?,
        remote_ports: non_empty(
            list(&raw.remote_ports, &what("remote_ports"), parse_port)?,
            what("remote_ports"),
        )?,
        local_cidrs: non_empty(
            list(&raw.local_cidrs, &what("local_cidrs"), parse_cidr)?,
            what("local_cidrs"),
        )?,
        remote_cidrs: non_empty(
            list(&raw.remote_cidrs, &what("remote_cidrs"), parse_cidr)?,
            what("remote_cidrs"),
        )?,
        exclude: Exclude::default(),
    };
    if m.is_empty() {
        return Err(problem_at(
            at,
            format!(
                "the `match` block of target `{name}` is empty, which would select every \
                 process; give at least one of {MATCH_KEYS}"
            ),
        ));
    }
    Ok(m)
}

/// `80%` (or `80`) → 80, from 1 to 100.
pub(super) fn parse_percent(s: &str) -> Result<u8, String> {
    let t = s.trim();
    let digits = t.strip_suffix('%').unwrap_or(t).trim();
    match digits.parse::<u32>() {
        Ok(p) if (1..=100).contains(&p) => u8::try_from(p).map_err(|e| e.to_string()),
        _ => Err(format!(
            "`{s}` is not a percentage from 1% to 100% of the soft fd limit (e.g. 80%)"
        )),
    }
}

pub(super) fn parse_signal(s: &str) -> Result<Signal, String> {
    let t = s.trim().to_ascii_uppercase();
    let name = if t.starts_with("SIG") {
        t
    } else {
        format!("SIG{t}")
    };
    Signal::ALL
        .into_iter()
        .find(|sig| sig.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = Signal::ALL.iter().map(|s| s.name()).collect();
            format!("`{s}` is not one of {}", names.join(", "))
        })
}

impl Escalate {
    fn from_raw(raw: Option<&RawEscalate>, at: &Location, name: &str) -> Result<Escalate, Problem> {
        let Some(raw) = raw else {
            return Err(problem_at(
                at,
                format!(
                    "target `{name}`: `escalate` is empty; give `raise_fd_limit_at`, `signal_at`, `raise_before_emfile` or `signal_before_emfile`, or remove it"
                ),
            ));
        };
        let window = |s: &str| {
            let d = parse_duration(s)?;
            if d > MAX_FORECAST_WINDOW {
                return Err(format!(
                    "`{}` is longer than {}: a forecast that far out is no forecast",
                    s.trim(),
                    humantime::format_duration(MAX_FORECAST_WINDOW)
                ));
            }
            Ok(d)
        };
        if let Some(k) = &raw.close_after {
            return Err(problem_at(&k.referenced, NO_CLOSE_IN_DAEMON));
        }
        let what = |k: &str| format!("`escalate.{k}` in target `{name}`");
        let raise_fd_limit_at = scalar(
            &raw.raise_fd_limit_at,
            &what("raise_fd_limit_at"),
            parse_percent,
        )?;
        let signal_at = scalar(&raw.signal_at, &what("signal_at"), parse_percent)?;
        let raise_before_emfile = scalar(
            &raw.raise_before_emfile,
            &what("raise_before_emfile"),
            window,
        )?;
        let signal_before_emfile = scalar(
            &raw.signal_before_emfile,
            &what("signal_before_emfile"),
            window,
        )?;
        let signal = scalar(&raw.signal, &what("signal"), parse_signal)?;
        if signal.is_some() && signal_at.is_none() && signal_before_emfile.is_none() {
            let loc = raw.signal.as_ref().map_or(*at, |k| k.referenced);
            return Err(problem_at(
                &loc,
                format!(
                    "{}: `signal` needs `signal_at` or `signal_before_emfile` (e.g. `signal_at: 95%`)",
                    what("signal")
                ),
            ));
        }
        if let (Some(raise), Some(sig)) = (raise_before_emfile, signal_before_emfile)
            && raise <= sig
        {
            let loc = raw
                .raise_before_emfile
                .as_ref()
                .map_or(*at, |k| k.referenced);
            return Err(problem_at(
                &loc,
                format!(
                    "{}: {} must be longer than `signal_before_emfile` ({}): the raise comes first, the signal is the last resort",
                    what("raise_before_emfile"),
                    humantime::format_duration(raise),
                    humantime::format_duration(sig)
                ),
            ));
        }
        if let (Some(raise), Some(sig)) = (raise_fd_limit_at, signal_at)
            && sig <= raise
        {
            let loc = raw.signal_at.as_ref().map_or(*at, |k| k.referenced);
            return Err(problem_at(
                &loc,
                format!(
                    "{}: {sig}% must be above `raise_fd_limit_at` ({raise}%): the signal is the last resort",
                    what("signal_at")
                ),
            ));
        }
        let e = Escalate {
            raise_fd_limit_at,
            signal_at,
            raise_before_emfile,
            signal_before_emfile,
            signal: signal.unwrap_or_default(),
        };
        if !e.any() {
            return Err(problem_at(
                at,
                format!(
                    "target `{name}`: `escalate` is empty; give `raise_fd_limit_at`, `signal_at`, `raise_before_emfile` or `signal_before_emfile`, or remove it"
                ),
            ));
        }
        Ok(e)
    }
}
