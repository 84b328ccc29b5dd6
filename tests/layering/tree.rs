//! The module trees of the crates, as rustc builds them: `mod x;` finds `x.rs` or
//! `x/mod.rs` next to a mod-rs file (lib.rs, main.rs, mod.rs, or a file loaded through
//! `#[path]`) and under `<name>/` next to any other file; `#[path]` is relative to the
//! declaring file's directory, or, inside an inline module, to that module's directory.
//! Each module keeps the names it defines, its imports, and the paths its code uses;
//! `#[cfg(test)]` code is kept out of the last two.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use proc_macro2::{TokenStream, TokenTree};
use quote::ToTokens;
use syn::ext::IdentExt;
use syn::visit::Visit;
use syn::{Item, UseTree, Visibility};

use super::source::{
    self, SourceFile, cfg_attr_path, is_test, item_attrs, line, lines, normalize, path_attr,
};

/// One module, inline or a file of its own.
pub struct Module {
    pub file: usize,
    pub parent: Option<usize>,
    /// Compiled only by `cargo test`, itself or through an ancestor.
    pub test: bool,
    /// Submodules: name → (module, declared `pub`).
    pub children: BTreeMap<String, (usize, bool)>,
    /// Items named here (not modules).
    pub items: BTreeMap<String, ItemDef>,
    /// `macro_rules!` defined here: reachable by their bare name from the code after them
    /// (and through `#[macro_use]`), not by a path.
    pub macros: BTreeSet<String>,
    pub imports: Vec<Import>,
    /// Paths named by the module's non-test code (not counting its `use` items).
    pub refs: Vec<PathRef>,
    /// First segments of those paths: what a re-export is used for here.
    pub mentions: BTreeSet<String>,
    /// Where `mod x;` inside this module looks for x's file.
    child_dir: PathBuf,
    /// Declared `mod x { .. }` rather than loaded from a file.
    inline: bool,
}

/// An item a module names.
#[derive(Clone, Copy)]
pub struct ItemDef {
    pub is_trait: bool,
    pub public: bool,
    /// The module that defines it: itself, except for a `#[macro_export]` macro, which is
    /// named at the crate root.
    pub home: usize,
}

/// One name a `use` brings in (`name` None for a glob).
pub struct Import {
    pub name: Option<String>,
    pub path: Vec<String>,
    pub global: bool,
    pub public: bool,
    /// Inside a function body: seen only from its own module.
    pub local: bool,
    pub line: usize,
}

/// A path in code: `a::b::C`, `super::x`, or a single name.
pub struct PathRef {
    pub segs: Vec<String>,
    pub line: usize,
    /// The path of a macro call (`name!(..)`).
    pub is_macro: bool,
}

/// A loaded file and what came from it.
pub struct FileEntry {
    pub src: Rc<SourceFile>,
    pub path: PathBuf,
    /// The modules loaded from this file (a file can be loaded twice through `#[path]`).
    pub modules: Vec<usize>,
    /// Lines of `#[cfg(test)]` items inside non-test modules.
    pub test_ranges: Vec<(usize, usize)>,
    /// How its parent declared it: `#[cfg(test)] mod tests;` and nothing else.
    pub declared_as_test_mod: bool,
}

impl FileEntry {
    /// Every module loaded from it is test code.
    pub fn is_test(&self, tree: &Tree) -> bool {
        self.modules.iter().all(|&m| tree.modules[m].test)
    }
}

pub struct Tree {
    pub root: PathBuf,
    pub files: Vec<FileEntry>,
    pub modules: Vec<Module>,
    /// Forbidden forms, files that cannot be read, modules whose file is missing.
    pub problems: Vec<String>,
    /// `extern crate self as x`: (the module it is in, x). Still followed, so the cycle it
    /// hides is reported too.
    pub self_aliases: Vec<(usize, String)>,
}

impl Tree {
    /// Load the module tree of each crate root file (relative to `root`).
    pub fn build(root: &Path, crates: &[&str]) -> Tree {
        let mut tree = Tree {
            root: root.to_path_buf(),
            files: Vec::new(),
            modules: Vec::new(),
            problems: Vec::new(),
            self_aliases: Vec::new(),
        };
        for file in crates {
            let path = root.join(file);
            let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
            tree.load(&path, None, false, dir, false);
        }
        tree
    }

    pub fn name(&self, file: usize) -> &str {
        &self.files[file].src.name
    }

