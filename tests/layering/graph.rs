//! Names resolved as rustc resolves them, and the graph of files they make: file A → file B
//! when A's non-test code names an item defined in B. `crate::`, `self::` and `super::`
//! chains, imported names and module aliases, glob imports and re-exports are followed to
//! the file that defines the item; a re-export is an edge of its own file only where that
//! file's code uses the name (or the name is a trait, whose methods need no path).

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use super::tree::Tree;

/// What a path names.
#[derive(Clone, Debug)]
pub enum Res {
    Module(usize),
    /// An item defined in module `module`; `is_trait` for traits.
    Item {
        module: usize,
        is_trait: bool,
    },
    /// Outside the crate (std, a dependency, a local variable, a generic parameter).
    External,
    /// Inside the crate, but the checker cannot find it.
    Unresolved,
}

/// Longest chain of imports followed for one name.
const MAX_DEPTH: usize = 64;

impl Tree {
    /// Resolve `segs` as written in module `from`. `skip` is an import of `from` that must
    /// not resolve its own first segment (`use tracing::{self}` names the crate, not itself).
    pub fn resolve(&self, from: usize, segs: &[String], skip: Option<usize>, depth: usize) -> Res {
        if depth > MAX_DEPTH || segs.is_empty() {
            return Res::Unresolved;
        }
        let mut rest = segs;
        let mut cur = match segs[0].as_str() {
            "crate" => {
                rest = &segs[1..];
                Res::Module(self.crate_root(from))
            }
            "self" => {
                rest = &segs[1..];
                Res::Module(from)
            }
            "super" => {
                let mut m = from;
                while let Some(("super", tail)) = rest.split_first().map(|(h, t)| (h.as_str(), t)) {
                    match self.modules[m].parent {
                        Some(p) => m = p,
                        None => return Res::Unresolved,
                    }
                    rest = tail;
                }
                Res::Module(m)
            }
            first => {
                rest = &segs[1..];
                let root = self.crate_root(from);
                match self.lookup(from, first, from, skip, depth + 1) {
                    Some(r) => r,
                    // `extern crate self as x` puts x in the extern prelude of the crate.
                    None if self
                        .self_aliases
                        .iter()
                        .any(|(m, a)| a == first && self.crate_root(*m) == root) =>
                    {
                        Res::Module(root)
                    }
                    None => return Res::External,
                }
            }
        };
        for seg in rest {
            let Res::Module(m) = cur else {
                // An item: what follows is an associated item or a variant.
                return cur;
            };
            cur = match self.lookup(m, seg, from, None, depth + 1) {
                Some(r) => r,
                None => return Res::Unresolved,
            };
        }
        cur
    }

    /// The name `name` inside module `m`, looked up from module `from`.
    fn lookup(
        &self,
        m: usize,
        name: &str,
        from: usize,
        skip: Option<usize>,
        depth: usize,
    ) -> Option<Res> {
        self.lookup_in(m, name, from, skip, depth, false)
    }

    fn lookup_in(
        &self,
        m: usize,
        name: &str,
        from: usize,
        skip: Option<usize>,
        depth: usize,
        via_glob: bool,
    ) -> Option<Res> {
        if depth > MAX_DEPTH {
            return None;
        }
        let module = &self.modules[m];
        // A glob brings in only what the importer may see.
        let seen = |public: bool| !via_glob || public || self.within(from, m);
        if let Some(&(c, public)) = module.children.get(name)
            && seen(public)
        {
            return Some(Res::Module(c));
        }
        if let Some(def) = module.items.get(name)
            && seen(def.public)
        {
            return Some(Res::Item {
                module: def.home,
                is_trait: def.is_trait,
            });
        }
        for (k, imp) in module.imports.iter().enumerate() {
            if imp.name.as_deref() != Some(name)
                || (m == from && skip == Some(k))
                || (imp.local && from != m)
                || !seen(imp.public)
            {
                continue;
            }
            return Some(self.resolve_import(m, k, depth + 1));
        }
        for (k, imp) in module.imports.iter().enumerate() {
            if imp.name.is_some() || (imp.local && from != m) || !seen(imp.public) {
                continue;
            }
            if let Res::Module(g) = self.resolve_import(m, k, depth + 1)
                && g != m
                && let Some(r) = self.lookup_in(g, name, from, None, depth + 1, true)
            {
                return Some(r);
            }
        }
        None
    }

