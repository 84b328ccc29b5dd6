//! The docs cannot rot: every source file, directory and test that docs/SECURITY.md and
//! README.md name exists. A reference is a path under `src/`, `tests/`, `linux/` or
//! `testkit/`, in backticks or in running text (never inside a fenced block), optionally
//! followed by the items inside the file: `tests/it/races.rs::fd_closed_by_owner_is_gone`,
//! `src/shared/act.rs::tests::errnos_are_classified`, `linux/src/secure_fs.rs::tests`. A
//! span `…::name` continues the reference before it: the same file and module, another
//! item. Every item is looked up in the file as Rust (syn): modules inline or in their own
//! file, and a function named last must be a test.

use std::path::{Path, PathBuf};

/// The documents checked, from the repository root.
const DOCS: [&str; 2] = ["docs/SECURITY.md", "README.md"];
/// Where references point.
const ROOTS: [&str; 4] = ["src/", "tests/", "linux/", "testkit/"];

/// One reference in a document.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ref {
    line: usize,
    /// A file or directory, from the repository root.
    path: String,
    /// Items inside the file: modules, then a module or a test.
    items: Vec<String>,
}

impl std::fmt::Display for Ref {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.path)?;
        for i in &self.items {
            write!(f, "::{i}")?;
        }
        Ok(())
    }
}

fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/')
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A reference written in full (`path` or `path::item::...`), if `span` is one.
fn full(span: &str, line: usize) -> Option<Ref> {
    let mut parts = span.split("::");
    let path = parts.next()?;
    if !ROOTS.iter().any(|r| path.starts_with(r)) || !path.chars().all(is_path_char) {
        return None;
    }
    let items: Vec<String> = parts.map(str::to_owned).collect();
    if !items.iter().all(|i| is_ident(i)) {
        return None;
    }
    Some(Ref {
        line,
        path: path.trim_end_matches('.').to_owned(),
        items,
    })
}

/// Every reference of a Markdown text, in order, and the `…::` spans that follow no
/// reference (errors in the text itself).
fn references(md: &str) -> (Vec<Ref>, Vec<String>) {
    let mut refs: Vec<Ref> = Vec::new();
    let mut orphans = Vec::new();
    let mut fenced = false;
    for (n, text) in md.lines().enumerate() {
        let line = n + 1;
        if text.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        // Code spans and the running text between them, alternately.
        for (k, piece) in text.split('`').enumerate() {
            if k % 2 == 1 {
                if let Some(rest) = piece.strip_prefix("…::") {
                    let items: Vec<String> = rest.split("::").map(str::to_owned).collect();
                    match refs.last() {
                        Some(prev) if items.iter().all(|i| is_ident(i)) => {
                            let mut r = prev.clone();
                            r.line = line;
                            r.items.pop();
                            r.items.extend(items);
                            refs.push(r);
                        }
                        _ => orphans.push(format!("line {line}: `{piece}`")),
                    }
                } else if let Some(r) = full(piece.trim(), line) {
                    refs.push(r);
                }
                continue;
            }
            // A path in running text: starts at a word boundary (not inside a URL or a
            // longer path).
            let mut rest = piece;
            while let Some(at) = ROOTS.iter().filter_map(|r| rest.find(r)).min() {
                let before = rest[..at].chars().next_back();
                let tail = &rest[at..];
                let end = tail.find(|c: char| !is_path_char(c)).unwrap_or(tail.len());
                if !before.is_some_and(|c| is_path_char(c) || c == ':')
                    && let Some(r) = full(&tail[..end], line)
                {
                    refs.push(r);
                }
                rest = &tail[end.max(1)..];
            }
        }
    }
    (refs, orphans)
}

/// Whether `attrs` make a function a test (`#[test]`, `#[tokio::test]`, ...).
fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().segments.last().is_some_and(|s| s.ident == "test"))
}

/// Where the files of the modules `file` declares (`mod name;`) live: beside it for
/// main.rs, lib.rs and mod.rs, otherwise in a directory named after it.
fn children_dir(file: &Path) -> Option<PathBuf> {
    let dir = file.parent()?;
    let stem = file.file_stem()?.to_str()?;
    Some(if matches!(stem, "main" | "lib" | "mod") {
        dir.to_path_buf()
    } else {
        dir.join(stem)
    })
}

