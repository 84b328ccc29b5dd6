//! Which sockets a command or a policy target is about: one type and one matcher for both,
//! so the command line and the policy cannot drift apart.
//!
//! A [`Selector`] has criteria on the process that holds a socket (pid, pid file, name,
//! executable, command line, systemd unit, cgroup, user) and on the socket itself (local
//! and remote ports and addresses), and exclusions. Kinds AND together; several values of
//! one kind OR. Everything here is pure: callers gather [`ProcessFacts`] from /proc and
//! ask. [`Selector::scan_args`] writes a selector as the `cwreap scan` line that selects
//! the same sockets.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use ipnet::IpNet;
use regex::Regex;

/// What selects sockets: empty kinds select everything of that kind.
#[derive(Debug, Clone, Default)]
pub struct Selector {
    pub pids: Vec<i32>,
    /// Files holding a pid, read when the selection is made (each cycle in the daemon).
    pub pid_files: Vec<PathBuf>,
    /// Regexes on /proc/PID/comm; unanchored, like grep's.
    pub comm: Vec<Regex>,
    /// Regexes on the executable's path.
    pub exe: Vec<Regex>,
    /// Regexes on the command line, arguments joined by spaces.
    pub cmdline: Vec<Regex>,
    /// `*.service` or `*.scope` units, compared with [`unit_from_cgroup`].
    pub units: Vec<String>,
    /// cgroup v2 path prefixes, compared component by component.
    pub cgroups: Vec<String>,
    /// Effective user ids (the owner of /proc/PID).
    pub uids: Vec<u32>,
    pub local_ports: Vec<u16>,
    pub remote_ports: Vec<u16>,
    pub local_cidrs: Vec<IpNet>,
    pub remote_cidrs: Vec<IpNet>,
    /// Sockets never selected, whatever else matches.
    pub exclude: Exclude,
}

/// What the process criteria look at, gathered from /proc. Only the facts a selector needs
/// have to be filled ([`Selector::needs`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessFacts {
    pub pid: i32,
    pub comm: String,
    pub exe: Option<String>,
    /// The NUL-separated arguments joined by spaces.
    pub cmdline: Option<String>,
    /// The cgroup v2 path, e.g. `/system.slice/nginx.service` (see [`parse_cgroup_file`]).
    pub cgroup: Option<String>,
    pub uid: Option<u32>,
}

/// What the socket criteria look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketFacts {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

/// Which [`ProcessFacts`] a selector reads beyond the pid and the name.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    pub exe: bool,
    pub cmdline: bool,
    pub cgroup: bool,
    pub uid: bool,
}

impl Needs {
    /// What either needs.
    pub fn or(self, other: Needs) -> Needs {
        Needs {
            exe: self.exe || other.exe,
            cmdline: self.cmdline || other.cmdline,
            cgroup: self.cgroup || other.cgroup,
            uid: self.uid || other.uid,
        }
    }
}

/// Whether no pattern is given, or one of them matches the value (a missing value matches
/// no pattern).
fn any_re(res: &[Regex], value: Option<&str>) -> bool {
    res.is_empty() || value.is_some_and(|v| res.iter().any(|re| re.is_match(v)))
}

/// Sockets never to touch, whatever else matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Exclude {
    pub remote_cidrs: Vec<IpNet>,
    pub local_ports: Vec<u16>,
    pub remote_ports: Vec<u16>,
}

/// `ip` and, for an IPv4-mapped IPv6 address (a dual-stack socket's view of an IPv4 peer),
/// the IPv4 address it maps; for an IPv4 address, its mapped IPv6 form.
fn both_forms(ip: IpAddr) -> [Option<IpAddr>; 2] {
    let other = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
        IpAddr::V4(v4) => Some(IpAddr::V6(v4.to_ipv6_mapped())),
    };
    [Some(ip), other]
}

/// Whether one of `nets` contains `ip`, either form of it.
pub fn in_nets(nets: &[IpNet], ip: IpAddr) -> bool {
    both_forms(ip)
        .into_iter()
        .flatten()
        .any(|a| nets.iter().any(|n| n.contains(&a)))
}