    /// What import `k` of module `m` names.
    pub fn resolve_import(&self, m: usize, k: usize, depth: usize) -> Res {
        let imp = &self.modules[m].imports[k];
        if imp.global {
            return Res::External;
        }
        self.resolve(m, &imp.path, Some(k), depth)
    }

    /// Every name module `g` holds that a glob in module `from` brings in, resolved.
    fn glob_names(&self, g: usize, from: usize, done: &mut BTreeSet<usize>) -> Vec<(String, Res)> {
        let mut out = Vec::new();
        if !done.insert(g) {
            return out;
        }
        let module = &self.modules[g];
        let seen = |public: bool| public || self.within(from, g);
        for (name, def) in &module.items {
            if seen(def.public) {
                out.push((
                    name.clone(),
                    Res::Item {
                        module: def.home,
                        is_trait: def.is_trait,
                    },
                ));
            }
        }
        for (k, imp) in module.imports.iter().enumerate() {
            if imp.local || !seen(imp.public) {
                continue;
            }
            match &imp.name {
                Some(name) => out.push((name.clone(), self.resolve_import(g, k, 0))),
                None => {
                    if let Res::Module(h) = self.resolve_import(g, k, 0) {
                        out.extend(self.glob_names(h, from, done));
                    }
                }
            }
        }
        out
    }

    /// A path that starts inside the crate (rather than at std or a dependency).
    fn crate_local(&self, from: usize, segs: &[String]) -> bool {
        matches!(
            segs.first().map(String::as_str),
            Some("crate" | "self" | "super")
        ) || !matches!(self.resolve(from, &segs[..1], None, 0), Res::External)
    }

    /// The file an item lives in.
    fn file_of(&self, r: &Res) -> Option<usize> {
        match r {
            Res::Item { module, .. } => Some(self.modules[*module].file),
            _ => None,
        }
    }

    /// File → file edges, each with where it was first seen; and the paths that could not
    /// be resolved.
    pub fn edges(&self) -> (Edges, Vec<String>) {
        let mut edges = Edges::new();
        let mut problems = Vec::new();
        for (m, module) in self.modules.iter().enumerate() {
            if module.test {
                continue;
            }
            let file = module.file;
            let name = self.name(file);
            let mut add = |to: Option<usize>, line: usize, what: String| {
                if let Some(to) = to
                    && to != file
                {
                    edges.entry((file, to)).or_insert((line, what));
                }
            };
            for (k, imp) in module.imports.iter().enumerate() {
                let shown = format!(
                    "use {}{}",
                    imp.path.join("::"),
                    match &imp.name {
                        None => "::*".to_string(),
                        Some(n) if Some(n) != imp.path.last() => format!(" as {n}"),
                        Some(_) => String::new(),
                    }
                );
                let res = self.resolve_import(m, k, 0);
                // A re-export only forwards a name; it is this file's own dependency when
                // this file's code uses the name too.
                let used = |n: &str, r: &Res| {
                    !imp.public
                        || module.mentions.contains(n)
                        || matches!(r, Res::Item { is_trait: true, .. })
                };
                match (&imp.name, &res) {
                    (_, Res::Unresolved) => {
                        problems.push(format!("{name}:{}: cannot resolve `{shown}`", imp.line));
                    }
                    (None, Res::Module(g)) => {
                        for (n, r) in self.glob_names(*g, m, &mut BTreeSet::new()) {
                            if used(&n, &r) {
                                add(self.file_of(&r), imp.line, format!("{shown} ({n})"));
                            }
                        }
                    }
                    (Some(n), r) if used(n, r) => add(self.file_of(r), imp.line, shown),
                    (None, r) => add(self.file_of(r), imp.line, shown),
                    _ => {}
                }
            }
            for r in &module.refs {
                if r.is_macro && r.segs.len() == 1 {
                    // A `macro_rules!` of this crate called by its bare name (textual scope,
                    // `#[macro_use]`): an edge to every file that defines one by that name.
                    let root = self.crate_root(m);
                    for (d, def) in self.modules.iter().enumerate() {
                        if def.macros.contains(&r.segs[0]) && self.crate_root(d) == root {
                            add(Some(def.file), r.line, format!("{}!", r.segs[0]));
                        }
                    }
                }
                match self.resolve(m, &r.segs, None, 0) {
                    Res::Unresolved if self.crate_local(m, &r.segs) => {
                        problems.push(format!(
                            "{name}:{}: cannot resolve `{}`",
                            r.line,
                            r.segs.join("::")
                        ));
                    }
                    res => add(self.file_of(&res), r.line, r.segs.join("::")),
                }
            }
        }
        (edges, problems)
    }
}

