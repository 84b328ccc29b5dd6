//! The layering of the code cannot rot: the top-level modules of each crate (`cwreap` in
//! src/, `cwreap-linux` in linux/src/) do not import each other in a cycle; the kernel crate
//! knows nothing of the policy or the command line (no cwreap, clap, serde_saphyr, tokio or
//! tracing); `unsafe` code lives only in the kernel crate, each block under a SAFETY note,
//! with both roots of cwreap forbidding it; and no source file grows past 600 lines of
//! non-test code.
//!
//! The checks read the sources as text: comments are dropped and the contents of string and
//! char literals blanked first, so neither can trip a rule. Test code (`#[cfg(test)]` items
//! and files named tests.rs) may import anything, so it does not count as an edge.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

use regex::Regex;

/// Longest a source file may be, not counting its `#[cfg(test)]` code.
const MAX_LINES: usize = 600;

/// Failure messages longer than this many lines are cut.
const MAX_REPORT: usize = 40;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn regex(re: &str) -> Regex {
    Regex::new(re).unwrap_or_else(|e| panic!("regex {re}: {e}"))
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("read dir {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no .rs file under {}", dir.display());
    out
}

/// The code of `src` with comments removed and the contents of string and char literals
/// replaced by spaces (quotes kept). Newlines are kept, so line numbers stay the file's.
fn strip(src: &str) -> String {
    let chars: Vec<char> = src.chars().collect();
    let n = chars.len();
    let at = |i: usize| chars.get(i).copied();
    let blank = |out: &mut String, c: char| out.push(if c == '\n' { '\n' } else { ' ' });
    let mut out = String::with_capacity(src.len());
    let mut i = 0;
    while i < n {
        let c = chars[i];
        if c == '/' && at(i + 1) == Some('/') {
            while i < n && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == Some('*') {
            // Block comments nest.
            let mut depth = 0;
            while i < n {
                if chars[i] == '/' && at(i + 1) == Some('*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == Some('/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if chars[i] == '\n' {
                        out.push('\n');
                    }
                    i += 1;
                }
            }
        } else if let Some(hashes) = raw_string_hashes(&chars, i) {
            // r"..", r#".."#, br#".."#: no escapes, ends at a quote and as many hashes.
            out.push('r');
            i += 1;
            while i < n && chars[i] != '"' {
                out.push(chars[i]);
                i += 1;
            }
            out.push('"');
            i += 1;
            while i < n {
                if chars[i] == '"' && (1..=hashes).all(|k| at(i + k) == Some('#')) {
                    break;
                }
                blank(&mut out, chars[i]);
                i += 1;
            }
            out.push('"');
            out.extend(std::iter::repeat_n('#', hashes));
            i += 1 + hashes;
        } else if c == '"' {
            out.push('"');
            i += 1;
            while i < n && chars[i] != '"' {
                if chars[i] == '\\' {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
                if i < n {
                    blank(&mut out, chars[i]);
                    i += 1;
                }
            }
            out.push('"');
            i += 1;
        } else if c == '\'' && (at(i + 1) == Some('\\') || at(i + 2) == Some('\'')) {
            // A char literal ('x', '\n', '\'', '\u{..}'); anything else is a lifetime.
            out.push('\'');
            let mut j = i + 1;
            if at(j) == Some('\\') {
                j += 2;
            }
            while j < n && chars[j] != '\'' {
                j += 1;
            }
            out.extend(std::iter::repeat_n(' ', j - i - 1));
            out.push('\'');
            i = j + 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Number of hashes if a raw string literal (`r"`, `r#"`, `br##"`, ...) starts at `i`.
fn raw_string_hashes(chars: &[char], i: usize) -> Option<usize> {
    let is_ident = |k: usize| chars[k].is_alphanumeric() || chars[k] == '_';
    if chars[i] != 'r' {
        return None;
    }
    let starts_token = match i {
        0 => true,
        1 => chars[0] == 'b' || !is_ident(0),
        _ if chars[i - 1] == 'b' => !is_ident(i - 2),
        _ => !is_ident(i - 1),
    };
    if !starts_token {
        return None;
    }
    let hashes = chars[i + 1..].iter().take_while(|&&c| c == '#').count();
    (chars.get(i + 1 + hashes) == Some(&'"')).then_some(hashes)
}

/// One source file, read and stripped.
struct Source {
    /// Path relative to the repository, for messages.
    name: String,
    raw: String,
    code: String,
    /// Byte offset in `code` where each line starts.
    line_starts: Vec<usize>,
    /// Lines (1-based, inclusive) of `#[cfg(test)]` items; the whole file for tests.rs.
    tests: Vec<(usize, usize)>,
}

impl Source {
    fn load(path: &Path) -> Source {
        let raw = std::fs::read_to_string(path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let code = strip(&raw);
        let line_starts = std::iter::once(0)
            .chain(code.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        let name = path
            .strip_prefix(repo())
            .unwrap_or(path)
            .display()
            .to_string();
        let mut src = Source {
            name,
            raw,
            code,
            line_starts,
            tests: Vec::new(),
        };
        src.tests = if path.file_name().is_some_and(|f| f == "tests.rs") {
            vec![(1, src.line_count())]
        } else {
            src.test_items()
        };
        src
    }

    fn line_count(&self) -> usize {
        self.raw.lines().count()
    }

    /// 1-based line of a byte offset in `code`.
    fn line_of(&self, offset: usize) -> usize {
        self.line_starts.partition_point(|&s| s <= offset)
    }

    fn in_tests(&self, line: usize) -> bool {
        self.tests.iter().any(|&(a, b)| (a..=b).contains(&line))
    }

    /// Each `#[cfg(test)]` attribute up to the end of the item it introduces: the `;` or
    /// the brace matching the first `{` at its level.
    fn test_items(&self) -> Vec<(usize, usize)> {
        let attr = regex(r"#\[\s*cfg\s*\(\s*test\s*\)\s*\]");
        let mut out = Vec::new();
        let mut done = 0;
        for m in attr.find_iter(&self.code) {
            if m.start() < done {
                continue;
            }
            let mut depth = 0usize;
            let mut end = self.code.len().saturating_sub(1);
            for (k, c) in self.code[m.end()..].char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            end = m.end() + k;
                            break;
                        }
                    }
                    ';' if depth == 0 => {
                        end = m.end() + k;
                        break;
                    }
                    _ => {}
                }
            }
            done = end + 1;
            out.push((self.line_of(m.start()), self.line_of(end)));
        }
        out
    }

    /// Lines of the file outside its test code.
    fn non_test_lines(&self) -> usize {
        let test: usize = self.tests.iter().map(|&(a, b)| b + 1 - a).sum();
        self.line_count().saturating_sub(test)
    }
}

/// Fail with `what` and the problems, cut to a readable length.
fn assert_none(what: &str, problems: &[String]) {
    if problems.is_empty() {
        return;
    }
    let mut msg = format!("{what} ({} found):\n", problems.len());
    for p in problems.iter().take(MAX_REPORT) {
        msg.push_str(p);
        msg.push('\n');
    }
    if problems.len() > MAX_REPORT {
        msg.push_str(&format!("... and {} more\n", problems.len() - MAX_REPORT));
    }
    panic!("{msg}");
}

/// Where an edge was seen first: file and line.
type Edges = BTreeMap<(String, String), (String, usize)>;

/// The top-level modules declared in `<dir>/lib.rs`.
fn modules(dir: &Path) -> BTreeSet<String> {
    let lib = Source::load(&dir.join("lib.rs"));
    let decl = regex(r"(?m)^\s*(?:pub(?:\s*\([^)]*\))?\s+)?mod\s+([A-Za-z_][A-Za-z0-9_]*)\s*;");
    decl.captures_iter(&lib.code)
        .map(|c| c[1].to_string())
        .collect()
}

/// The module a file belongs to: `X` for `X.rs` and for anything under `X/`.
fn module_of(dir: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(dir).ok()?.components().next()?;
    let first = first.as_os_str().to_str()?;
    Some(first.strip_suffix(".rs").unwrap_or(first).to_string())
}

/// Module → module edges of the crate in `dir`, through `crate::` paths outside test code.
fn import_graph(dir: &Path) -> (BTreeSet<String>, Edges) {
    let mods = modules(dir);
    let path = regex(r"\bcrate\s*::\s*([A-Za-z_][A-Za-z0-9_]*)");
    let group = regex(r"\bcrate\s*::\s*\{");
    let mut edges = Edges::new();
    for file in rust_files(dir) {
        let Some(from) = module_of(dir, &file).filter(|m| mods.contains(m)) else {
            continue;
        };
        let src = Source::load(&file);
        let mut refs: Vec<(String, usize)> = path
            .captures_iter(&src.code)
            .filter_map(|c| c.get(1))
            .map(|m| (m.as_str().to_string(), m.start()))
            .collect();
        for m in group.find_iter(&src.code) {
            refs.extend(group_heads(&src.code, m.end()));
        }
        for (to, offset) in refs {
            let line = src.line_of(offset);
            if to == from || !mods.contains(&to) || src.in_tests(line) {
                continue;
            }
            edges
                .entry((from.clone(), to))
                .or_insert_with(|| (src.name.clone(), line));
        }
    }
    (mods, edges)
}

/// The first path segment of each item of a `{ a, b::c, d::{e, f} }` group opening just
/// before `start`, with its offset.
fn group_heads(code: &str, start: usize) -> Vec<(String, usize)> {
    let mut out = Vec::new();
    let mut depth = 1;
    let mut item_start = true;
    let mut ident: Option<(usize, String)> = None;
    for (k, c) in code[start..].char_indices() {
        if c.is_alphanumeric() || c == '_' {
            if let Some((_, s)) = ident.as_mut() {
                s.push(c);
            } else if depth == 1 && item_start {
                ident = Some((start + k, c.to_string()));
            }
            continue;
        }
        if let Some((at, s)) = ident.take() {
            out.push((s, at));
            item_start = false;
        }
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => item_start = true,
            _ => {}
        }
    }
    out
}

/// One shortest cycle through each strongly connected group of modules, as messages.
fn cycles(mods: &BTreeSet<String>, edges: &Edges) -> Vec<String> {
    let next = |a: &str| -> Vec<&String> {
        edges
            .keys()
            .filter(|(f, _)| f == a)
            .map(|(_, t)| t)
            .collect()
    };
    let reaches = |a: &String, b: &String| -> bool {
        let mut seen = BTreeSet::new();
        let mut todo = vec![a];
        while let Some(x) = todo.pop() {
            for y in next(x) {
                if y == b {
                    return true;
                }
                if seen.insert(y) {
                    todo.push(y);
                }
            }
        }
        false
    };
    let mut out = Vec::new();
    let mut covered = BTreeSet::new();
    for a in mods {
        if covered.contains(a) || !reaches(a, a) {
            continue;
        }
        let group: BTreeSet<&String> = mods
            .iter()
            .filter(|b| *b == a || (reaches(a, b) && reaches(b, a)))
            .collect();
        covered.extend(group.iter().map(|s| s.to_string()));
        // Breadth-first inside the group, back to `a`.
        let mut parent: BTreeMap<&String, &String> = BTreeMap::new();
        let mut queue = VecDeque::from([a]);
        let mut last = None;
        while let Some(x) = queue.pop_front() {
            for y in next(x) {
                if y == a {
                    last = Some(x);
                    break;
                }
                if group.contains(y) && !parent.contains_key(y) {
                    parent.insert(y, x);
                    queue.push_back(y);
                }
            }
            if last.is_some() {
                break;
            }
        }
        let mut path = vec![a.clone()];
        let mut x = last.expect("a module that reaches itself has a cycle");
        while x != a {
            path.push(x.clone());
            x = parent[x];
        }
        path.push(a.clone());
        path.reverse();
        out.push(format!("cycle: {}", path.join(" -> ")));
        for w in path.windows(2) {
            let (file, line) = &edges[&(w[0].clone(), w[1].clone())];
            out.push(format!("  {} -> {}: {file}:{line}", w[0], w[1]));
        }
    }
    out
}

#[test]
fn no_import_cycles_between_modules() {
    for (dir, min_edges) in [("src", 5), ("linux/src", 3)] {
        let (mods, edges) = import_graph(&repo().join(dir));
        println!(
            "{dir}: {} modules, {} edges between them",
            mods.len(),
            edges.len()
        );
        assert!(
            edges.len() > min_edges,
            "{dir}: only {} import edges between {} modules; is the parser reading nothing?",
            edges.len(),
            mods.len()
        );
        assert_none(
            &format!("{dir}: import cycles between top-level modules"),
            &cycles(&mods, &edges),
        );
    }
}

#[test]
fn kernel_crate_has_no_policy_or_cli() {
    let names = "cwreap|clap|serde_saphyr|tokio|tracing";
    // A path rooted at one of them, or a `use`/`extern crate` of one.
    let uses = regex(&format!(
        r"\b(?:{names})\b\s*::|\b(?:use|extern\s+crate)\s+(?:::\s*)?(?:{names})\b"
    ));
    let mut problems = Vec::new();
    let files = rust_files(&repo().join("linux/src"));
    for file in &files {
        let src = Source::load(file);
        for m in uses.find_iter(&src.code) {
            let line = src.line_of(m.start());
            problems.push(format!("{}:{line}: `{}`", src.name, m.as_str()));
        }
    }
    // Nor can it depend on them.
    let manifest =
        std::fs::read_to_string(repo().join("linux/Cargo.toml")).expect("read linux/Cargo.toml");
    let dep = regex(r"^\s*\[?\s*(?:[\w-]+\.)*(cwreap|clap|serde[-_]saphyr|tokio|tracing)\s*[=\]]");
    for (k, line) in manifest.lines().enumerate() {
        if dep.is_match(line) {
            problems.push(format!("linux/Cargo.toml:{}: `{}`", k + 1, line.trim()));
        }
    }
    println!(
        "linux/src: {} files free of cwreap, clap, serde_saphyr, tokio, tracing",
        files.len()
    );
    assert_none(
        "the kernel crate reaches into policy or command-line crates",
        &problems,
    );
}

#[test]
fn unsafe_only_in_the_kernel_crate() {
    // This file's own mentions are in comments and string literals, which are not code.
    let word = regex(r"\bunsafe\b");
    let block = regex(r"\bunsafe\s*\{");
    let forbid = regex(r"#!\[\s*forbid\s*\(\s*unsafe_code\s*\)\s*\]");
    let mut problems = Vec::new();

    let mut checked = 0;
    for dir in ["src", "tests"] {
        for file in rust_files(&repo().join(dir)) {
            let src = Source::load(&file);
            checked += 1;
            for m in word.find_iter(&src.code) {
                let line = src.line_of(m.start());
                problems.push(format!("{}:{line}: unsafe outside cwreap-linux", src.name));
            }
        }
    }
    for root in ["src/lib.rs", "src/main.rs"] {
        let src = Source::load(&repo().join(root));
        if !forbid.is_match(&src.code) {
            problems.push(format!("{root}: no #![forbid(unsafe_code)]"));
        }
    }

    let mut blocks = 0;
    for file in rust_files(&repo().join("linux/src")) {
        let src = Source::load(&file);
        let raw: Vec<&str> = src.raw.lines().collect();
        for m in block.find_iter(&src.code) {
            blocks += 1;
            let line = src.line_of(m.start());
            let noted = raw[line.saturating_sub(7)..line]
                .iter()
                .any(|l| l.contains("SAFETY:"));
            if !noted {
                problems.push(format!(
                    "{}:{line}: unsafe block without a SAFETY: note in the 6 lines above",
                    src.name
                ));
            }
        }
    }
    println!(
        "{checked} files in src/ and tests/ free of unsafe; {blocks} unsafe blocks in linux/src"
    );
    assert!(
        blocks > 0,
        "no unsafe block found in linux/src; is the parser reading nothing?"
    );
    assert_none("unsafe code out of place or unexplained", &problems);
}

#[test]
fn files_stay_small() {
    let mut sizes = Vec::new();
    for dir in ["src", "linux/src"] {
        for file in rust_files(&repo().join(dir)) {
            let src = Source::load(&file);
            sizes.push((src.non_test_lines(), src.name));
        }
    }
    sizes.sort();
    let (most, largest) = sizes.last().expect("some source file");
    println!("largest: {largest}, {most} lines outside #[cfg(test)]");
    let problems: Vec<String> = sizes
        .iter()
        .rev()
        .filter(|(n, _)| *n > MAX_LINES)
        .map(|(n, name)| format!("{name}: {n} lines outside #[cfg(test)]"))
        .collect();
    assert_none(
        &format!("source files over {MAX_LINES} lines of non-test code"),
        &problems,
    );
}

/// The stripper the rules stand on.
#[test]
fn strip_drops_comments_and_literal_contents() {
    let src = "let a = \"crate::x // y\"; // crate::z\n/* a /* b */ c */ let b = 'x';\n\
               let c = r#\"un\"safe\"#; fn f<'a>(s: &'a str) -> char { '\\'' }\n";
    let out = strip(src);
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(!out.contains("crate::"), "{out}");
    assert!(!out.contains("safe"), "{out}");
    assert!(out.contains("fn f<'a>(s: &'a str)"), "{out}");
    assert!(out.contains("let b = ' ';"), "{out}");

    let code = "use crate::{a, b::{c, d},\n    e as f};";
    let heads: Vec<String> = group_heads(code, code.find('{').expect("a group") + 1)
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(heads, ["a", "b", "e"]);
}
