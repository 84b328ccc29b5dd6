//! The policy as written: every value keeps its position; values that need checking are
//! read as text so the messages are ours, and an explicit null is kept so it can be refused
//! rather than silently widening a match. Also the YAML errors, made into one line with a
//! position and, for unknown keys, a suggestion.

use serde::{Deserialize, Deserializer};
use serde_saphyr::{Location, MessageFormatter, Spanned, UserMessageFormatter};

use super::error::Position;
pub(super) use crate::shared::values::one_line;

pub(super) type Key<T> = Option<Spanned<Option<T>>>;
pub(super) type List = Key<Vec<Spanned<String>>>;

pub(super) fn key<'de, D, T>(d: D) -> Result<Key<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Spanned::<Option<T>>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default, deserialize_with = "key")]
    pub(super) interval: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) dry_run: Key<bool>,
    #[serde(default, deserialize_with = "key")]
    pub(super) log_format: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) audit_log: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) on_audit_failure: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) still_held_after: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) discovery: Key<String>,
    #[serde(default, rename = "where", deserialize_with = "key")]
    pub(super) where_: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) limits: Key<RawLimits>,
    #[serde(default, deserialize_with = "key")]
    pub(super) metrics: Key<RawMetrics>,
    #[serde(default, deserialize_with = "key")]
    pub(super) targets: Key<Vec<Spanned<RawTarget>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    #[serde(default, deserialize_with = "key")]
    pub(super) max_reaps_per_cycle: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) max_reaps_per_minute: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) max_escalations_per_minute: Key<String>,
}

/// `metrics:` is either a word (`off`, as the README writes it) or a block.
#[derive(Debug)]
pub(super) enum RawMetrics {
    /// A scalar; only `off` is valid (checked in validate, with its position).
    Word(String),
    Block(RawMetricsBlock),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetricsBlock {
    #[serde(default, deserialize_with = "key")]
    pub(super) listen: Key<String>,
}

impl<'de> Deserialize<'de> for RawMetrics {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl<'de> serde::de::Visitor<'de> for Either {
            type Value = RawMetrics;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("`off` or a mapping such as `{listen: 127.0.0.1:9814}`")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawMetrics, E> {
                Ok(RawMetrics::Word(v.to_owned()))
            }
            // YAML 1.1 reads a bare `off` as false; say it as it was written.
            fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<RawMetrics, E> {
                Ok(RawMetrics::Word(if v { "on" } else { "off" }.to_owned()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawMetrics, E> {
                Ok(RawMetrics::Word(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawMetrics, E> {
                Ok(RawMetrics::Word(v.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<RawMetrics, A::Error> {
                RawMetricsBlock::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawMetrics::Block)
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTarget {
    #[serde(default, deserialize_with = "key")]
    pub(super) name: Key<String>,
    #[serde(default, deserialize_with = "key", rename = "match")]
    pub(super) matcher: Key<RawMatch>,
    #[serde(default, deserialize_with = "key")]
    pub(super) older_than: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) min_close_wait: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) exclude: Key<RawExclude>,
    #[serde(default, deserialize_with = "key")]
    pub(super) action: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) dry_run: Key<bool>,
    #[serde(default, deserialize_with = "key")]
    pub(super) escalate: Key<RawEscalate>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEscalate {
    /// Removed; kept so its use gets the reason and the replacements, not "unknown key".
    #[serde(default, deserialize_with = "key")]
    pub(super) close_after: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) raise_fd_limit_at: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) signal_at: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) raise_before_emfile: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) signal_before_emfile: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) signal: Key<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    #[serde(default, deserialize_with = "key")]
    pub(super) pid: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) pid_file: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) comm: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) exe: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) cmdline: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) systemd_unit: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) cgroup: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) uid: Key<String>,
    #[serde(default, deserialize_with = "key")]
    pub(super) local_ports: List,
    #[serde(default, deserialize_with = "key")]
    pub(super) remote_ports: List,
    #[serde(default, deserialize_with = "key")]
    pub(super) local_cidrs: List,
    #[serde(default, deserialize_with = "key")]
    pub(super) remote_cidrs: List,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawExclude {
    #[serde(default, deserialize_with = "key")]
    pub(super) remote_cidrs: List,
    #[serde(default, deserialize_with = "key")]
    pub(super) local_ports: List,
    #[serde(default, deserialize_with = "key")]
    pub(super) remote_ports: List,
}