impl Exclude {
    /// Whether any exclusion applies. A remote written as IPv4-mapped IPv6 (a dual-stack
    /// listener's view of an IPv4 peer) is checked against IPv4 CIDRs too, and an IPv4
    /// remote against `::ffff:a.b.c.d` CIDRs.
    pub fn excludes(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        self.local_ports.contains(&local.port())
            || self.remote_ports.contains(&remote.port())
            || in_nets(&self.remote_cidrs, remote.ip())
    }

    pub fn is_empty(&self) -> bool {
        self.remote_cidrs.is_empty() && self.local_ports.is_empty() && self.remote_ports.is_empty()
    }
}

impl Selector {
    /// Whether any criterion is about the process.
    pub fn has_process_criteria(&self) -> bool {
        !(self.pids.is_empty()
            && self.pid_files.is_empty()
            && self.comm.is_empty()
            && self.exe.is_empty()
            && self.cmdline.is_empty()
            && self.units.is_empty()
            && self.cgroups.is_empty()
            && self.uids.is_empty())
    }

    /// Whether any positive criterion is about the socket.
    pub fn has_socket_criteria(&self) -> bool {
        !(self.local_ports.is_empty()
            && self.remote_ports.is_empty()
            && self.local_cidrs.is_empty()
            && self.remote_cidrs.is_empty())
    }

    /// Whether any criterion is about the remote end (which an ended connection no longer
    /// has).
    pub fn has_remote_criteria(&self) -> bool {
        !self.remote_ports.is_empty() || !self.remote_cidrs.is_empty()
    }

    /// Whether nothing at all narrows the selection (exclusions aside).
    pub fn is_empty(&self) -> bool {
        !self.has_process_criteria() && !self.has_socket_criteria()
    }

    /// The process facts beyond pid and name that [`Selector::process_matches`] reads.
    pub fn needs(&self) -> Needs {
        Needs {
            exe: !self.exe.is_empty(),
            cmdline: !self.cmdline.is_empty(),
            cgroup: !self.units.is_empty() || !self.cgroups.is_empty(),
            uid: !self.uids.is_empty(),
        }
    }

    /// Whether the process meets every process criterion. `pids_from_files` are the pids
    /// read from `pid_files` (a missing or unreadable file contributes none, so it matches
    /// nothing).
    pub fn process_matches(&self, facts: &ProcessFacts, pids_from_files: &[i32]) -> bool {
        self.process_matches_before_cmdline(facts, pids_from_files)
            && any_re(&self.cmdline, facts.cmdline.as_deref())
    }

    /// Whether the process meets every process criterion but the command line: those are
    /// checked first, and the command line (which reads the process's own memory, and can
    /// stall) is read only for a process that passes them.
    pub fn process_matches_before_cmdline(
        &self,
        facts: &ProcessFacts,
        pids_from_files: &[i32],
    ) -> bool {
        (self.pids.is_empty() || self.pids.contains(&facts.pid))
            && (self.pid_files.is_empty() || pids_from_files.contains(&facts.pid))
            && any_re(&self.comm, Some(&facts.comm))
            && any_re(&self.exe, facts.exe.as_deref())
            && (self.units.is_empty()
                || facts
                    .cgroup
                    .as_deref()
                    .and_then(unit_from_cgroup)
                    .is_some_and(|u| self.units.contains(&u)))
            && (self.cgroups.is_empty()
                || facts
                    .cgroup
                    .as_deref()
                    .is_some_and(|c| self.cgroups.iter().any(|p| cgroup_has_prefix(c, p))))
            && (self.uids.is_empty() || facts.uid.is_some_and(|u| self.uids.contains(&u)))
    }

    /// Whether the socket meets every socket criterion and no exclusion applies. `remote`
    /// is None for a socket whose connection ended (no peer any more): remote criteria
    /// never match it, and remote exclusions cannot apply to it.
    pub fn socket_matches(&self, local: SocketAddr, remote: Option<SocketAddr>) -> bool {
        let local_ok = (self.local_ports.is_empty() || self.local_ports.contains(&local.port()))
            && (self.local_cidrs.is_empty() || in_nets(&self.local_cidrs, local.ip()));
        if !local_ok || self.exclude.local_ports.contains(&local.port()) {
            return false;
        }
        match remote {
            None => !self.has_remote_criteria(),
            Some(r) => {
                (self.remote_ports.is_empty() || self.remote_ports.contains(&r.port()))
                    && (self.remote_cidrs.is_empty() || in_nets(&self.remote_cidrs, r.ip()))
                    && !self.exclude.excludes(local, r)
            }
        }
    }

