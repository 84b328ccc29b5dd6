//! The README's command line is the real one. The synopsis lines of its Commands block
//! (`cwreap scan [SELECTORS] [--older-than DUR] ...`) are parsed by the clap definition
//! itself: every flag exists, takes a value exactly when the line gives one, under the
//! same name, optional exactly when the line says so, and every combination the line
//! offers parses (`Cli::try_parse_from`). Every subcommand and every flag of the command
//! line is in that section, and every flag there exists. The JSON fields the README lists
//! are those cwreap prints. Each check is a function of the README's text, and is shown to
//! fail on a README with a flag renamed or left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use clap::{CommandFactory, Parser};
use cwreap::cli::args::Cli;
use serde_json::Value;

use super::readme::{cwreap_commands_in, readme, shell_lines};
use crate::support::*;

/// The README's section under `heading` (up to the next `## `).
fn section<'a>(text: &'a str, heading: &str) -> &'a str {
    let start = text
        .find(heading)
        .unwrap_or_else(|| panic!("no {heading:?} in the README"));
    let rest = &text[start + heading.len()..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// Lines of the plain (not `sh`, not `yaml`) fenced blocks of `text`.
fn plain_block_lines(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside: Option<bool> = None;
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with("```") {
            inside = match inside {
                None => Some(t == "```"),
                Some(_) => None,
            };
            continue;
        }
        if inside == Some(true) {
            out.push(line.to_owned());
        }
    }
    out
}

/// One piece of a synopsis line: a word, or an optional group of alternatives.
#[derive(Debug, Clone)]
enum Node {
    Word(String),
    Optional(Vec<Vec<Node>>),
}

fn tokens(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for w in line.split_whitespace() {
        let mut w = w;
        while let Some(rest) = w.strip_prefix('[') {
            out.push("[".to_owned());
            w = rest;
        }
        let closing = w.len() - w.trim_end_matches(']').len();
        let core = &w[..w.len() - closing];
        if !core.is_empty() {
            out.push(core.to_owned());
        }
        out.extend(std::iter::repeat_n("]".to_owned(), closing));
    }
    out
}

/// Alternatives (split by `|`) up to the `]` that closes the group, or the end.
fn parse_group(tokens: &[String], at: &mut usize) -> Result<Vec<Vec<Node>>, String> {
    let mut alts = vec![Vec::new()];
    while let Some(t) = tokens.get(*at) {
        *at += 1;
        match t.as_str() {
            "]" => return Ok(alts),
            "|" => alts.push(Vec::new()),
            "[" => {
                let inner = parse_group(tokens, at)?;
                if let Some(a) = alts.last_mut() {
                    a.push(Node::Optional(inner));
                }
            }
            w => {
                if let Some(a) = alts.last_mut() {
                    a.push(Node::Word(w.to_owned()));
                }
            }
        }
    }
    Ok(alts)
}

fn synopsis(line: &str) -> Result<Vec<Node>, String> {
    let toks = tokens(line);
    let mut at = 0;
    let mut alts = parse_group(&toks, &mut at)?;
    if at != toks.len() || alts.len() != 1 {
        return Err(format!("unbalanced brackets or a bare `|` in `{line}`"));
    }
    Ok(alts.remove(0))
}

fn is_placeholder(w: &str) -> bool {
    !w.starts_with('-')
        && w.chars()
            .all(|c| c.is_ascii_uppercase() || c == '_' || c == '|')
}

/// A value of the kind a placeholder names, or the argv a placeholder stands for.
fn sample(placeholder: &str) -> Result<Vec<&'static str>, String> {
    Ok(match placeholder {
        "SELECTORS" => vec!["--pid", "4242"],
        "DUR" => vec!["90s"],
        "INTERVAL" => vec!["2s"],
        "PATH" => vec!["/etc/cwreap/cwreap.yaml"],
        "N" => vec!["5"],
        "PID" => vec!["4242"],
        "SHELL" => vec!["bash"],
        "DIR" => vec!["/tmp/cwreap-assets"],
        other => return Err(format!("no sample value for the placeholder {other}")),
    })
}

fn words_of(w: &str) -> Result<Vec<String>, String> {
    Ok(if is_placeholder(w) {
        sample(w)?.into_iter().map(str::to_owned).collect()
    } else {
        vec![w.to_owned()]
    })
}