pub(super) const MATCH_KEYS: &str = "pid, pid_file, comm, exe, cmdline, systemd_unit, cgroup, uid, local_ports, remote_ports, local_cidrs, remote_cidrs";

/// A validation failure before the file name is attached.
#[derive(Debug)]
pub(super) struct Problem {
    pub(super) position: Option<Position>,
    pub(super) message: String,
}

pub(super) fn position(loc: &Location) -> Option<Position> {
    (*loc != Location::UNKNOWN && loc.line() > 0).then(|| Position {
        line: loc.line(),
        column: loc.column(),
    })
}

pub(super) fn problem_at(loc: &Location, message: impl Into<String>) -> Problem {
    Problem {
        position: position(loc),
        message: message.into(),
    }
}

/// The value of a key that was written, refusing an explicit null.
pub(super) fn given<'a, T>(
    k: &'a Key<T>,
    what: &str,
) -> Result<Option<(&'a T, &'a Location)>, Problem> {
    match k {
        None => Ok(None),
        Some(Spanned {
            value: Some(v),
            referenced,
            ..
        }) => Ok(Some((v, referenced))),
        Some(Spanned {
            value: None,
            referenced,
            ..
        }) => Err(problem_at(
            referenced,
            format!("{what} has no value; give one or remove the key"),
        )),
    }
}