/// Follow `items` from the top of `file`: every item but the last is a module, the last a
/// module or a test. None when all are there; otherwise what is missing.
fn find_items(file: &Path, items: &[String]) -> Option<String> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => return Some(format!("cannot read {}: {e}", file.display())),
    };
    let parsed = match syn::parse_file(&text) {
        Ok(f) => f,
        Err(e) => return Some(format!("{} is not Rust: {e}", file.display())),
    };
    let Some(mut dir) = children_dir(file) else {
        return Some(format!("{} has no directory", file.display()));
    };
    let mut scope: Vec<syn::Item> = parsed.items;
    for (k, name) in items.iter().enumerate() {
        let last = k + 1 == items.len();
        let module = scope.iter().find_map(|item| match item {
            syn::Item::Mod(m) if m.ident == name => Some(m.content.clone()),
            _ => None,
        });
        match module {
            Some(_) if last => return None,
            Some(Some((_, inner))) => {
                scope = inner;
                dir = dir.join(name);
                continue;
            }
            Some(None) => {
                let next = [
                    dir.join(format!("{name}.rs")),
                    dir.join(name).join("mod.rs"),
                ]
                .into_iter()
                .find(|p| p.is_file());
                let Some(next) = next else {
                    return Some(format!("the file of `mod {name};` is missing"));
                };
                return find_items(&next, &items[k + 1..]);
            }
            None => {}
        }
        let test = scope.iter().find_map(|item| match item {
            syn::Item::Fn(f) if f.sig.ident == name => Some(is_test(&f.attrs)),
            _ => None,
        });
        return match (test, last) {
            (Some(true), true) => None,
            (Some(false), true) => Some(format!("`{name}` is a function but not a test")),
            (Some(_), false) => Some(format!("`{name}` is a function, not a module")),
            (None, _) => Some(format!("no test or module `{name}`")),
        };
    }
    None
}

/// What is wrong with `r` under `root`, if anything.
fn problem(root: &Path, r: &Ref) -> Option<String> {
    let path = root.join(&r.path);
    if !path.exists() {
        return Some(format!("{} does not exist", r.path));
    }
    if r.items.is_empty() {
        return None;
    }
    if !path.is_file() {
        return Some(format!("{} is not a file", r.path));
    }
    find_items(&path, &r.items)
}

#[test]
fn every_file_and_test_the_docs_name_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut wrong = Vec::new();
    for doc in DOCS {
        let text = std::fs::read_to_string(root.join(doc)).expect("the document is readable");
        let (refs, orphans) = references(&text);
        let tests = refs.iter().filter(|r| !r.items.is_empty()).count();
        println!("{doc}: {} references, {tests} of them to tests", refs.len());
        if doc == "docs/SECURITY.md" {
            assert!(
                tests > 80,
                "only {tests} tests named in {doc}: is the parser reading nothing?"
            );
        }
        for o in orphans {
            wrong.push(format!("{doc} {o}: `…::` continues no reference"));
        }
        for r in &refs {
            if let Some(why) = problem(root, r) {
                wrong.push(format!("{doc} {r}: {why}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} stale reference(s) in the docs:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[test]
fn references_are_read_as_written_and_checked_item_by_item() {
    let md = "\
Tests `src/shared/act.rs::tests::errnos_are_classified`, `…::dry_run_verifies_but_never_shuts_down`
and `tests/it/races.rs::fd_closed_by_owner_is_gone`, `…::nothing_like_this`; see
tests/runtimes/ and `linux/src/netlink.rs` (`not_a_reference`, `act::shutdown_verified`,
https://example.com/src/not/ours).
```sh
cat src/inside/a/fence.rs
```
`src/daemon/tests.rs::a_failed_dump_acts_on_nothing_and_the_next_cycle_reaps`
`src/no/such/file.rs` `src/shared/act.rs::tests::no_such_test` `src/shared/act.rs::shutdown_verified`
";
    let (refs, orphans) = references(md);
    assert!(orphans.is_empty(), "{orphans:?}");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let found: Vec<(String, Option<String>)> = refs
        .iter()
        .map(|r| {
            let shown = r.to_string();
            let shown = shown
                .split_once(": ")
                .map_or(shown.clone(), |(_, s)| s.to_owned());
            (shown, problem(root, r))
        })
        .collect();
    let shown: Vec<&str> = found.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        shown,
        [
            "src/shared/act.rs::tests::errnos_are_classified",
            "src/shared/act.rs::tests::dry_run_verifies_but_never_shuts_down",
            "tests/it/races.rs::fd_closed_by_owner_is_gone",
            "tests/it/races.rs::nothing_like_this",
            "tests/runtimes/",
            "linux/src/netlink.rs",
            "src/daemon/tests.rs::a_failed_dump_acts_on_nothing_and_the_next_cycle_reaps",
            "src/no/such/file.rs",
            "src/shared/act.rs::tests::no_such_test",
            "src/shared/act.rs::shutdown_verified",
        ],
        "in order, `…::` continuing the one before; nothing from code, URLs or fences"
    );
    let wrong: Vec<&str> = found.iter().filter_map(|(_, why)| why.as_deref()).collect();
    assert_eq!(
        wrong,
        [
            "no test or module `nothing_like_this`",
            "src/no/such/file.rs does not exist",
            "no test or module `no_such_test`",
            "`shutdown_verified` is a function but not a test",
        ]
    );
    let (refs, orphans) = references("`…::orphan` first, then `tests/it/main.rs`");
    assert_eq!((refs.len(), orphans.len()), (1, 1), "{orphans:?}");
}