/// Every argv `seq` allows: each optional group (and each of its alternatives) in or out.
fn every_combination(seq: &[Node]) -> Result<Vec<Vec<String>>, String> {
    let mut out: Vec<Vec<String>> = vec![Vec::new()];
    for n in seq {
        match n {
            Node::Word(w) => {
                let words = words_of(w)?;
                out.iter_mut().for_each(|v| v.extend(words.iter().cloned()));
            }
            Node::Optional(alts) => {
                let mut more = Vec::new();
                for alt in alts {
                    for e in every_combination(alt)? {
                        for v in &out {
                            more.push(v.iter().chain(&e).cloned().collect());
                        }
                    }
                }
                out.extend(more);
            }
        }
    }
    Ok(out)
}

/// Every argv a synopsis line offers: the words it requires, alone and with each optional
/// group of the top level (each alternative, with its own nested options in or out). Top
/// groups are not combined: the line does not say which go together (`--json` and
/// `--watch` do not).
fn expansions(seq: &[Node]) -> Result<Vec<Vec<String>>, String> {
    let mut base = Vec::new();
    for n in seq {
        if let Node::Word(w) = n {
            base.extend(words_of(w)?);
        }
    }
    let mut out = vec![base.clone()];
    for n in seq {
        if let Node::Optional(alts) = n {
            for alt in alts {
                for e in every_combination(alt)? {
                    out.push(base.iter().chain(&e).cloned().collect());
                }
            }
        }
    }
    Ok(out)
}

/// Each flag of `seq` with what follows it: `--x`, `--x NAME` or `--x [NAME]`.
fn flags_with_values(seq: &[Node], out: &mut Vec<(String, Option<(String, bool)>)>) {
    for (i, n) in seq.iter().enumerate() {
        match n {
            Node::Word(w) if w.starts_with("--") => {
                let value = match seq.get(i + 1) {
                    Some(Node::Word(v)) if is_placeholder(v) => Some((v.clone(), false)),
                    Some(Node::Optional(alts))
                        if alts.len() == 1
                            && matches!(&alts[0][..], [Node::Word(v)] if is_placeholder(v)) =>
                    {
                        match &alts[0][0] {
                            Node::Word(v) => Some((v.clone(), true)),
                            Node::Optional(_) => None,
                        }
                    }
                    _ => None,
                };
                out.push((w.clone(), value));
            }
            Node::Word(_) => {}
            Node::Optional(alts) => {
                for a in alts {
                    flags_with_values(a, out);
                }
            }
        }
    }
}

/// The visible subcommands of the real command line.
fn subcommands() -> Vec<clap::Command> {
    Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect()
}

/// The visible long flags of a subcommand (help and version left out).
fn long_flags(sub: &clap::Command) -> Vec<clap::Arg> {
    sub.get_arguments()
        .filter(|a| !a.is_hide_set() && a.get_long().is_some())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .cloned()
        .collect()
}

/// What is wrong with one flag as the README writes it (`--x`, `--x NAME`, `--x [NAME]`).
fn check_flag(sub: &clap::Command, flag: &str, value: Option<&(String, bool)>) -> Option<String> {
    let name = flag.trim_start_matches("--");
    let Some(arg) = long_flags(sub)
        .into_iter()
        .find(|a| a.get_long() == Some(name))
    else {
        return Some(format!("`cwreap {}` has no flag {flag}", sub.get_name()));
    };
    let takes = arg.get_action().takes_values();
    let optional = arg.get_num_args().is_some_and(|r| r.min_values() == 0);
    let real: Vec<String> = arg
        .get_value_names()
        .map(|v| v.iter().map(|s| s.to_string()).collect())
        .unwrap_or_default();
    let real = real.join(" ");
    match value {
        None if takes && !optional => Some(format!(
            "{flag} of `cwreap {}` takes a value, {real}, which the README leaves out",
            sub.get_name()
        )),
        None => None,
        Some(_) if !takes => Some(format!(
            "{flag} of `cwreap {}` takes no value",
            sub.get_name()
        )),
        Some((v, opt)) => {
            let mut e = Vec::new();
            if *v != real {
                e.push(format!("its value is {real}, not {v}"));
            }
            if *opt != optional {
                e.push(if optional {
                    format!("its value is optional: [{real}]")
                } else {
                    format!("its value is required: {real}")
                });
            }
            (!e.is_empty())
                .then(|| format!("{flag} of `cwreap {}`: {}", sub.get_name(), e.join("; ")))
        }
    }
}