    /// Whether `m` is `ancestor` or inside it.
    pub fn within(&self, mut m: usize, ancestor: usize) -> bool {
        loop {
            if m == ancestor {
                return true;
            }
            match self.modules[m].parent {
                Some(p) => m = p,
                None => return false,
            }
        }
    }

    pub fn crate_root(&self, mut m: usize) -> usize {
        while let Some(p) = self.modules[m].parent {
            m = p;
        }
        m
    }

    /// Load the file at `path` as a new module.
    fn load(
        &mut self,
        path: &Path,
        parent: Option<usize>,
        test: bool,
        child_dir: PathBuf,
        declared_test_mod: bool,
    ) -> Option<usize> {
        let path = normalize(path);
        let mut up = parent;
        while let Some(a) = up {
            if self.files[self.modules[a].file].path == path {
                let name = source::rel(&self.root, &path);
                self.problems.push(format!(
                    "{name}: a module of this file loads the file again"
                ));
                return None;
            }
            up = self.modules[a].parent;
        }
        let src = match source::parse(&self.root, &path) {
            Ok(src) => Rc::new(src),
            Err(e) => {
                self.problems.push(e);
                return None;
            }
        };
        let file = match self.files.iter().position(|f| f.path == path) {
            Some(f) => f,
            None => {
                self.files.push(FileEntry {
                    src: Rc::clone(&src),
                    path: path.clone(),
                    modules: Vec::new(),
                    test_ranges: Vec::new(),
                    declared_as_test_mod: declared_test_mod,
                });
                self.files.len() - 1
            }
        };
        let m = self.new_module(file, parent, test, child_dir, false);
        self.items(m, &src.ast.items);
        Some(m)
    }

    fn new_module(
        &mut self,
        file: usize,
        parent: Option<usize>,
        test: bool,
        child_dir: PathBuf,
        inline: bool,
    ) -> usize {
        self.modules.push(Module {
            file,
            parent,
            test,
            children: BTreeMap::new(),
            items: BTreeMap::new(),
            macros: BTreeSet::new(),
            imports: Vec::new(),
            refs: Vec::new(),
            mentions: BTreeSet::new(),
            child_dir,
            inline,
        });
        let m = self.modules.len() - 1;
        self.files[file].modules.push(m);
        m
    }

    fn problem(&mut self, m: usize, line: usize, what: &str) {
        let name = self.name(self.modules[m].file).to_string();
        self.problems.push(format!("{name}:{line}: {what}"));
    }

    /// The items of module `m`.
    fn items(&mut self, m: usize, items: &[Item]) {
        for item in items {
            let test = self.modules[m].test || is_test(item_attrs(item));
            if test && !self.modules[m].test {
                let file = self.modules[m].file;
                self.files[file].test_ranges.push(lines(item));
            }
            let public = |vis: &Visibility| !matches!(vis, Visibility::Inherited);
            match item {
                Item::Mod(im) => self.module(m, im, test),
                Item::Use(u) => {
                    if !test {
                        self.use_item(m, u, false);
                    }
                }
                Item::ExternCrate(e) => {
                    if e.ident == "self" {
                        if let Some((_, alias)) = &e.rename {
                            self.self_aliases.push((m, alias.to_string()));
                        }
                        self.problem(
                            m,
                            line(e.extern_token.span),
                            "`extern crate self` gives the crate a second name, and paths \
                             through it hide the import graph: write `crate::`",
                        );
                    }
                }
                _ => {
                    let (name, is_trait, vis) = match item {
                        Item::Const(i) => (Some(&i.ident), false, Some(&i.vis)),
                        Item::Enum(i) => (Some(&i.ident), false, Some(&i.vis)),
                        Item::Fn(i) => (Some(&i.sig.ident), false, Some(&i.vis)),
                        Item::Static(i) => (Some(&i.ident), false, Some(&i.vis)),
                        Item::Struct(i) => (Some(&i.ident), false, Some(&i.vis)),
                        Item::Trait(i) => (Some(&i.ident), true, Some(&i.vis)),
                        Item::TraitAlias(i) => (Some(&i.ident), true, Some(&i.vis)),
                        Item::Type(i) => (Some(&i.ident), false, Some(&i.vis)),
                        Item::Union(i) => (Some(&i.ident), false, Some(&i.vis)),
                        Item::Macro(i) => (i.ident.as_ref(), false, None),
                        _ => (None, false, None),
                    };
                    if let Some(name) = name {
                        let def = ItemDef {
                            is_trait,
                            public: vis.is_none_or(public),
                            home: m,
                        };
                        self.modules[m].items.insert(id(name), def);
                    }
                    if let Item::Macro(mac) = item
                        && let Some(name) = &mac.ident
                    {
                        self.modules[m].macros.insert(id(name));
                        if mac.attrs.iter().any(|a| a.path().is_ident("macro_export")) {
                            let root = self.crate_root(m);
                            let def = ItemDef {
                                is_trait: false,
                                public: true,
                                home: m,
                            };
                            self.modules[root].items.insert(id(name), def);
                        }
                    }
                    if let Item::ForeignMod(f) = item {
                        for fi in &f.items {
                            let name = match fi {
                                syn::ForeignItem::Fn(i) => Some(&i.sig.ident),
                                syn::ForeignItem::Static(i) => Some(&i.ident),
                                syn::ForeignItem::Type(i) => Some(&i.ident),
                                _ => None,
                            };
                            if let Some(name) = name {
                                let def = ItemDef {
                                    is_trait: false,
                                    public: true,
                                    home: m,
                                };
                                self.modules[m].items.insert(id(name), def);
                            }
                        }
                    }
                    if !test {
                        self.scan(m, item);
                    }
                }
            }
        }
    }

