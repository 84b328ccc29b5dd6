//! Reading a source file as Rust: its syntax tree, the line of every token, which lines are
//! comments, and which attributes mean "compiled only by `cargo test`".

use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::punctuated::Punctuated;
use syn::{Attribute, Item, Meta, Token};

/// One file, parsed.
pub struct SourceFile {
    /// Path relative to the checked root, `/`-separated: the name used in every message.
    pub name: String,
    pub text: String,
    pub ast: syn::File,
}

impl SourceFile {
    pub fn line_count(&self) -> usize {
        self.text.lines().count()
    }
}

/// `path` relative to `root`, `/`-separated.
pub fn rel(root: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path);
    let parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    parts.join("/")
}

/// `path` with `.` and `..` taken out, without touching the file system (a `#[path]`
/// attribute may climb out of a directory and back in).
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Every `.rs` file under `dir`, sorted; none if `dir` does not exist.
pub fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Read and parse `path`; the error names the file, line and column.
pub fn parse(root: &Path, path: &Path) -> Result<SourceFile, String> {
    let name = rel(root, path);
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    let ast = syn::parse_file(&text).map_err(|e| {
        let at = e.span().start();
        format!("{name}:{}:{}: cannot parse: {e}", at.line, at.column + 1)
    })?;
    Ok(SourceFile { name, text, ast })
}

/// The tokens of a file that need not parse as items (tests, benchmarks): comments are
/// dropped and literals kept whole, so neither can be mistaken for code.
pub fn tokens(root: &Path, path: &Path) -> Result<(String, String, TokenStream), String> {
    let name = rel(root, path);
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    let tokens =
        TokenStream::from_str(&text).map_err(|e| format!("{name}: cannot tokenize: {e}"))?;
    Ok((name, text, tokens))
}

pub fn line(span: Span) -> usize {
    span.start().line
}

/// First and last line of a syntax node.
pub fn lines(node: &impl syn::spanned::Spanned) -> (usize, usize) {
    let span = node.span();
    (span.start().line, span.end().line)
}

/// Every identifier spelled `word` in `tokens` (at any depth), by line and column.
pub fn find_ident(tokens: TokenStream, word: &str, out: &mut Vec<(usize, usize)>) {
    for tt in tokens {
        match tt {
            TokenTree::Group(g) => find_ident(g.stream(), word, out),
            TokenTree::Ident(i) if i == word => {
                let at = i.span().start();
                out.push((at.line, at.column));
            }
            _ => {}
        }
    }
}

/// Lines that hold at least one token; in a file that tokenizes, every other non-blank
/// line is (part of) a comment. Doc comments are tokens (`#[doc]` attributes).
pub fn code_lines(tokens: TokenStream, out: &mut std::collections::BTreeSet<usize>) {
    for tt in tokens {
        if let TokenTree::Group(g) = &tt {
            out.insert(line(g.span_open()));
            out.insert(line(g.span_close()));
            code_lines(g.stream(), out);
        } else {
            let span = tt.span();
            out.extend(span.start().line..=span.end().line);
        }
    }
}

/// Whether `attrs` hold a `#[cfg(..)]` that is false in every build but `cargo test`'s:
/// `cfg(test)`, or an `all(..)` with `test` in it, or an `any(..)` of such.
pub fn is_test(attrs: &[Attribute]) -> bool {
    attrs
        .iter()
        .any(|a| a.path().is_ident("cfg") && a.parse_args::<Meta>().is_ok_and(|m| needs_test(&m)))
}

fn needs_test(meta: &Meta) -> bool {
    match meta {
        Meta::Path(p) => p.is_ident("test"),
        Meta::List(list) => {
            let Ok(args) = list.parse_args_with(Punctuated::<Meta, Token![,]>::parse_terminated)
            else {
                return false;
            };
            if list.path.is_ident("all") {
                args.iter().any(needs_test)
            } else if list.path.is_ident("any") {
                !args.is_empty() && args.iter().all(needs_test)
            } else {
                false
            }
        }
        Meta::NameValue(_) => false,
    }
}

/// The value of `#[path = ".."]`, if any.
pub fn path_attr(attrs: &[Attribute]) -> Option<String> {
    attrs.iter().find_map(|a| match &a.meta {
        Meta::NameValue(nv) if nv.path.is_ident("path") => match &nv.value {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some(s.value()),
            _ => None,
        },
        _ => None,
    })
}

/// A `#[cfg_attr(.., path = ..)]`: the file of a module would then depend on the build.
pub fn cfg_attr_path(attrs: &[Attribute]) -> Option<usize> {
    attrs
        .iter()
        .find(|a| {
            a.path().is_ident("cfg_attr") && {
                let mut found = Vec::new();
                if let Meta::List(l) = &a.meta {
                    find_ident(l.tokens.clone(), "path", &mut found);
                }
                !found.is_empty()
            }
        })
        .map(|a| line(a.pound_token.span))
}

/// The outer attributes of an item.
pub fn item_attrs(item: &Item) -> &[Attribute] {
    match item {
        Item::Const(i) => &i.attrs,
        Item::Enum(i) => &i.attrs,
        Item::ExternCrate(i) => &i.attrs,
        Item::Fn(i) => &i.attrs,
        Item::ForeignMod(i) => &i.attrs,
        Item::Impl(i) => &i.attrs,
        Item::Macro(i) => &i.attrs,
        Item::Mod(i) => &i.attrs,
        Item::Static(i) => &i.attrs,
        Item::Struct(i) => &i.attrs,
        Item::Trait(i) => &i.attrs,
        Item::TraitAlias(i) => &i.attrs,
        Item::Type(i) => &i.attrs,
        Item::Union(i) => &i.attrs,
        Item::Use(i) => &i.attrs,
        _ => &[],
    }
}