/// Everything wrong with the Commands section of `text`, against the real command line.
fn commands_section_problems(text: &str) -> Vec<String> {
    let body = section(text, "## Commands\n");
    let mut problems = Vec::new();
    let subs = subcommands();
    let mut described = BTreeSet::new();
    // Where a flag counts as shown: the block's lines and the first cells of the tables.
    let mut listing = plain_block_lines(body).join("\n");
    for row in body.lines().filter(|l| l.starts_with("| `--")) {
        listing.push('\n');
        listing.push_str(row.split(" | ").next().unwrap_or_default());
    }
    for line in plain_block_lines(body) {
        let Some(rest) = line.trim().strip_prefix("cwreap ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let Some(name) = parts.next() else { continue };
        let Some(sub) = subs.iter().find(|s| s.get_name() == name) else {
            problems.push(format!("no subcommand `cwreap {name}`"));
            continue;
        };
        described.insert(name.to_owned());
        let seq = match synopsis(&parts.collect::<Vec<_>>().join(" ")) {
            Ok(s) => s,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let mut flags = Vec::new();
        flags_with_values(&seq, &mut flags);
        for (flag, value) in &flags {
            problems.extend(check_flag(sub, flag, value.as_ref()));
        }
        match expansions(&seq) {
            Err(e) => problems.push(format!("`cwreap {name}`: {e}")),
            Ok(all) => {
                for args in all {
                    let argv: Vec<&str> = ["cwreap", name]
                        .into_iter()
                        .chain(args.iter().map(String::as_str))
                        .collect();
                    if let Err(e) = Cli::try_parse_from(&argv) {
                        problems.push(format!("{argv:?} does not parse: {}", e.kind()));
                    }
                }
            }
        }
    }
    for sub in &subs {
        if !described.contains(sub.get_name()) {
            problems.push(format!(
                "the Commands block has no `cwreap {}` line",
                sub.get_name()
            ));
        }
        // Every flag the command line has is in the Commands block or the selectors table.
        for arg in long_flags(sub) {
            let flag = format!("--{}", arg.get_long().unwrap_or_default());
            let named = listing.match_indices(&flag).any(|(i, _)| {
                !listing[i + flag.len()..]
                    .starts_with(|c: char| c == '-' || c.is_ascii_alphanumeric())
            });
            if !named {
                problems.push(format!(
                    "the Commands block and the selectors table leave out {flag} of `cwreap {}`",
                    sub.get_name()
                ));
            }
        }
    }
    // Every flag the section names in a code span exists, with its value's name.
    let scan = subs.iter().find(|s| s.get_name() == "scan");
    for (k, span) in body.split('`').enumerate() {
        if k % 2 == 0 || !span.starts_with("--") {
            continue;
        }
        let span = span.replace("\\|", "|");
        let mut w = span.split_whitespace();
        let flag = w.next().unwrap_or_default();
        let flag = flag.split('=').next().unwrap_or_default();
        let value = w
            .next()
            .filter(|v| is_placeholder(v))
            .map(|v| (v.to_owned(), false));
        let owner = subs.iter().find(|s| {
            long_flags(s)
                .iter()
                .any(|a| a.get_long() == Some(flag.trim_start_matches("--")))
        });
        match owner.or(scan) {
            Some(sub) if value.is_some() || owner.is_none() => {
                problems.extend(check_flag(sub, flag, value.as_ref()))
            }
            _ => {}
        }
    }
    problems
}

#[test]
fn the_commands_section_is_the_real_command_line() {
    let problems = commands_section_problems(&readme());
    assert!(
        problems.is_empty(),
        "README, Commands:\n{}",
        problems.join("\n")
    );
}

#[test]
fn a_renamed_or_missing_flag_in_the_readme_fails_the_checks() {
    let text = readme();
    // A flag renamed in the synopsis, in a selectors-table row, in a shell block.
    for (from, to) in [
        ("[--older-than DUR]", "[--older-then DUR]"),
        ("`--remote-port PORT`", "`--remote-ports PORT`"),
        ("[--watch [INTERVAL]]", "[--watch INTERVAL]"),
        ("[--watch [INTERVAL]]", "[--watch [DUR]]"),
    ] {
        assert!(text.contains(from), "the README no longer has {from}");
        let problems = commands_section_problems(&text.replacen(from, to, 1));
        assert!(!problems.is_empty(), "{from} → {to} went unnoticed");
    }
    let renamed = text.replace("--older-than", "--older-then");
    let broken = cwreap_commands_in(&renamed)
        .into_iter()
        .filter(|argv| Cli::try_parse_from(argv).is_err())
        .count();
    assert!(
        broken >= 5,
        "renamed --older-than: {broken} shell commands fail to parse"
    );
    // Left out: a flag, a subcommand.
    for (from, gone) in [("[--sockets] ", "--sockets"), ("[--yes]", "--yes")] {
        let problems = commands_section_problems(&text.replacen(from, "", 1));
        assert!(
            problems.iter().any(|p| p.contains(gone)),
            "{gone} left out went unnoticed: {problems:?}"
        );
    }
    let problems = commands_section_problems(&text.replacen("cwreap completions SHELL\n", "", 1));
    assert!(
        problems.iter().any(|p| p.contains("cwreap completions")),
        "{problems:?}"
    );
}

/// The JSON fields table of the Commands section: field → the commands that print it.
fn json_table(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let body = section(text, "## Commands\n");
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in body.lines() {
        if line.starts_with("| field | in |") {
            inside = true;
            continue;
        }
        if !inside || line.starts_with("|---") {
            continue;
        }
        let Some(row) = line.strip_prefix('|') else {
            if inside && !out.is_empty() {
                break;
            }
            continue;
        };
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        let (Some(fields), Some(cmds)) = (cells.first(), cells.get(1)) else {
            continue;
        };
        let cmds: BTreeSet<String> = cmds.split(',').map(|c| c.trim().to_owned()).collect();
        for (k, f) in fields.split('`').enumerate() {
            if k % 2 == 1 {
                out.insert(f.to_owned(), cmds.clone());
            }
        }
    }
    out
}

fn listed_for(table: &BTreeMap<String, BTreeSet<String>>, cmd: &str) -> BTreeSet<String> {
    table
        .iter()
        .filter(|(_, c)| c.contains(cmd))
        .map(|(f, _)| f.clone())
        .collect()
}

fn keys(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .filter_map(Value::as_object)
        .flat_map(|o| o.keys().cloned())
        .collect()
}

/// Every key at any depth of `v`.
fn all_keys(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                out.insert(k.clone());
                all_keys(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| all_keys(v, out)),
        _ => {}
    }
}

#[test]
fn the_scan_json_fields_are_those_the_readme_lists() {
    let table = json_table(&readme());
    assert!(table.len() > 15, "the table was read: {table:?}");
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _client = fx.close_wait(0);
    let objects = cwreap_json(&["scan", "--json", "--pid", &fx.pid().to_string()]);
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(
        keys(&objects),
        listed_for(&table, "scan"),
        "scan --json vs the README"
    );
}

#[test]
#[ignore = "needs root: reap --dry-run duplicates the fixture's socket with pidfd_getfd (CAP_SYS_PTRACE)"]
fn the_reap_json_fields_are_those_the_readme_lists() {
    let table = json_table(&readme());
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _client = fx.close_wait(0);
    let pid = fx.pid().to_string();
    let objects = cwreap_json(&[
        "reap",
        "--pid",
        &pid,
        "--older-than",
        "0s",
        "--dry-run",
        "--json",
    ]);
    assert_eq!(objects.len(), 1, "{objects:?}");
    assert_eq!(objects[0]["outcome"], "dry_run", "{objects:?}");
    assert_eq!(
        keys(&objects),
        listed_for(&table, "reap"),
        "reap --json vs the README"
    );
}

#[test]
fn the_explain_json_fields_the_readme_lists_are_printed() {
    let text = readme();
    let body = section(&text, "## Which bug leaks? `cwreap explain`");
    let start = body
        .find("`--json` prints one object per process per line:")
        .expect("the explain JSON paragraph");
    let para = &body[start..];
    let para = &para[..para.find("Exit codes").unwrap_or(para.len())];
    // Field names: every code span outside parentheses; inside them only the keys of a
    // nested object (`{addr, port, count}`), not values (`jvm`, `null`).
    let mut listed = BTreeSet::new();
    let mut depth = 0i32;
    for (k, span) in para.split('`').enumerate().skip(2) {
        if k % 2 == 0 {
            depth += span.matches('(').count() as i32 - span.matches(')').count() as i32;
            continue;
        }
        if depth > 0 && !span.contains('{') {
            continue;
        }
        for w in span.split(|c: char| !(c.is_ascii_lowercase() || c == '_')) {
            if !w.is_empty() && w != "null" {
                listed.insert(w.to_owned());
            }
        }
    }
    assert!(listed.len() > 15, "the paragraph was read: {listed:?}");
    let mut fx = Fixture::start(&["127.0.0.1:0"], &[]);
    let _client = fx.close_wait(0);
    let objects = cwreap_json(&["explain", "--json", "--pid", &fx.pid().to_string()]);
    assert_eq!(objects.len(), 1, "{objects:?}");
    let mut printed = BTreeSet::new();
    all_keys(&objects[0], &mut printed);
    // A JVM's `gc` object: `null` for this server, so its keys cannot show here.
    assert!(objects[0]["gc"].is_null(), "{objects:?}");
    for only_for_a_jvm in ["full_collections", "last_ended_ms_ago"] {
        assert!(
            listed.remove(only_for_a_jvm),
            "{only_for_a_jvm} is no longer listed"
        );
    }
    let missing: Vec<&String> = listed.difference(&printed).collect();
    assert!(
        missing.is_empty(),
        "the README lists {missing:?}, explain --json prints {printed:?}"
    );
}

#[test]
fn developing_installs_what_ci_installs_and_only_what_is_missing() {
    let text = readme();
    let body = section(&text, "## Developing");
    let lines = shell_lines(body);
    let pkgs: BTreeSet<&str> = lines
        .iter()
        .find_map(|l| l.strip_prefix("pkgs=\""))
        .and_then(|l| l.split('"').next())
        .expect("the package list")
        .split_whitespace()
        .collect();
    let apt = lines
        .iter()
        .find(|l| l.contains("apt-get install"))
        .expect("the apt line");
    assert!(apt.contains("--no-install-recommends"), "{apt}");
    assert!(
        apt.contains("dpkg -s"),
        "installs only what is missing: {apt}"
    );
    let ci = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".ci/run"))
        .expect(".ci/run");
    let ci_pkgs: BTreeSet<&str> = ci
        .lines()
        .filter_map(|l| l.split("|| need+=(").nth(1))
        .filter_map(|l| l.split(')').next())
        .collect();
    assert!(ci_pkgs.len() >= 8, "{ci_pkgs:?}");
    let missing: Vec<&&str> = ci_pkgs.difference(&pkgs).collect();
    assert!(
        missing.is_empty(),
        "the README's list lacks {missing:?} that .ci/run installs"
    );
    // The problem comes before the tests' needs.
    let close_wait = text
        .find("is in **CLOSE_WAIT** when")
        .expect("what CLOSE_WAIT is");
    assert!(close_wait < text.find("## Developing").unwrap_or(0));
    assert!(
        !text[..close_wait].contains("apt-get"),
        "test dependencies before the problem"
    );
}