    /// `mod x;` or `mod x { .. }` inside module `m`.
    fn module(&mut self, m: usize, im: &syn::ItemMod, test: bool) {
        let name = id(&im.ident);
        if let Some(l) = cfg_attr_path(&im.attrs) {
            self.problem(
                m,
                l,
                "`#[cfg_attr(.., path = ..)]`: a module's file must not depend on the build",
            );
        }
        let explicit = path_attr(&im.attrs);
        let parent = &self.modules[m];
        let child = if let Some((_, content)) = &im.content {
            let dir = parent.child_dir.join(explicit.as_deref().unwrap_or(&name));
            let file = parent.file;
            let c = self.new_module(file, Some(m), test, dir, true);
            self.items(c, content);
            Some(c)
        } else {
            let (path, child_dir) = match &explicit {
                Some(p) => {
                    let base = if parent.inline {
                        parent.child_dir.clone()
                    } else {
                        let file = &self.files[parent.file].path;
                        file.parent().map(Path::to_path_buf).unwrap_or_default()
                    };
                    let path = normalize(&base.join(p));
                    // A file loaded through #[path] is a mod-rs file.
                    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
                    (Some(path), dir)
                }
                None => {
                    let flat = parent.child_dir.join(format!("{name}.rs"));
                    let nested = parent.child_dir.join(&name).join("mod.rs");
                    let dir = parent.child_dir.join(&name);
                    if flat.is_file() {
                        (Some(flat), dir)
                    } else if nested.is_file() {
                        (Some(nested), dir)
                    } else {
                        (None, dir)
                    }
                }
            };
            let Some(path) = path else {
                let l = line(im.ident.span());
                self.problem(
                    m,
                    l,
                    &format!("`mod {name};`: no {name}.rs nor {name}/mod.rs"),
                );
                return;
            };
            let test_mod = name == "tests" && is_test(&im.attrs);
            self.load(&path, Some(m), test, child_dir, test_mod)
        };
        if let Some(c) = child {
            let public = !matches!(im.vis, Visibility::Inherited);
            self.modules[m].children.insert(name, (c, public));
        }
    }

    /// A `use` item of module `m`.
    fn use_item(&mut self, m: usize, u: &syn::ItemUse, local: bool) {
        let public = !matches!(u.vis, Visibility::Inherited);
        let global = u.leading_colon.is_some();
        let mut flat = Vec::new();
        flatten(&u.tree, &mut Vec::new(), &mut flat);
        for (name, path, at) in flat {
            let is_self_or_above = !path.is_empty()
                && path
                    .iter()
                    .all(|s| s == "crate" || s == "super" || s == "self");
            if is_self_or_above && name.is_some() {
                let what = format!(
                    "`use {} as {}` gives a crate or module a second name, and paths through \
                     it hide the import graph: write `crate::` or `super::` paths",
                    path.join("::"),
                    name.as_deref().unwrap_or("_"),
                );
                // Still followed, so the cycle it hides is reported too.
                self.problem(m, at, &what);
            }
            self.modules[m].imports.push(Import {
                name,
                path,
                global,
                public,
                local,
                line: at,
            });
        }
    }

