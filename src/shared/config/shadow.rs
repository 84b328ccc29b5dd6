//! Targets that can never select a socket: an earlier target takes every socket they would.
//!
//! A socket belongs to the first target that selects it, so a later target whose process
//! criteria are the same as an earlier one's or narrower, and whose socket criteria select
//! nothing the earlier one leaves out, never acts. This is proved, not guessed: criteria are
//! compared as written (a regex covers another only when it is the same text; a cgroup
//! prefix covers the paths under it; a CIDR covers the networks inside it), so a warning is
//! always right, and some shadowed targets go unwarned.

use ipnet::IpNet;

use regex::Regex;

use super::model::{Config, Target};
use crate::shared::selector::{Exclude, Selector, cgroup_has_prefix};

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
    let (a, b) = (&first.selector, &later.selector);
    process_covers(a, b)
        && list_covers(&a.local_ports, &b.local_ports, |x, y| x == y)
        && list_covers(&a.remote_ports, &b.remote_ports, |x, y| x == y)
        && list_covers(&a.local_cidrs, &b.local_cidrs, |x, y| x.contains(y))
        && list_covers(&a.remote_cidrs, &b.remote_cidrs, |x, y| x.contains(y))
        && exclusions_spare(&a.exclude, b)
}

/// Whether every value `later` accepts of one kind, `first` accepts: `first` has none of
/// that kind (any value), or `later` has some and each is covered by one of `first`'s.
fn list_covers<T>(first: &[T], later: &[T], covers: impl Fn(&T, &T) -> bool) -> bool {
    first.is_empty()
        || (!later.is_empty() && later.iter().all(|l| first.iter().any(|f| covers(f, l))))
}

/// Whether every process `later` accepts is accepted by `first`: each criterion `first`
/// has, `later` has too, the same or narrower (regexes compared as text).
fn process_covers(first: &Selector, later: &Selector) -> bool {
    let same_re = |a: &Regex, b: &Regex| a.as_str() == b.as_str();
    list_covers(&first.pids, &later.pids, |a, b| a == b)
        && list_covers(&first.pid_files, &later.pid_files, |a, b| a == b)
        && list_covers(&first.comm, &later.comm, same_re)
        && list_covers(&first.exe, &later.exe, same_re)
        && list_covers(&first.cmdline, &later.cmdline, same_re)
        && list_covers(&first.units, &later.units, |a, b| a == b)
        && list_covers(&first.cgroups, &later.cgroups, |a, b| {
            cgroup_has_prefix(b, a)
        })
        && list_covers(&first.uids, &later.uids, |a, b| a == b)
}

/// Whether `first`'s exclusions leave alone every socket `later` selects: each thing it
/// excludes, `later` excludes too (or, for a local port, never selects anyway).
fn exclusions_spare(first: &Exclude, later: &Selector) -> bool {
    let theirs = &later.exclude;
    let local_ok = first.local_ports.iter().all(|p| {
        theirs.local_ports.contains(p)
            || (!later.local_ports.is_empty() && !later.local_ports.contains(p))
    });
    let remote_ok = first.remote_ports.iter().all(|p| {
        theirs.remote_ports.contains(p)
            || (!later.remote_ports.is_empty() && !later.remote_ports.contains(p))
    });
    let cidrs_ok = first
        .remote_cidrs
        .iter()
        .all(|net| theirs.remote_cidrs.iter().any(|t: &IpNet| t.contains(net)));
    local_ok && remote_ok && cidrs_ok
}

impl Config {
    /// The targets before `target` that may share a socket with it (see [`may_overlap`]):
    /// where there are any, its `cwreap scan` line also lists sockets they take first.
    pub fn may_take_first(&self, target: usize) -> Vec<usize> {
        let Some(later) = self.targets.get(target) else {
            return Vec::new();
        };
        (0..target)
            .filter(|&i| may_overlap(&self.targets[i].selector, &later.selector))
            .collect()
    }
}

/// Whether one socket could be selected by both `a` and `b`. False only when the criteria
/// prove it cannot: a kind of value both give with nothing in common (pids, uids, units,
/// ports, address ranges of one family), or the ports one selects all excluded by the
/// other. Anything else (regexes, cgroups, pid files) may overlap.
pub fn may_overlap(a: &Selector, b: &Selector) -> bool {
    fn apart<T: PartialEq>(x: &[T], y: &[T]) -> bool {
        !x.is_empty() && !y.is_empty() && !x.iter().any(|v| y.contains(v))
    }
    fn all_excluded(ports: &[u16], excluded: &[u16]) -> bool {
        !ports.is_empty() && ports.iter().all(|p| excluded.contains(p))
    }
    !(apart(&a.pids, &b.pids)
        || apart(&a.uids, &b.uids)
        || apart(&a.units, &b.units)
        || apart(&a.local_ports, &b.local_ports)
        || apart(&a.remote_ports, &b.remote_ports)
        || nets_apart(&a.local_cidrs, &b.local_cidrs)
        || nets_apart(&a.remote_cidrs, &b.remote_cidrs)
        || all_excluded(&a.local_ports, &b.exclude.local_ports)
        || all_excluded(&b.local_ports, &a.exclude.local_ports)
        || all_excluded(&a.remote_ports, &b.exclude.remote_ports)
        || all_excluded(&b.remote_ports, &a.exclude.remote_ports))
}

/// Both lists given, every network of one family (IPv4-mapped ones counted as IPv4), and
/// no network of one overlapping one of the other.
fn nets_apart(x: &[IpNet], y: &[IpNet]) -> bool {
    let plain = |n: &IpNet| match n {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => {
                ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(*n, |v| IpNet::V4(v.trunc()))
            }
            None => *n,
        },
        _ => *n,
    };
    let (x, y): (Vec<IpNet>, Vec<IpNet>) =
        (x.iter().map(plain).collect(), y.iter().map(plain).collect());
    let one_family = x
        .iter()
        .chain(&y)
        .all(|n| matches!(n, IpNet::V4(_)) == matches!(x.first(), Some(IpNet::V4(_))));
    !x.is_empty()
        && !y.is_empty()
        && one_family
        && !x
            .iter()
            .any(|m| y.iter().any(|n| m.contains(n) || n.contains(m)))
}
