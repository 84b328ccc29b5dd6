//! The effective policy for `cwreap check`: every default made explicit, one block per
//! target. The text is itself a valid policy with the same meaning.

use std::time::Duration;

use super::model::*;

pub(super) fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub(super) fn duration_text(d: Duration) -> String {
    quote(&humantime::format_duration(d).to_string())
}

pub(super) fn cidr_list(nets: &[ipnet::IpNet]) -> String {
    let items: Vec<String> = nets.iter().map(|n| quote(&n.to_string())).collect();
    format!("[{}]", items.join(", "))
}

fn port_list(ports: &[u16]) -> String {
    let items: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("[{}]", items.join(", "))
}

impl Target {
    /// The `cwreap scan` command line that lists the sockets this target would act on
    /// now: its selector, `older_than` and `min_close_wait`.
    pub fn scan_line(&self) -> String {
        let mut words = vec!["cwreap".to_owned(), "scan".to_owned()];
        words.extend(self.selector.scan_args());
        words.push("--older-than".to_owned());
        words.push(
            humantime::format_duration(self.older_than)
                .to_string()
                .replace(' ', ""),
        );
        if self.min_close_wait > 1 {
            words.push("--min-close-wait".to_owned());
            words.push(self.min_close_wait.to_string());
        }
        words.join(" ")
    }
}

impl Config {
    /// The names of the first `shown` targets, comma-separated, and how many more there
    /// are: a start-up log line stays one short line with a thousand targets.
    pub fn target_names(&self, shown: usize) -> String {
        let names: Vec<&str> = self
            .targets
            .iter()
            .take(shown)
            .map(|t| t.name.as_str())
            .collect();
        let more = self.targets.len().saturating_sub(shown);
        if more == 0 {
            names.join(",")
        } else {
            format!("{} and {more} more", names.join(","))
        }
    }