    /// The paths in one non-test item of module `m` (not a `mod` or `use` item).
    fn scan(&mut self, m: usize, item: &Item) {
        let mut scan = Scan::default();
        scan.visit_item(item);
        let file = self.modules[m].file;
        self.files[file].test_ranges.extend(scan.test_ranges);
        self.modules[m].mentions.extend(scan.mentions);
        self.modules[m].refs.extend(scan.refs);
        for u in &scan.uses {
            self.use_item(m, u, true);
        }
        for (l, what) in scan.problems {
            self.problem(m, l, &what);
        }
    }
}

/// `a::{b, c::d as e, f::*}` → (Some("b"), [a, b]), (Some("e"), [a, c, d]), (None, [a, f]).
fn flatten(
    tree: &UseTree,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Option<String>, Vec<String>, usize)>,
) {
    match tree {
        UseTree::Path(p) => {
            prefix.push(id(&p.ident));
            flatten(&p.tree, prefix, out);
            prefix.pop();
        }
        UseTree::Name(n) => {
            let at = line(n.ident.span());
            if n.ident == "self" {
                out.push((prefix.last().cloned(), prefix.clone(), at));
            } else {
                let mut path = prefix.clone();
                path.push(id(&n.ident));
                out.push((Some(id(&n.ident)), path, at));
            }
        }
        UseTree::Rename(r) => {
            let mut path = prefix.clone();
            if r.ident != "self" {
                path.push(id(&r.ident));
            }
            let at = line(r.ident.span());
            out.push((Some(id(&r.rename)), path, at));
        }
        UseTree::Glob(g) => out.push((None, prefix.clone(), line(g.star_token.span))),
        UseTree::Group(g) => {
            for t in &g.items {
                flatten(t, prefix, out);
            }
        }
    }
}

/// Walks the code of one item: paths, macro bodies, string paths in attributes, `use`
/// items in function bodies; skips `#[cfg(test)]` parts and notes their lines.
#[derive(Default)]
struct Scan {
    refs: Vec<PathRef>,
    mentions: BTreeSet<String>,
    uses: Vec<syn::ItemUse>,
    test_ranges: Vec<(usize, usize)>,
    problems: Vec<(usize, String)>,
}

impl Scan {
    fn path(&mut self, segs: Vec<String>, line: usize, is_macro: bool) {
        if let Some(first) = segs.first() {
            self.mentions.insert(first.clone());
        }
        self.refs.push(PathRef {
            segs,
            line,
            is_macro,
        });
    }

