//! The rules besides the import graph: what the kernel crate may name, where `unsafe` may
//! be and how each use is explained, the lint tables the compiler enforces them with, and
//! file sizes.

use std::collections::BTreeSet;
use std::path::Path;

use proc_macro2::{TokenStream, TokenTree};

use super::source::{self, code_lines, find_ident, rust_files};
use super::tree::Tree;

/// Longest a source file may be, not counting its `#[cfg(test)]` code.
pub const MAX_LINES: usize = 600;

/// How far above an `unsafe` its SAFETY note may end (lines of the same statement, an
/// attribute).
const NOTE_REACH: usize = 6;

/// Crates the kernel crate must not name: it knows nothing of policy or the command line.
const NOT_IN_KERNEL: [&str; 5] = ["cwreap", "clap", "serde_saphyr", "tokio", "tracing"];

/// Paths in cwreap-linux rooted at one of [`NOT_IN_KERNEL`], and such dependencies.
pub fn kernel_crate(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    for file in rust_files(&root.join("linux/src")) {
        let (name, _, tokens) = match source::tokens(root, &file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        let mut found = Vec::new();
        foreign_roots(tokens, &mut found);
        for (l, what) in found {
            problems.push(format!("{name}:{l}: `{what}` in the kernel crate"));
        }
    }
    let manifest = root.join("linux/Cargo.toml");
    let text = std::fs::read_to_string(&manifest).unwrap_or_default();
    let mut section = String::new();
    for (k, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t.trim_matches(|c| c == '[' || c == ']').to_string();
        }
        let is_dep = section.contains("dependencies");
        for dep in [
            "cwreap",
            "clap",
            "serde-saphyr",
            "serde_saphyr",
            "tokio",
            "tracing",
        ] {
            let named = t.starts_with(&format!("{dep} ")) || t.starts_with(&format!("{dep}="));
            let table = t.starts_with('[') && t.contains("dependencies") && t.contains(dep);
            if (is_dep && named) || table {
                problems.push(format!("linux/Cargo.toml:{}: `{t}`", k + 1));
            }
        }
    }
    problems
}

/// `x::…`, `use x`, `use ::x`, `extern crate x` for x in [`NOT_IN_KERNEL`].
fn foreign_roots(tokens: TokenStream, out: &mut Vec<(usize, String)>) {
    let tts: Vec<TokenTree> = tokens.into_iter().collect();
    let word = |k: usize, w: &str| matches!(tts.get(k), Some(TokenTree::Ident(i)) if i == w);
    let colon = |k: usize| matches!(tts.get(k), Some(TokenTree::Punct(p)) if p.as_char() == ':');
    for (k, tt) in tts.iter().enumerate() {
        match tt {
            TokenTree::Group(g) => foreign_roots(g.stream(), out),
            TokenTree::Ident(i) if NOT_IN_KERNEL.iter().any(|n| i == n) => {
                let path = colon(k + 1) && colon(k + 2) && !(k >= 2 && colon(k - 1));
                let used = k >= 1 && word(k - 1, "use");
                let used_global = k >= 3 && colon(k - 1) && colon(k - 2) && word(k - 3, "use");
                let extern_crate = k >= 2 && word(k - 1, "crate") && word(k - 2, "extern");
                if path || used || used_global || extern_crate {
                    out.push((source::line(i.span()), i.to_string()));
                }
            }
            _ => {}
        }
    }
}

/// The unsafe rules. The compiler holds most of them through the lint tables, so those are
/// checked to be in place; the rest are checked on the sources: no `unsafe` token in the
/// policy crate, its tests and benchmarks or the fuzz targets, and in the kernel crate a
/// `// SAFETY:` note of its own above every `unsafe` (block, impl, fn).
pub fn unsafe_code(root: &Path) -> (Vec<String>, usize) {
    let mut problems = lint_tables(root);
    for file in ["src/lib.rs", "src/main.rs"] {
        match source::parse(root, &root.join(file)) {
            Ok(src) => {
                let forbids = src.ast.attrs.iter().any(|a| {
                    a.path().is_ident("forbid") && {
                        let mut found = Vec::new();
                        if let syn::Meta::List(l) = &a.meta {
                            find_ident(l.tokens.clone(), "unsafe_code", &mut found);
                        }
                        !found.is_empty()
                    }
                });
                if !forbids {
                    problems.push(format!("{file}: no #![forbid(unsafe_code)]"));
                }
            }
            Err(e) => problems.push(e),
        }
    }
    for dir in ["src", "tests", "benches", "fuzz/fuzz_targets"] {
        for file in rust_files(&root.join(dir)) {
            match source::tokens(root, &file) {
                Ok((name, _, tokens)) => {
                    let mut found = Vec::new();
                    find_ident(tokens, "unsafe", &mut found);
                    for (l, _) in found {
                        problems.push(format!("{name}:{l}: `unsafe` outside cwreap-linux"));
                    }
                }
                Err(e) => problems.push(e),
            }
        }
    }
    let mut sites = 0;
    // All of the kernel crate's package: its sources, and its tests or benchmarks if any.
    for file in rust_files(&root.join("linux")) {
        match source::tokens(root, &file) {
            Ok((name, text, tokens)) => {
                sites += safety_notes(&name, &text, tokens, &mut problems);
            }
            Err(e) => problems.push(e),
        }
    }
    (problems, sites)
}

