//! Perf maps (/tmp/perf-PID.map): the names a JIT writes for its code, one line per region,
//! `START SIZE NAME` in hex (Node's --perf-basic-prof, `jcmd PID Compiler.perfmap`).

use std::path::PathBuf;

#[derive(Debug, Default)]
pub(crate) struct PerfMap {
    /// (start, end, name), by start.
    entries: Vec<(u64, u64, Box<str>)>,
}

impl PerfMap {
    /// Parse a map; lines not of the form are skipped.
    pub fn parse(text: &str) -> PerfMap {
        let mut entries: Vec<(u64, u64, Box<str>)> = text
            .lines()
            .filter_map(|line| {
                let mut f = line.splitn(3, ' ');
                let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
                let start = hex(f.next()?)?;
                let size = hex(f.next()?)?;
                let name = f.next()?.trim();
                (size > 0 && !name.is_empty())
                    .then(|| (start, start.saturating_add(size), name.into()))
            })
            .collect();
        entries.sort_by_key(|e| e.0);
        PerfMap { entries }
    }

    /// The region holding `addr`: the latest written wins where a JIT reused memory.
    pub fn lookup(&self, addr: u64) -> Option<&str> {
        let i = self.entries.partition_point(|e| e.0 <= addr);
        self.entries[..i]
            .iter()
            .rev()
            .take(64)
            .find(|e| addr < e.1)
            .map(|e| &*e.2)
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The perf map of `pid`, seen from here: the JIT names it after its pid in its own pid
/// namespace, under its own /tmp.
pub(crate) fn path(pid: u32) -> PathBuf {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let nspid = innermost_pid(&status).unwrap_or(pid);
    PathBuf::from(format!("/proc/{pid}/root/tmp/perf-{nspid}.map"))
}

/// The pid in the process's own pid namespace: the last of /proc/PID/status's `NSpid:`.
fn innermost_pid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// A JIT name as (function, file, line): V8's `JS:*handler /app/server.js:12:20` (also
/// `LazyCompile:`, `Function:`, and `~`/`^`/`+` tier marks) gives the function and its
/// place; other names are kept whole.
pub(crate) fn split_name(name: &str) -> (String, Option<String>, Option<u32>) {
    let body = ["JS:", "LazyCompile:", "Function:", "Script:", "Eval:"]
        .iter()
        .find_map(|p| name.strip_prefix(p));
    let Some(body) = body else {
        return (name.to_string(), None, None);
    };
    let body = body.trim_start_matches(['*', '~', '^', '+']);
    let (func, place) = match body.rsplit_once(' ') {
        Some((f, p)) => (f.trim(), p),
        None if body.contains(':') && !body.contains("::") => ("", body),
        None => (body, ""),
    };
    let func = if func.is_empty() { "(anonymous)" } else { func };
    // place is FILE:LINE or FILE:LINE:COLUMN.
    fn number(s: &str) -> Option<(&str, u32)> {
        let (rest, n) = s.rsplit_once(':')?;
        Some((rest, n.parse().ok()?))
    }
    let (file, line) = match number(place) {
        Some((rest, last)) => match number(rest) {
            Some((file, line)) => (Some(file), Some(line)),
            None => (Some(rest), Some(last)),
        },
        None => (Some(place).filter(|p| !p.is_empty()), None),
    };
    (func.to_string(), file.map(str::to_string), line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_regions_and_skips_bad_lines() {
        let map = PerfMap::parse(
            "3a0c1a00 40 JS:*onData /srv/app/server.js:12:20\n\
             zz 10 bad\n\
             3a0c1b00 0 empty\n\
             3a0c1c00 20\n\
             0x3a0c1d00 0x10 Interpreter\n\
             3a0c1a10 8 Builtin:CallFunction\n",
        );
        assert_eq!(
            map.lookup(0x3a0c1a3f),
            Some("JS:*onData /srv/app/server.js:12:20")
        );
        assert_eq!(map.lookup(0x3a0c1a12), Some("Builtin:CallFunction"));
        assert_eq!(map.lookup(0x3a0c1a40), None);
        assert_eq!(map.lookup(0x3a0c1d08), Some("Interpreter"));
        assert_eq!(map.lookup(0x10), None);
        assert!(PerfMap::parse("\u{0}\u{ff}garbage\n\n").is_empty());
    }

    #[test]
    fn names_the_map_after_the_pid_in_its_namespace() {
        assert_eq!(innermost_pid("Name:\tnode\nNSpid:\t48213\t7\n"), Some(7));
        assert_eq!(innermost_pid("NSpid:\t48213\n"), Some(48213));
        assert_eq!(innermost_pid("NSpid:\n"), None);
        assert_eq!(innermost_pid(""), None);
        let me = std::process::id();
        assert_eq!(
            path(me),
            PathBuf::from(format!("/proc/{me}/root/tmp/perf-{me}.map"))
        );
    }

    #[test]
    fn splits_v8_names() {
        let s = |n: &str| split_name(n);
        assert_eq!(
            s("JS:*onData /srv/app/server.js:12:20"),
            ("onData".into(), Some("/srv/app/server.js".into()), Some(12))
        );
        assert_eq!(
            s("LazyCompile:~handle file:///srv/a.mjs:3"),
            ("handle".into(), Some("file:///srv/a.mjs".into()), Some(3))
        );
        assert_eq!(
            s("JS:~ /srv/app/server.js:1:1"),
            (
                "(anonymous)".into(),
                Some("/srv/app/server.js".into()),
                Some(1)
            )
        );
        assert_eq!(
            s("Builtin:CallFunction"),
            ("Builtin:CallFunction".into(), None, None)
        );
        assert_eq!(s("Lcom/x/Y;::run"), ("Lcom/x/Y;::run".into(), None, None));
    }
}