    /// Paths in tokens a macro receives: `a::b::c` runs not preceded by `::` or `.`, and
    /// `use` items.
    fn tokens(&mut self, tokens: TokenStream) {
        let tts: Vec<TokenTree> = tokens.into_iter().collect();
        let colons = |k: usize| {
            matches!((tts.get(k), tts.get(k + 1)),
                (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
                    if a.as_char() == ':' && b.as_char() == ':')
        };
        let mut i = 0;
        while i < tts.len() {
            match &tts[i] {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(word) if word == "use" => {
                    let end = (i..tts.len())
                        .find(|&k| matches!(&tts[k], TokenTree::Punct(p) if p.as_char() == ';'));
                    if let Some(end) = end {
                        let item: TokenStream = tts[i..=end].iter().cloned().collect();
                        if let Ok(u) = syn::parse2::<syn::ItemUse>(item) {
                            self.uses.push(u);
                            i = end + 1;
                            continue;
                        }
                    }
                }
                TokenTree::Ident(ident) => {
                    let after_colons = i >= 2 && colons(i - 2);
                    let after_dot =
                        i >= 1 && matches!(&tts[i - 1], TokenTree::Punct(p) if p.as_char() == '.');
                    if !after_colons && !after_dot {
                        let mut segs = vec![unraw(&ident.to_string())];
                        let mut k = i + 1;
                        while colons(k) {
                            let Some(TokenTree::Ident(next)) = tts.get(k + 2) else {
                                break;
                            };
                            segs.push(unraw(&next.to_string()));
                            k += 3;
                        }
                        let bang =
                            matches!(tts.get(k), Some(TokenTree::Punct(p)) if p.as_char() == '!');
                        self.path(segs, line(ident.span()), bang);
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }

    fn path_of(&mut self, p: &syn::Path, is_macro: bool) {
        if p.leading_colon.is_none() {
            let segs = p.segments.iter().map(|s| id(&s.ident)).collect();
            self.path(segs, line(p.segments[0].ident.span()), is_macro);
        }
    }

    fn skip_test(&mut self, attrs: &[syn::Attribute], node: &impl syn::spanned::Spanned) -> bool {
        let test = is_test(attrs);
        if test {
            self.test_ranges.push(lines(node));
        }
        test
    }
}

impl<'ast> Visit<'ast> for Scan {
    fn visit_path(&mut self, p: &'ast syn::Path) {
        self.path_of(p, false);
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.path_of(&m.path, true);
        if m.path.is_ident("include") {
            self.problems.push((
                line(m.path.segments[0].ident.span()),
                "`include!` pastes code outside the module tree: declare a module".to_string(),
            ));
        }
        self.tokens(m.tokens.clone());
    }

    fn visit_attribute(&mut self, a: &'ast syn::Attribute) {
        if a.path().is_ident("doc") {
            return;
        }
        // `#[serde(with = "crate::x")]` and the like name a path in a string.
        let mut strings = Vec::new();
        strings_in(a.meta.to_token_stream(), &mut strings);
        for (s, l) in strings {
            if let Ok(p) = syn::parse_str::<syn::Path>(&s)
                && p.segments.len() > 1
                && p.leading_colon.is_none()
            {
                self.path(p.segments.iter().map(|s| id(&s.ident)).collect(), l, false);
            }
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        if !is_test(&u.attrs) {
            self.uses.push(u.clone());
        }
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        self.problems.push((
            line(m.ident.span()),
            "a module declared inside a function body: declare it at module level".to_string(),
        ));
    }

    fn visit_item(&mut self, i: &'ast Item) {
        if !self.skip_test(item_attrs(i), i) {
            syn::visit::visit_item(self, i);
        }
    }

    fn visit_impl_item(&mut self, i: &'ast syn::ImplItem) {
        let attrs: &[syn::Attribute] = match i {
            syn::ImplItem::Const(x) => &x.attrs,
            syn::ImplItem::Fn(x) => &x.attrs,
            syn::ImplItem::Type(x) => &x.attrs,
            syn::ImplItem::Macro(x) => &x.attrs,
            _ => &[],
        };
        if !self.skip_test(attrs, i) {
            syn::visit::visit_impl_item(self, i);
        }
    }

    fn visit_trait_item(&mut self, i: &'ast syn::TraitItem) {
        let attrs: &[syn::Attribute] = match i {
            syn::TraitItem::Const(x) => &x.attrs,
            syn::TraitItem::Fn(x) => &x.attrs,
            syn::TraitItem::Type(x) => &x.attrs,
            syn::TraitItem::Macro(x) => &x.attrs,
            _ => &[],
        };
        if !self.skip_test(attrs, i) {
            syn::visit::visit_trait_item(self, i);
        }
    }

    fn visit_stmt(&mut self, s: &'ast syn::Stmt) {
        let attrs: &[syn::Attribute] = match s {
            syn::Stmt::Local(l) => &l.attrs,
            syn::Stmt::Macro(m) => &m.attrs,
            _ => &[],
        };
        if !self.skip_test(attrs, s) {
            syn::visit::visit_stmt(self, s);
        }
    }

    fn visit_field(&mut self, f: &'ast syn::Field) {
        if !self.skip_test(&f.attrs, f) {
            syn::visit::visit_field(self, f);
        }
    }

    fn visit_variant(&mut self, v: &'ast syn::Variant) {
        if !self.skip_test(&v.attrs, v) {
            syn::visit::visit_variant(self, v);
        }
    }

    fn visit_arm(&mut self, a: &'ast syn::Arm) {
        if !self.skip_test(&a.attrs, a) {
            syn::visit::visit_arm(self, a);
        }
    }
}

/// String literals in `tokens`, with their lines.
fn strings_in(tokens: TokenStream, out: &mut Vec<(String, usize)>) {
    for tt in tokens {
        match tt {
            TokenTree::Group(g) => strings_in(g.stream(), out),
            TokenTree::Literal(lit) => {
                let l = line(lit.span());
                if let Ok(s) = syn::parse2::<syn::LitStr>(TokenTree::Literal(lit).into()) {
                    out.push((s.value(), l));
                }
            }
            _ => {}
        }
    }
}

/// A name as rustc compares names: `r#type` is `type`.
pub fn id(ident: &syn::Ident) -> String {
    ident.unraw().to_string()
}

fn unraw(name: &str) -> String {
    name.strip_prefix("r#").unwrap_or(name).to_string()
}