#[test]
fn choosing_older_than_uses_the_numbers_explain_prints() {
    let text = readme();
    let choosing = section(&text, "## Choosing `older_than`");
    let explain = section(&text, "## Which bug leaks? `cwreap explain`");
    let quoted: Vec<String> = plain_block_lines(choosing)
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(!quoted.is_empty(), "the explain line it works from");
    for l in &quoted {
        assert!(explain.contains(l.as_str()), "not in explain's sample: {l}");
    }
    // The arithmetic, from the sample: open fds, the CLOSE_WAIT among them, the limit, the
    // rate; the headroom and the minutes it lasts are those the section states.
    let number = |after: &str, within: &str| -> u64 {
        let at = within.find(after).unwrap_or_else(|| panic!("no {after:?}")) + after.len();
        within[at..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {after:?}"))
    };
    let line = &quoted[0];
    let rate = number("rate: +", line);
    let open = number("CLOSE_WAIT/min,", line);
    let limit = number(&format!("{open}/"), line);
    let cw = number("pid 11529 (python3):", explain);
    let headroom = limit - (open - cw);
    assert!(
        choosing.contains(&format!("{limit} − {} = {headroom} fds", open - cw)),
        "headroom {headroom}:\n{choosing}"
    );
    let minutes = headroom as f64 / rate as f64;
    assert!(
        choosing.contains(&format!("{headroom} / {rate} ≈ {minutes:.1}")),
        "{minutes:.1} minutes:\n{choosing}"
    );
}