    /// Process and socket criteria at once.
    pub fn selects(&self, facts: &ProcessFacts, pids_from_files: &[i32], s: &SocketFacts) -> bool {
        self.process_matches(facts, pids_from_files) && self.socket_matches(s.local, Some(s.remote))
    }

    /// The `cwreap scan` options that select what this selector does, in a stable order,
    /// each value quoted for a POSIX shell when it needs to be.
    pub fn scan_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut put = |flag: &str, value: String| {
            if value.starts_with('-') {
                // As its own word it would be taken for an option.
                out.push(format!("{flag}={}", shell_word(&value)));
            } else {
                out.push(flag.to_owned());
                out.push(shell_word(&value));
            }
        };
        for p in &self.pids {
            put("--pid", p.to_string());
        }
        for f in &self.pid_files {
            put("--pid-file", f.display().to_string());
        }
        for re in &self.comm {
            put("--comm", re.as_str().to_owned());
        }
        for re in &self.exe {
            put("--exe", re.as_str().to_owned());
        }
        for re in &self.cmdline {
            put("--cmdline", re.as_str().to_owned());
        }
        for u in &self.units {
            put("--unit", u.clone());
        }
        for c in &self.cgroups {
            put("--cgroup", c.clone());
        }
        for u in &self.uids {
            put("--uid", u.to_string());
        }
        for p in &self.local_ports {
            put("--port", p.to_string());
        }
        for n in &self.local_cidrs {
            put("--local", n.to_string());
        }
        for p in &self.remote_ports {
            put("--remote-port", p.to_string());
        }
        for n in &self.remote_cidrs {
            put("--remote", n.to_string());
        }
        for n in &self.exclude.remote_cidrs {
            put("--exclude-remote", n.to_string());
        }
        for p in &self.exclude.local_ports {
            put("--exclude-port", p.to_string());
        }
        for p in &self.exclude.remote_ports {
            put("--exclude-remote-port", p.to_string());
        }
        out
    }
}