/// A written scalar, parsed; the error points at the value.
pub(super) fn scalar<T>(
    k: &Key<String>,
    what: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, Problem> {
    match given(k, what)? {
        None => Ok(None),
        Some((text, loc)) => parse(text)
            .map(Some)
            .map_err(|e| problem_at(loc, format!("{what}: {e}"))),
    }
}

/// A written list of scalars, each parsed; the error points at the bad item.
pub(super) fn list<T>(
    k: &List,
    what: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<(Vec<T>, Location)>, Problem> {
    let Some((items, loc)) = given(k, what)? else {
        return Ok(None);
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let v =
            parse(&item.value).map_err(|e| problem_at(&item.referenced, format!("{what}: {e}")))?;
        out.push(v);
    }
    Ok(Some((out, *loc)))
}

pub(super) fn block<T>(k: &Key<T>) -> Option<&T> {
    k.as_ref().and_then(|s| s.value.as_ref())
}

pub(super) fn yaml_problem(text: &str, err: &serde_saphyr::Error) -> Problem {
    let mut inner = err;
    while let serde_saphyr::Error::AliasError { error, .. }
    | serde_saphyr::Error::WithSnippet { error, .. } = inner
    {
        inner = error;
    }
    let loc = err.location().or_else(|| inner.location());
    let context = loc.as_ref().and_then(|l| target_at(text, l));
    // The scanner reports a tab at the start of the token it was reading (often the line
    // above); point at the tab itself.
    if let Some(tab) = loc
        .as_ref()
        .filter(|_| inner.to_string().contains("tab"))
        .and_then(|l| first_tab_from(text, l.line()))
    {
        return Problem {
            position: Some(tab),
            message: "a tab character: YAML indents with spaces only".to_owned(),
        };
    }
    let message = match inner {
        serde_saphyr::Error::SerdeUnknownField {
            field, expected, ..
        } => unknown_key_message(field, expected, context.as_deref()),
        other => {
            let msg = match other {
                serde_saphyr::Error::Unexpected { expected, .. } => match *expected {
                    "mapping start" => "expected a mapping (`key: value` lines) here".to_owned(),
                    "sequence start" => "expected a list (`[a, b]` or `- a` lines) here".to_owned(),
                    "string scalar" => {
                        "expected a single value here, not a list or a mapping".to_owned()
                    }
                    e => format!("expected {e}"),
                },
                _ => one_line(&UserMessageFormatter.format_message(other)),
            };
            match context {
                Some(t) => format!("{msg} (in target {t})"),
                None => msg,
            }
        }
    };
    Problem {
        position: loc.as_ref().and_then(position),
        message,
    }
}

/// Line and column (1-based) of the first tab on line `from` or after.
fn first_tab_from(text: &str, from: u64) -> Option<Position> {
    text.lines().enumerate().find_map(|(i, l)| {
        let line = i as u64 + 1;
        let col = l.find('\t')?;
        (line >= from).then(|| Position {
            line,
            column: l[..col].chars().count() as u64 + 1,
        })
    })
}

pub(super) fn unknown_key_message(field: &str, expected: &[&str], target: Option<&str>) -> String {
    let target = target.unwrap_or("`?`");
    let has = |k: &str| expected.contains(&k);
    let place = if has("targets") {
        "at the top level".to_owned()
    } else if has("older_than") {
        format!("in target {target}")
    } else if has("cmdline") {
        format!("in the `match` block of target {target}")
    } else if has("remote_cidrs") {
        format!("in the `exclude` block of target {target}")
    } else if has("max_reaps_per_cycle") {
        "in `limits`".to_owned()
    } else if has("listen") {
        "in `metrics`".to_owned()
    } else {
        "here".to_owned()
    };
    let hint = if has("older_than") && MATCH_KEYS.split(", ").any(|k| k == field) {
        format!("; `{field}` is a criterion: put it under `match:`")
    } else if let Some(s) = suggest(field, expected) {
        format!("; did you mean `{s}`?")
    } else {
        format!("; valid keys: {}", expected.join(", "))
    };
    format!("unknown key `{field}` {place}{hint}")
}

/// The target (as "`name`" or "#N") whose block holds `loc`, found by a lenient second
/// read that only looks at where each target starts.
pub(super) fn target_at(text: &str, loc: &Location) -> Option<String> {
    #[derive(Deserialize)]
    struct Skeleton {
        #[serde(default)]
        targets: Option<Vec<Spanned<SkeletonTarget>>>,
    }
    #[derive(Deserialize)]
    struct SkeletonTarget {
        #[serde(default)]
        name: Option<AnyName>,
    }
    /// Whatever the name is, even a wrong type, so the skeleton itself reads.
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum AnyName {
        Text(String),
        Other(serde::de::IgnoredAny),
    }
    let skeleton: Skeleton = serde_saphyr::from_str(text).ok()?;
    let targets = skeleton.targets?;
    let here = (loc.line(), loc.column());
    let starts: Vec<(u64, u64)> = targets
        .iter()
        .map(|t| (t.referenced.line(), t.referenced.column()))
        .collect();
    let i = starts.iter().enumerate().rposition(|(_, s)| *s <= here)?;
    let (line, column) = starts[i];
    // A key of the target is at its first key's column or deeper; anything shallower
    // after it belongs to the document around the list.
    if here.0 > line && here.1 < column {
        return None;
    }
    Some(match &targets[i].value.name {
        Some(AnyName::Text(n)) if !n.trim().is_empty() => format!("`{}`", n.trim()),
        _ => format!("#{}", i + 1),
    })
}

/// The candidate closest to `word` by optimal-string-alignment distance (typos, swapped
/// letters), if close enough to be a plausible typo.
pub(super) fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word = word.to_lowercase();
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .iter()
        .map(|c| (edit_distance(&word, &c.to_lowercase()), *c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // d[i][j]: distance between a[..i] and b[..j].
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}