    /// The effective policy for `cwreap check`: every default made explicit, one block per
    /// target. The text is itself a valid policy with the same meaning.
    pub fn describe(&self) -> String {
        let mut l: Vec<String> = Vec::new();
        l.push(format!("interval: {}", duration_text(self.interval)));
        l.push(format!("dry_run: {}", self.dry_run));
        l.push(format!("log_format: {}", self.log_format.as_str()));
        match &self.audit_log {
            Some(p) => l.push(format!("audit_log: {}", quote(&p.display().to_string()))),
            None => l.push("# audit_log: none".to_owned()),
        }
        l.push(format!(
            "on_audit_failure: {}",
            self.on_audit_failure.as_str()
        ));
        l.push(format!("discovery: {}", self.discovery.as_str()));
        l.push(format!(
            "where: {}",
            if self.where_stacks { "on" } else { "off" }
        ));
        match self.still_held_after {
            Some(d) => l.push(format!("still_held_after: {}", duration_text(d))),
            None => l.push(format!(
                "# still_held_after: {} (3 intervals or 30s, whichever is longer)",
                duration_text(self.still_held_window())
            )),
        }
        l.push("limits:".to_owned());
        l.push(format!(
            "  max_reaps_per_cycle: {}",
            self.limits.max_reaps_per_cycle
        ));
        l.push(format!(
            "  max_reaps_per_minute: {}",
            self.limits.max_reaps_per_minute
        ));
        l.push(format!(
            "  max_escalations_per_minute: {}",
            self.limits.max_escalations_per_minute
        ));
        l.push("metrics:".to_owned());
        match self.metrics.listen {
            Some(a) => l.push(format!("  listen: {}", quote(&a.to_string()))),
            None => l.push("  listen: \"off\"".to_owned()),
        }
        l.push("targets:".to_owned());
        let shadowed = self.shadowed();
        for (i, t) in self.targets.iter().enumerate() {
            l.push(format!("  - name: {}", quote(&t.name)));
            if let Some(s) = shadowed.iter().find(|s| s.target == i) {
                l.push(format!("    # WARNING: {}", self.shadow_message(*s)));
            }
            let first = self.may_take_first(i);
            let mark = if shadowed.iter().any(|s| s.target == i) {
                "shadowed; an earlier target takes these first".to_owned()
            } else if first.is_empty() {
                "the same sockets".to_owned()
            } else {
                let names: Vec<String> = first
                    .iter()
                    .map(|&j| format!("`{}`", self.targets[j].name))
                    .collect();
                format!(
                    "the same sockets, minus any {} takes first",
                    names.join(" or ")
                )
            };
            l.push(format!("    # {mark}: {}", t.scan_line()));
            l.push("    match:".to_owned());
            let m = &t.selector;
            // A policy target holds at most one value of each process criterion.
            for pid in &m.pids {
                l.push(format!("      pid: {pid}"));
            }
            for p in &m.pid_files {
                l.push(format!(
                    "      pid_file: {}",
                    quote(&p.display().to_string())
                ));
            }
            for (k, res) in [("comm", &m.comm), ("exe", &m.exe), ("cmdline", &m.cmdline)] {
                for re in res {
                    l.push(format!("      {k}: {}", quote(re.as_str())));
                }
            }
            for u in &m.units {
                l.push(format!("      systemd_unit: {}", quote(u)));
            }
            for c in &m.cgroups {
                l.push(format!("      cgroup: {}", quote(c)));
            }
            for uid in &m.uids {
                l.push(format!("      uid: {uid}"));
            }
            for (k, ports) in [
                ("local_ports", &m.local_ports),
                ("remote_ports", &m.remote_ports),
            ] {
                if ports.is_empty() {
                    l.push(format!("      # {k}: any"));
                } else {
                    l.push(format!("      {k}: {}", port_list(ports)));
                }
            }
            for (k, nets) in [
                ("local_cidrs", &m.local_cidrs),
                ("remote_cidrs", &m.remote_cidrs),
            ] {
                if nets.is_empty() {
                    l.push(format!("      # {k}: any"));
                } else {
                    l.push(format!("      {k}: {}", cidr_list(nets)));
                }
            }
            l.push(format!("    older_than: {}", duration_text(t.older_than)));
            l.push(format!("    min_close_wait: {}", t.min_close_wait));
            l.push("    exclude:".to_owned());
            l.push(format!(
                "      remote_cidrs: {}",
                cidr_list(&m.exclude.remote_cidrs)
            ));
            l.push(format!(
                "      local_ports: {}",
                port_list(&m.exclude.local_ports)
            ));
            l.push(format!(
                "      remote_ports: {}",
                port_list(&m.exclude.remote_ports)
            ));
            l.push(format!("    action: {}", t.action.as_str()));
            match t.dry_run {
                Some(d) => l.push(format!("    dry_run: {d}")),
                None => l.push(format!(
                    "    # dry_run: {} (the global setting)",
                    self.dry_run
                )),
            }
            let e = t.escalate;
            if e.any() {
                l.push("    escalate:".to_owned());
                if let Some(p) = e.raise_fd_limit_at {
                    l.push(format!("      raise_fd_limit_at: \"{p}%\""));
                    l.push(format!("      # {RAISE_FD_LIMIT_TEXT}"));
                }
                if let Some(d) = e.raise_before_emfile {
                    l.push(format!("      raise_before_emfile: {}", duration_text(d)));
                }
                if let Some(p) = e.signal_at {
                    l.push(format!("      signal_at: \"{p}%\""));
                }
                if let Some(d) = e.signal_before_emfile {
                    l.push(format!("      signal_before_emfile: {}", duration_text(d)));
                }
                if e.signals() {
                    l.push(format!("      signal: {}", e.signal.name()));
                    l.push(format!("      # {SIGNAL_TEXT}"));
                }
                l.push(format!("      # {BEFORE_EMFILE_TEXT}"));
            }
        }
        let mut out = l.join("\n");
        out.push('\n');
        out
    }
}