/// `s` as one word of a POSIX shell command line.
pub fn shell_word(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// The innermost `*.service` or `*.scope` component of a cgroup path: the unit systemd
/// started the process in (`/system.slice/nginx.service` → `nginx.service`).
pub fn unit_from_cgroup(path: &str) -> Option<String> {
    path.split('/')
        .rev()
        .find(|c| is_unit_name(c))
        .map(str::to_owned)
}

pub fn is_unit_name(s: &str) -> bool {
    [".service", ".scope"]
        .iter()
        .any(|suffix| s.len() > suffix.len() && s.ends_with(suffix))
        && !s.contains('/')
}

/// The cgroup path from the contents of /proc/PID/cgroup: the v2 (`0::`) line, or, where
/// that is missing or the root (a host with only v1 hierarchies in use), the `name=systemd`
/// one, where systemd keeps the same slice/unit layout.
pub fn parse_cgroup_file(text: &str) -> Option<String> {
    let path_of = |hierarchy: fn(&str) -> Option<&str>| {
        text.lines().find_map(|line| {
            let path = hierarchy(line)?;
            // The kernel appends this when the cgroup was removed under the process.
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            path.starts_with('/').then(|| path.to_owned())
        })
    };
    let v2 = path_of(|line| line.strip_prefix("0::"));
    // A v1 host that has cgroup2 mounted somewhere (container runtimes do) shows `0::/`
    // for every process: systemd's own hierarchy then says where it put the process.
    match v2.as_deref() {
        None | Some("/") => path_of(|line| Some(line.split_once(":name=systemd:")?.1))
            .filter(|p| p != "/")
            .or(v2),
        Some(_) => v2,
    }
}

/// Whether cgroup `path` is `prefix` or below it, component by component.
pub fn cgroup_has_prefix(path: &str, prefix: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// A pid file's pid, if it holds one.
pub fn parse_pid_file(text: &str) -> Option<i32> {
    text.trim().parse::<i32>().ok().filter(|p| *p > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    fn net(s: &str) -> IpNet {
        s.parse().expect("CIDR")
    }

    fn facts() -> ProcessFacts {
        ProcessFacts {
            pid: 42,
            comm: "nginx".into(),
            exe: Some("/usr/sbin/nginx".into()),
            cmdline: Some("nginx -g daemon off;".into()),
            cgroup: Some("/system.slice/nginx.service".into()),
            uid: Some(33),
        }
    }

    #[test]
    fn kinds_and_together_values_or() {
        let f = facts();
        let s = Selector {
            comm: vec![
                Regex::new("^apache$").expect("re"),
                Regex::new("^nginx$").expect("re"),
            ],
            uids: vec![0, 33],
            ..Selector::default()
        };
        assert!(s.process_matches(&f, &[]), "one of each kind holds");
        let s = Selector {
            comm: vec![Regex::new("^nginx$").expect("re")],
            uids: vec![0],
            ..Selector::default()
        };
        assert!(!s.process_matches(&f, &[]), "the uid kind fails");
        let s = Selector {
            units: vec!["nginx.service".into()],
            cgroups: vec!["/system.slice".into()],
            exe: vec![Regex::new("/nginx$").expect("re")],
            cmdline: vec![Regex::new("daemon off").expect("re")],
            pids: vec![42],
            ..Selector::default()
        };
        assert!(s.process_matches(&f, &[]));
        let by_file = Selector {
            pid_files: vec!["/run/nginx.pid".into()],
            ..Selector::default()
        };
        assert!(by_file.process_matches(&f, &[42]));
        assert!(!by_file.process_matches(&f, &[]), "no pid read: nothing");
        assert!(Selector::default().process_matches(&f, &[]));
    }

    #[test]
    fn socket_criteria_and_mapped_addresses() {
        let s = Selector {
            remote_ports: vec![6379],
            remote_cidrs: vec![net("10.0.0.0/8")],
            ..Selector::default()
        };
        assert!(s.socket_matches(sa("127.0.0.1:40000"), Some(sa("10.1.2.3:6379"))));
        // A dual-stack socket sees an IPv4 peer as ::ffff:a.b.c.d.
        assert!(s.socket_matches(sa("[::1]:40000"), Some(sa("[::ffff:10.1.2.3]:6379"))));
        assert!(!s.socket_matches(sa("127.0.0.1:40000"), Some(sa("10.1.2.3:5432"))));
        assert!(!s.socket_matches(sa("127.0.0.1:40000"), Some(sa("192.0.2.1:6379"))));
        // An ended connection has no peer: remote criteria never match it.
        assert!(!s.socket_matches(sa("127.0.0.1:40000"), None));
        let local = Selector {
            local_ports: vec![8080],
            local_cidrs: vec![net("127.0.0.0/8")],
            ..Selector::default()
        };
        assert!(local.socket_matches(sa("127.0.0.1:8080"), None));
        assert!(local.socket_matches(sa("[::ffff:127.0.0.1]:8080"), Some(sa("[::1]:5"))));
        assert!(!local.socket_matches(sa("192.0.2.1:8080"), None));
        // A bare IP is a /32: `--remote 10.1.2.3`.
        let one = Selector {
            remote_cidrs: vec![IpNet::from("10.1.2.3".parse::<IpAddr>().expect("ip"))],
            ..Selector::default()
        };
        assert!(one.socket_matches(sa("127.0.0.1:1"), Some(sa("10.1.2.3:80"))));
        assert!(!one.socket_matches(sa("127.0.0.1:1"), Some(sa("10.1.2.4:80"))));
    }

    #[test]
    fn exclusions_win() {
        let s = Selector {
            local_ports: vec![8080],
            exclude: Exclude {
                remote_cidrs: vec![net("10.0.0.0/8")],
                local_ports: vec![],
                remote_ports: vec![5432],
            },
            ..Selector::default()
        };
        assert!(s.socket_matches(sa("127.0.0.1:8080"), Some(sa("192.0.2.1:1"))));
        assert!(!s.socket_matches(sa("127.0.0.1:8080"), Some(sa("10.9.9.9:1"))));
        assert!(!s.socket_matches(sa("127.0.0.1:8080"), Some(sa("[::ffff:10.9.9.9]:1"))));
        assert!(!s.socket_matches(sa("127.0.0.1:8080"), Some(sa("192.0.2.1:5432"))));
        let no_local = Selector {
            exclude: Exclude {
                local_ports: vec![22],
                ..Exclude::default()
            },
            ..Selector::default()
        };
        assert!(!no_local.socket_matches(sa("127.0.0.1:22"), None));
        assert!(no_local.socket_matches(sa("127.0.0.1:23"), None));
    }

    #[test]
    fn scan_args_quote_what_needs_it() {
        let s = Selector {
            comm: vec![Regex::new("^node$").expect("re")],
            cmdline: vec![Regex::new("server.js --port 3000").expect("re")],
            remote_ports: vec![6379],
            exclude: Exclude {
                remote_cidrs: vec![net("10.0.0.0/8")],
                ..Exclude::default()
            },
            ..Selector::default()
        };
        assert_eq!(
            s.scan_args().join(" "),
            "--comm '^node$' --cmdline 'server.js --port 3000' --remote-port 6379 --exclude-remote 10.0.0.0/8"
        );
        let dash = Selector {
            cmdline: vec![Regex::new("--tag api").expect("re")],
            ..Selector::default()
        };
        assert_eq!(dash.scan_args(), ["--cmdline='--tag api'"]);
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }

    /// `--unit` and `--cgroup` on /proc/PID/cgroup as the kernel writes it on a pure v2
    /// host, a v1/v2 hybrid, and a v1-only one (systemd's named hierarchy).
    #[test]
    fn unit_and_cgroup_from_proc_pid_cgroup() {
        let v2 = "0::/system.slice/nginx.service\n";
        let hybrid = "12:pids:/system.slice/nginx.service\n\
                      1:name=systemd:/system.slice/nginx.service\n\
                      0::/system.slice/nginx.service\n";
        let v1 = "4:memory:/system.slice/nginx.service\n\
                  1:name=systemd:/system.slice/nginx.service\n";
        // v1, with cgroup2 mounted by someone: the kernel adds `0::/` for every process.
        let v1_with_v2_mounted = "4:memory:/system.slice/nginx.service\n\
                  1:name=systemd:/system.slice/nginx.service\n\
                  0::/\n";
        let other = "0::/system.slice/postgresql@15-main.service\n";
        let session = "0::/user.slice/user-1000.slice/session-3.scope\n";
        let gone = "0::/system.slice/nginx.service (deleted)\n";
        let facts = |text: &str| ProcessFacts {
            pid: 7,
            comm: "nginx".into(),
            cgroup: parse_cgroup_file(text),
            ..ProcessFacts::default()
        };
        let unit = Selector {
            units: vec!["nginx.service".into()],
            ..Selector::default()
        };
        let slice = Selector {
            cgroups: vec!["/system.slice".into()],
            ..Selector::default()
        };
        for text in [v2, hybrid, v1, v1_with_v2_mounted, gone] {
            assert!(unit.process_matches(&facts(text), &[]), "{text}");
            assert!(slice.process_matches(&facts(text), &[]), "{text}");
        }
        assert!(!unit.process_matches(&facts(other), &[]));
        assert!(slice.process_matches(&facts(other), &[]));
        assert!(!unit.process_matches(&facts(session), &[]));
        assert!(!slice.process_matches(&facts(session), &[]));
        // No cgroup known (unreadable file): a unit or cgroup criterion never matches.
        assert!(!unit.process_matches(&facts(""), &[]));
        assert!(!slice.process_matches(&facts("garbage"), &[]));
        assert!(unit.needs().cgroup && slice.needs().cgroup);
        // A process at the root of both is at the root.
        assert_eq!(
            parse_cgroup_file("1:name=systemd:/\n0::/\n").as_deref(),
            Some("/")
        );
    }

    #[test]
    fn units_and_cgroups() {
        assert_eq!(
            unit_from_cgroup("/system.slice/nginx.service").as_deref(),
            Some("nginx.service")
        );
        assert_eq!(
            unit_from_cgroup("/user.slice/user-1000.slice/session-2.scope").as_deref(),
            Some("session-2.scope")
        );
        assert_eq!(unit_from_cgroup("/"), None);
        assert!(cgroup_has_prefix(
            "/system.slice/a.service",
            "/system.slice"
        ));
        assert!(!cgroup_has_prefix(
            "/system.slice2/a.service",
            "/system.slice"
        ));
        assert!(cgroup_has_prefix("/anything", "/"));
        assert_eq!(parse_pid_file("4242\n"), Some(4242));
        assert_eq!(parse_pid_file("x"), None);
        assert_eq!(parse_pid_file("-1"), None);
    }
}
