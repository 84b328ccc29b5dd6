//! Targets that can never select a socket: an earlier target takes every socket they would.
//!
//! A socket belongs to the first target that selects it, so a later target whose process
//! criteria are the same as an earlier one's or narrower, and whose socket criteria select
//! nothing the earlier one leaves out, never acts. This is proved, not guessed: criteria are
//! compared as written (a regex covers another only when it is the same text; a cgroup
//! prefix covers the paths under it; a CIDR covers the networks inside it), so a warning is
//! always right, and some shadowed targets go unwarned.

use ipnet::IpNet;

use super::{Config, Exclude, Target, TargetMatch, cgroup_has_prefix};

/// Target `target` never selects a socket: `by`, before it, takes them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shadowed {
    pub target: usize,
    pub by: usize,
}

impl Config {
    /// Every target an earlier one fully shadows, each with the first such earlier target.
    pub fn shadowed(&self) -> Vec<Shadowed> {
        let mut out = Vec::new();
        for (j, later) in self.targets.iter().enumerate() {
            if let Some(by) = self.targets[..j].iter().position(|t| covers(t, later)) {
                out.push(Shadowed { target: j, by });
            }
        }
        out
    }

    /// One line about `s`: `target `b` never acts: ...`.
    pub fn shadow_message(&self, s: Shadowed) -> String {
        let name = |i: usize| self.targets.get(i).map_or("?", |t| t.name.as_str());
        let line = self
            .targets
            .get(s.by)
            .and_then(|t| t.at)
            .map(|p| format!(" (line {})", p.line))
            .unwrap_or_default();
        format!(
            "target `{}` never acts: target `{}`{line} comes first and selects every socket it \
             would (same or broader process criteria, and socket criteria that cover its own)",
            name(s.target),
            name(s.by)
        )
    }
}

/// Whether `first` selects every socket `later` would.
pub fn covers(first: &Target, later: &Target) -> bool {
    process_covers(&first.matcher, &later.matcher)
        && ports_cover(&first.matcher.local_ports, &later.matcher.local_ports)
        && exclusions_spare(&first.exclude, later)
}

/// Whether every process `later` accepts is accepted by `first`: each criterion `first`
/// has, `later` has too, the same or narrower.
fn process_covers(first: &TargetMatch, later: &TargetMatch) -> bool {
    fn same<T: PartialEq>(a: &Option<T>, b: &Option<T>) -> bool {
        a.is_none() || a == b
    }
    let regex = |a: &Option<regex::Regex>, b: &Option<regex::Regex>| match (a, b) {
        (None, _) => true,
        (Some(a), Some(b)) => a.as_str() == b.as_str(),
        (Some(_), None) => false,
    };
    let cgroup = match (&first.cgroup, &later.cgroup) {
        (None, _) => true,
        (Some(a), Some(b)) => cgroup_has_prefix(b, a),
        (Some(_), None) => false,
    };
    same(&first.pid, &later.pid)
        && same(&first.pid_file, &later.pid_file)
        && regex(&first.comm, &later.comm)
        && regex(&first.exe, &later.exe)
        && regex(&first.cmdline, &later.cmdline)
        && same(&first.systemd_unit, &later.systemd_unit)
        && cgroup
        && same(&first.uid, &later.uid)
}

/// Whether every local port `later` accepts, `first` accepts (empty = any port).
fn ports_cover(first: &[u16], later: &[u16]) -> bool {
    first.is_empty() || (!later.is_empty() && later.iter().all(|p| first.contains(p)))
}

/// Whether `first`'s exclusions leave alone every socket `later` selects: each thing it
/// excludes, `later` excludes too (or, for a local port, never selects anyway).
fn exclusions_spare(first: &Exclude, later: &Target) -> bool {
    let theirs = &later.exclude;
    let local_ok = first.local_ports.iter().all(|p| {
        theirs.local_ports.contains(p)
            || (!later.matcher.local_ports.is_empty() && !later.matcher.local_ports.contains(p))
    });
    let remote_ok = first
        .remote_ports
        .iter()
        .all(|p| theirs.remote_ports.contains(p));
    let cidrs_ok = first
        .remote_cidrs
        .iter()
        .all(|net| theirs.remote_cidrs.iter().any(|t: &IpNet| t.contains(net)));
    local_ok && remote_ok && cidrs_ok
}