/// Each `unsafe` in a file of the kernel crate needs a `// SAFETY:` comment of its own
/// ending at most [`NOTE_REACH`] lines above it, with no other `unsafe` in between. Returns
/// how many `unsafe` there are.
fn safety_notes(name: &str, text: &str, tokens: TokenStream, problems: &mut Vec<String>) -> usize {
    let lines: Vec<&str> = text.lines().collect();
    let mut code = BTreeSet::new();
    code_lines(tokens.clone(), &mut code);
    let comment = |l: usize| {
        l >= 1 && !code.contains(&l) && lines.get(l - 1).is_some_and(|t| !t.trim().is_empty())
    };
    let mut sites = Vec::new();
    find_ident(tokens, "unsafe", &mut sites);
    sites.sort_unstable();
    for (k, &(at, _)) in sites.iter().enumerate() {
        let mut end = at - 1;
        while end >= 1 && !comment(end) && at - end <= NOTE_REACH {
            end -= 1;
        }
        if !comment(end) {
            problems.push(format!(
                "{name}:{at}: `unsafe` without a `// SAFETY:` note above it"
            ));
            continue;
        }
        let mut start = end;
        while comment(start - 1) {
            start -= 1;
        }
        if !(start..=end).any(|l| lines[l - 1].contains("SAFETY:")) {
            problems.push(format!(
                "{name}:{at}: `unsafe` without a `// SAFETY:` note above it (the comment at \
                 line {start} is not one)"
            ));
        } else if k > 0 && sites[k - 1].0 > end {
            problems.push(format!(
                "{name}:{at}: `unsafe` shares the SAFETY note of line {start} with the `unsafe` \
                 at line {}: each needs a note of its own",
                sites[k - 1].0
            ));
        }
    }
    sites.len()
}

/// The lint tables that make the compiler hold the unsafe rules.
fn lint_tables(root: &Path) -> Vec<String> {
    let wants = [
        (
            "Cargo.toml",
            "workspace.lints.rust",
            "unsafe_code",
            "forbid",
        ),
        ("Cargo.toml", "lints", "workspace", "true"),
        (
            "linux/Cargo.toml",
            "lints.clippy",
            "undocumented_unsafe_blocks",
            "deny",
        ),
        (
            "linux/Cargo.toml",
            "lints.clippy",
            "multiple_unsafe_ops_per_block",
            "deny",
        ),
        ("fuzz/Cargo.toml", "lints.rust", "unsafe_code", "forbid"),
    ];
    let mut problems = Vec::new();
    for (file, section, key, value) in wants {
        let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
        let found = toml_value(&text, section, key);
        let ok = found.as_deref().is_some_and(|v| {
            v == value
                || v == format!("\"{value}\"")
                || (value == "deny" && v == "\"forbid\"")
                || (v.starts_with('{') && v.contains(&format!("\"{value}\"")))
        });
        if !ok {
            problems.push(format!(
                "{file}: `[{section}]` must say `{key} = {}` (found {})",
                if value == "true" {
                    value.to_string()
                } else {
                    format!("\"{value}\"")
                },
                found.as_deref().unwrap_or("nothing"),
            ));
        }
    }
    problems
}

/// The value of `key` in table `[section]` of a Cargo manifest, as written (also found as
/// `a.key` in `[section-without-.a]`).
fn toml_value(text: &str, section: &str, key: &str) -> Option<String> {
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            current = t.trim_matches(|c| c == '[' || c == ']').trim().to_string();
            continue;
        }
        let Some((k, v)) = t.split_once('=') else {
            continue;
        };
        let full = if current.is_empty() {
            k.trim().to_string()
        } else {
            format!("{current}.{}", k.trim())
        };
        if full == format!("{section}.{key}") {
            let v = v.split(" #").next().unwrap_or(v);
            return Some(v.trim().to_string());
        }
    }
    None
}

/// Source files over [`MAX_LINES`] lines of non-test code, largest first; and the largest.
pub fn sizes(tree: &Tree) -> (Vec<String>, Option<(usize, String)>) {
    let mut sizes = Vec::new();
    for f in &tree.files {
        if f.is_test(tree) {
            continue;
        }
        let mut test = BTreeSet::new();
        for &(a, b) in &f.test_ranges {
            test.extend(a..=b);
        }
        let n = f.src.line_count().saturating_sub(test.len());
        sizes.push((n, f.src.name.clone()));
    }
    sizes.sort();
    let largest = sizes.last().cloned();
    let problems = sizes
        .iter()
        .rev()
        .filter(|(n, _)| *n > MAX_LINES)
        .map(|(n, name)| format!("{name}: {n} lines outside #[cfg(test)] (at most {MAX_LINES})"))
        .collect();
    (problems, largest)
}