/// (from file, to file) → (line in `from`, the path or import).
pub type Edges = BTreeMap<(usize, usize), (usize, String)>;

/// A group of files that all reach each other, and one shortest cycle through them.
pub struct Cycle {
    pub files: BTreeSet<String>,
    /// Names every file of the cycle, and for each edge its line and what it imports.
    pub message: String,
}

/// One shortest cycle per strongly connected group of files.
pub fn cycles(tree: &Tree, edges: &Edges) -> Vec<Cycle> {
    let mut next: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for &(a, b) in edges.keys() {
        next.entry(a).or_default().push(b);
    }
    let mut out = Vec::new();
    for group in components(&next) {
        if group.len() < 2 {
            continue;
        }
        // The shortest cycle in the group, over every starting file.
        let mut best: Option<Vec<usize>> = None;
        for &start in &group {
            if let Some(c) = shortest_cycle(start, &group, &next)
                && best.as_ref().is_none_or(|b| c.len() < b.len())
            {
                best = Some(c);
            }
        }
        let Some(mut cycle) = best else { continue };
        // Start at the first file by name, so a message does not depend on the order.
        let first = (0..cycle.len())
            .min_by_key(|&k| tree.name(cycle[k]))
            .unwrap_or(0);
        cycle.rotate_left(first);
        cycle.push(cycle[0]);
        let names: Vec<&str> = cycle.iter().map(|&f| tree.name(f)).collect();
        let mut msg = format!("import cycle: {}", names.join(" -> "));
        for w in cycle.windows(2) {
            let (line, what) = &edges[&(w[0], w[1])];
            msg.push_str(&format!(
                "\n    {}:{line} -> {}: `{what}`",
                tree.name(w[0]),
                tree.name(w[1])
            ));
        }
        let files: BTreeSet<String> = group.iter().map(|&f| tree.name(f).to_string()).collect();
        if group.len() > cycle.len() - 1 {
            let all: Vec<&str> = files.iter().map(String::as_str).collect();
            msg.push_str(&format!(
                "\n    (these files all reach each other: {})",
                all.join(", ")
            ));
        }
        out.push(Cycle {
            files,
            message: msg,
        });
    }
    out
}

/// Strongly connected components (Tarjan), each sorted.
fn components(next: &BTreeMap<usize, Vec<usize>>) -> Vec<Vec<usize>> {
    struct State<'a> {
        next: &'a BTreeMap<usize, Vec<usize>>,
        index: BTreeMap<usize, usize>,
        low: BTreeMap<usize, usize>,
        stack: Vec<usize>,
        on_stack: BTreeSet<usize>,
        out: Vec<Vec<usize>>,
    }
    fn visit(s: &mut State, v: usize) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        for &w in s.next.get(&v).map(Vec::as_slice).unwrap_or(&[]) {
            if !s.index.contains_key(&w) {
                visit(s, w);
                let lw = s.low[&w];
                let lv = s.low.get_mut(&v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(&w) {
                let iw = s.index[&w];
                let lv = s.low.get_mut(&v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[&v] == s.index[&v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(&w);
                group.push(w);
                if w == v {
                    break;
                }
            }
            group.sort_unstable();
            s.out.push(group);
        }
    }
    let mut s = State {
        next,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for &v in next.keys() {
        if !s.index.contains_key(&v) {
            visit(&mut s, v);
        }
    }
    s.out
}

/// The shortest path from `start` back to itself inside `group` (breadth-first).
fn shortest_cycle(
    start: usize,
    group: &[usize],
    next: &BTreeMap<usize, Vec<usize>>,
) -> Option<Vec<usize>> {
    let mut parent: BTreeMap<usize, usize> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(x) = queue.pop_front() {
        for &y in next.get(&x).map(Vec::as_slice).unwrap_or(&[]) {
            if y == start {
                let mut path = vec![x];
                let mut z = x;
                while z != start {
                    z = parent[&z];
                    path.push(z);
                }
                path.reverse();
                return Some(path);
            }
            if group.binary_search(&y).is_ok() && y != start && !parent.contains_key(&y) {
                parent.insert(y, x);
                queue.push_back(y);
            }
        }
    }
    None
}
