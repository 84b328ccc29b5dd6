//! The selectors on real processes: each one takes exactly the sockets it names, checked
//! against `ss`; a client pool's CLOSE_WAIT ends found by the remote port and reaped
//! without harm to the pool; a policy target's socket criteria; and the scan line `check`
//! prints for a target against the daemon's dry run of it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::pool::PoolPair;
use crate::support::runtimes::PYTHON;
use crate::support::*;

/// (pid, local, remote) of one CLOSE_WAIT end.
type End = (i32, SocketAddr, SocketAddr);

/// A selector's arguments and which ends it should take.
type Case<'a> = (Vec<&'a str>, Box<dyn Fn(&End) -> bool + 'a>);

/// `tests/runtimes/mixed.py`: one process holding CLOSE_WAIT ends of four kinds (server,
/// client, mapped, v6); killed on drop.
struct Mixed {
    /// mixed.py runs until its stdin closes.
    io: LineChild,
    app: u16,
    backend: u16,
    /// Each end it holds in CLOSE_WAIT, and its kind.
    kinds: BTreeMap<End, String>,
    /// fd of each end.
    fds: BTreeMap<End, i32>,
}

impl Mixed {
    /// Run mixed.py as `user` (None: as we are) with `tag` on its command line and its
    /// backend listener on `backend`.
    fn start(user: Option<u32>, tag: &str, backend: &str, pid_file: Option<&Path>) -> Mixed {
        let script = readable_script();
        let mut cmd = match user {
            Some(uid) => {
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".into(),
                    PYTHON.into(),
                ]);
                c
            }
            None => Command::new(PYTHON),
        };
        cmd.arg(script).args(["--tag", tag, "--backend", backend]);
        if let Some(f) = pid_file {
            cmd.arg("--pid-file").arg(f);
        }
        // Killed on drop from here on, also when a check below fails.
        let mut m = Mixed {
            io: LineChild::spawn(format!("mixed.py ({tag})"), &mut cmd).expect("start mixed.py"),
            app: 0,
            backend: 0,
            kinds: BTreeMap::new(),
            fds: BTreeMap::new(),
        };
        let pid = m.pid();
        loop {
            let line =
                m.io.next_line(HANG_GUARD)
                    .unwrap_or_else(|_| panic!("mixed.py ({tag}) stopped before `ready`"));
            let w: Vec<&str> = line.split_whitespace().collect();
            match w.as_slice() {
                ["app", p] => m.app = p.parse().expect("port"),
                ["backend", p] => m.backend = p.parse().expect("port"),
                ["sock", kind, fd, local, remote] => {
                    let end = (
                        pid,
                        local.parse().expect("local"),
                        remote.parse().expect("remote"),
                    );
                    m.kinds.insert(end, kind.to_string());
                    m.fds.insert(end, fd.parse().expect("fd"));
                }
                ["ready"] => break,
                _ => {}
            }
        }
        assert_eq!(m.kinds.len(), 7, "mixed.py announced {:?}", m.kinds);
        // The kernel agrees: each announced end is in CLOSE_WAIT, held by this pid.
        let held = wait_until("mixed.py's 7 CLOSE_WAIT ends in ss", String::new, || {
            let got = ends_in_ss(pid);
            (got.len() >= 7).then_some(got)
        });
        assert_eq!(held, m.kinds.keys().copied().collect(), "ss vs mixed.py");
        m
    }

    fn pid(&self) -> i32 {
        self.io.pid()
    }

    fn of_kind(&self, kind: &str) -> BTreeSet<End> {
        self.kinds
            .iter()
            .filter(|(_, k)| *k == kind)
            .map(|(e, _)| *e)
            .collect()
    }

    fn all(&self) -> BTreeSet<End> {
        self.kinds.keys().copied().collect()
    }
}

/// mixed.py where any user can read it (the checkout may be private to root), written
/// once and atomically (a temporary file renamed over it), so tests running at once never
/// see a half-written script, and one path serves every run.
fn readable_script() -> &'static Path {
    static SCRIPT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        use std::os::unix::fs::PermissionsExt;
        const TEXT: &str = include_str!("../runtimes/mixed.py");
        let path = std::env::temp_dir().join("cwreap-test-mixed.py");
        if std::fs::read_to_string(&path).is_ok_and(|t| t == TEXT) {
            return path;
        }
        let tmp = std::env::temp_dir().join(format!("cwreap-test-mixed.py.{}", std::process::id()));
        std::fs::write(&tmp, TEXT).expect("write mixed.py");
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        std::fs::rename(&tmp, &path).expect("rename mixed.py into place");
        path
    })
}

/// A file removed on drop (a pid file).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// CLOSE_WAIT ends `pid` holds, by `ss`.
fn ends_in_ss(pid: i32) -> BTreeSet<End> {
    ss_close_wait(pid)
        .into_iter()
        .map(|(_, l, r)| (pid, l, r))
        .collect()
}

/// The ends of `pids` that `cwreap scan --json ARGS` lists, each with its direction.
fn scanned(args: &[&str], pids: &[i32]) -> BTreeMap<End, String> {
    let mut full = vec!["scan", "--json"];
    full.extend_from_slice(args);
    let out = cwreap(&full);
    assert!(out.status.success(), "cwreap {full:?}: {}", stderr(&out));
    json_lines(&out)
        .iter()
        .filter_map(|v| {
            let pid = i32::try_from(v["pid"].as_i64()?).ok()?;
            pids.contains(&pid).then(|| {
                let end = (
                    pid,
                    field_str(v, "local").parse().expect("local"),
                    field_str(v, "remote").parse().expect("remote"),
                );
                (end, field_str(v, "direction").to_string())
            })
        })
        .collect()
}

/// An address as IPv4 when it is IPv4-mapped.
fn v4(addr: SocketAddr) -> IpAddr {
    addr.ip().to_canonical()
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

/// The cgroup v2 hierarchy's mount point (`/sys/fs/cgroup/unified` on a v1/v2 hybrid,
/// `/sys/fs/cgroup` on a v2 host).
fn cgroup2_mount() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        (fs.split_whitespace().next()? == "cgroup2")
            .then(|| mount.split_whitespace().nth(4).map(PathBuf::from))?
    })
}

/// A cgroup of our own on the v2 hierarchy, named like a systemd service; its processes
/// moved back to the root and the cgroup removed on drop.
struct Cgroup {
    root: PathBuf,
    dir: PathBuf,
    /// Its path as /proc/PID/cgroup shows it.
    path: String,
    unit: String,
}

impl Cgroup {
    fn create(test: &str) -> Option<Cgroup> {
        let Some(root) = cgroup2_mount() else {
            skip_or_fail(test, "no cgroup v2 hierarchy is mounted");
            return None;
        };
        let unit = format!("cwreap-selectors-{}.service", std::process::id());
        let dir = root.join(&unit);
        if let Err(e) = std::fs::create_dir(&dir) {
            skip_or_fail(
                test,
                &format!("cannot create cgroup {}: {e}", dir.display()),
            );
            return None;
        }
        Some(Cgroup {
            root,
            dir,
            path: format!("/{unit}"),
            unit,
        })
    }

    fn add(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), format!("{pid}\n")).expect("join cgroup");
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), format!("{pid}\n"));
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Three processes: `alpha` (mixed.py as root, in a cgroup of its own, with a pid file),
/// `beta` (mixed.py as nobody, another backend), and the fixture server holding one
/// server end. Every selector, alone or combined, lists exactly the ends a predicate on
/// `ss`'s view names, which is never all of them and, but for thresholds, never none.
#[test]
#[ignore = "needs root: creates a cgroup and runs a server as nobody, and its `reap` checks duplicate sockets with pidfd_getfd"]
fn each_selector_takes_exactly_its_sockets() {
    let test = "each_selector_takes_exactly_its_sockets";
    let Some(cgroup) = Cgroup::create(test) else {
        return;
    };
    let pid_file =
        TempFile(std::env::temp_dir().join(format!("cwreap-sel-{}.pid", std::process::id())));
    let pid_file = &pid_file.0;
    let alpha_tag = format!("alpha-{}", std::process::id());
    let alpha = Mixed::start(None, &alpha_tag, "127.0.0.2", Some(pid_file));
    cgroup.add(alpha.pid());
    let beta = Mixed::start(Some(65534), "beta", "127.0.0.5", None);
    let mut fixture = Fixture::start(&["127.0.0.1:0"], &[]);
    let (_client, _) = fixture.close_wait(0);
    let fx = fixture.pid();
    let fixture_ends = wait_until("the fixture's CLOSE_WAIT end", String::new, || {
        let e = ends_in_ss(fx);
        (!e.is_empty()).then_some(e)
    });
    let pids = [alpha.pid(), beta.pid(), fx];
    let truth: BTreeSet<End> = alpha
        .all()
        .into_iter()
        .chain(beta.all())
        .chain(fixture_ends.iter().copied())
        .collect();
    assert_eq!(truth.len(), 15);

    // Everything, with the right direction for each kind.
    let everything = scanned(&[], &pids);
    assert_eq!(everything.keys().copied().collect::<BTreeSet<_>>(), truth);
    for (end, dir) in &everything {
        let kind = alpha
            .kinds
            .get(end)
            .or_else(|| beta.kinds.get(end))
            .map_or("server", String::as_str);
        let want = if matches!(kind, "server" | "mapped") {
            "in"
        } else {
            "out"
        };
        assert_eq!(dir, want, "{end:?} ({kind})");
    }

    let (a, b) = (alpha.pid(), beta.pid());
    let (a_backend, b_backend) = (alpha.backend.to_string(), beta.backend.to_string());
    let (a_pid, a_app) = (a.to_string(), alpha.app.to_string());
    let pid_file_s = pid_file.to_string_lossy().into_owned();
    let alpha_cmdline = format!("--cmdline=--tag {alpha_tag}( |$)");
    let loopback4 = ip("127.0.0.1");
    let cases: Vec<Case> = vec![
        (vec!["--pid-file", &pid_file_s], Box::new(|e| e.0 == a)),
        (vec!["--uid", "nobody"], Box::new(|e| e.0 == b)),
        (vec!["--uid", "65534"], Box::new(|e| e.0 == b)),
        (vec!["--exe", "/cwreap-fixture$"], Box::new(|e| e.0 == fx)),
        (vec!["--exe", "/python3[.0-9]*$"], Box::new(|e| e.0 != fx)),
        (vec![alpha_cmdline.as_str()], Box::new(|e| e.0 == a)),
        (vec!["--cgroup", &cgroup.path], Box::new(|e| e.0 == a)),
        (vec!["--unit", &cgroup.unit], Box::new(|e| e.0 == a)),
        (vec!["--comm", "^python3$"], Box::new(|e| e.0 != fx)),
        // A pool's ends, by its backend's port or address.
        (
            vec!["--remote-port", &a_backend],
            Box::new(|e| e.0 == a && e.2.port() == alpha.backend),
        ),
        (
            vec!["--remote-port", &a_backend, "--remote-port", &b_backend],
            Box::new(|e| e.2.port() == alpha.backend || e.2.port() == beta.backend),
        ),
        (
            vec!["--remote", "127.0.0.2"],
            Box::new(|e| v4(e.2) == ip("127.0.0.2")),
        ),
        (
            vec!["--remote", "127.0.0.4/32", "--remote", "127.0.0.5"],
            Box::new(|e| v4(e.2) == ip("127.0.0.4") || v4(e.2) == ip("127.0.0.5")),
        ),
        // IPv4-mapped peers of the dual-stack listener match an IPv4 CIDR.
        (
            vec!["--remote", "127.0.0.4"],
            Box::new(|e| e.2.ip() == ip("::ffff:127.0.0.4")),
        ),
        (vec!["--remote", "::1"], Box::new(|e| e.2.ip() == ip("::1"))),
        (
            vec!["--remote", "127.0.0.0/30"],
            Box::new(|e| match v4(e.2) {
                IpAddr::V4(v) => v.octets()[..3] == [127, 0, 0] && v.octets()[3] < 4,
                IpAddr::V6(_) => false,
            }),
        ),
        (
            vec!["--local", "::1/128"],
            Box::new(|e| e.1.ip() == ip("::1")),
        ),
        (
            vec!["--local", "127.0.0.1", "--uid", "nobody"],
            Box::new(|e| e.0 == b && v4(e.1) == loopback4),
        ),
        (
            vec!["--port", &a_app],
            Box::new(|e| e.1.port() == alpha.app),
        ),
        // Kinds AND together.
        (
            vec!["--uid", "0", "--remote", "127.0.0.4"],
            Box::new(|e| e.0 == a && v4(e.2) == ip("127.0.0.4")),
        ),
        // The negatives.
        (
            vec!["--pid", &a_pid, "--exclude-remote", "127.0.0.0/8"],
            Box::new(|e| e.0 == a && !matches!(v4(e.2), IpAddr::V4(v) if v.octets()[0] == 127)),
        ),
        (
            vec!["--pid", &a_pid, "--exclude-port", &a_app],
            Box::new(|e| e.0 == a && e.1.port() != alpha.app),
        ),
        (
            vec!["--pid", &a_pid, "--exclude-remote-port", &a_backend],
            Box::new(|e| e.0 == a && e.2.port() != alpha.backend),
        ),
        // The threshold counts matching sockets per process.
        (
            vec!["--remote-port", &a_backend, "--min-close-wait", "3"],
            Box::new(|e| e.0 == a && e.2.port() == alpha.backend),
        ),
        (
            vec!["--comm", "^python3$|^cwreap-fix", "--min-close-wait", "2"],
            Box::new(|e| e.0 != fx),
        ),
    ];
    let mut failures = Vec::new();
    for (args, pred) in &cases {
        let want: BTreeSet<End> = truth.iter().filter(|e| pred(e)).copied().collect();
        assert!(
            !want.is_empty() && want.len() < truth.len(),
            "{args:?}: a case must tell sockets apart ({} of {})",
            want.len(),
            truth.len()
        );
        let got: BTreeSet<End> = scanned(args, &pids).keys().copied().collect();
        if got != want {
            failures.push(format!(
                "{args:?}: extra {:?}, missing {:?}",
                got.difference(&want).collect::<Vec<_>>(),
                want.difference(&got).collect::<Vec<_>>()
            ));
        }
    }
    // Thresholds that no process reaches select nothing.
    for args in [
        vec!["--remote-port", a_backend.as_str(), "--min-close-wait", "4"],
        vec!["--uid", "nobody", "--min-close-wait", "8"],
    ] {
        let got = scanned(&args, &pids);
        if !got.is_empty() {
            failures.push(format!("{args:?}: expected nothing, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Once `n` sockets of `pid` towards `remote`:`port` are a second old, `reap
/// --remote-port PORT --remote REMOTE --older-than 1s --json`: no --pid, the peer alone
/// selects (the loopback address keeps the host's other sockets out of it); its rows of
/// `pid`.
fn reap_once_old(port: &str, remote: &str, pid: i32, n: usize) -> Vec<serde_json::Value> {
    let pid_s = pid.to_string();
    let by_peer = [
        "--remote-port",
        port,
        "--remote",
        remote,
        "--older-than",
        "1s",
    ];
    wait_until("the sockets to be a second old", String::new, || {
        let mut args = vec!["--pid", pid_s.as_str()];
        args.extend_from_slice(&by_peer);
        (scanned(&args, &[pid]).len() == n).then_some(())
    });
    let mut args = vec!["reap"];
    args.extend_from_slice(&by_peer);
    args.push("--json");
    let out = cwreap(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    json_lines(&out)
        .into_iter()
        .filter(|v| v["pid"].as_i64() == Some(i64::from(pid)))
        .collect()
}

/// `reap` by the remote port takes exactly a pool's ends and leaves the process's other
/// CLOSE_WAIT sockets alone; ss sees the pool's ends leave CLOSE_WAIT.
#[test]
#[ignore = "needs root: cwreap duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn reap_by_remote_port_takes_only_the_pools_ends() {
    let alpha = Mixed::start(None, "reap", "127.0.0.2", None);
    let port = alpha.backend.to_string();
    let pool = alpha.of_kind("client");
    let rows = reap_once_old(&port, "127.0.0.2", alpha.pid(), pool.len());
    let reaped: BTreeSet<i32> = rows
        .iter()
        .filter(|v| v["outcome"] == "reaped")
        .map(|v| field_i64(v, "fd") as i32)
        .collect();
    let pool_fds: BTreeSet<i32> = pool.iter().map(|e| alpha.fds[e]).collect();
    assert_eq!(reaped, pool_fds, "{rows:?}");
    assert_eq!(rows.len(), pool.len(), "{rows:?}");
    let left = wait_until("the pool's ends to leave CLOSE_WAIT", String::new, || {
        let left = ends_in_ss(alpha.pid());
        left.is_disjoint(&pool).then_some(left)
    });
    let others: BTreeSet<End> = alpha.all().difference(&pool).copied().collect();
    assert_eq!(left, others, "the other ends stay in CLOSE_WAIT");
}

/// A daemon policy for targets on mixed.py processes.
fn policy(dry_run: bool, targets: &str) -> String {
    format!(
        "interval: 100ms\ndry_run: {dry_run}\nlog_format: json\nmetrics: off\n\
         audit_log: {{dir}}/audit.jsonl\ntargets:\n{targets}"
    )
}

/// Audit records of `outcome` for `pid`: their ends.
fn audited(d: &LoggedDaemon, outcome: &str, pid: i32) -> BTreeSet<End> {
    d.audit()
        .iter()
        .filter(|v| v["event"] == "action" && v["outcome"] == outcome)
        .filter(|v| v["pid"].as_i64() == Some(i64::from(pid)))
        .map(|v| {
            (
                pid,
                field_str(v, "local").parse().expect("local"),
                field_str(v, "remote").parse().expect("remote"),
            )
        })
        .collect()
}

/// A target whose match has `remote_ports` reaps its pool's ends and nothing else of the
/// process, cycle after cycle (a second target reaping fresh fixture sockets, one after
/// the other, shows the cycles going on).
#[test]
#[ignore = "needs root: the daemon duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn a_policy_target_with_remote_ports_reaps_only_those() {
    let tag = format!("policy-{}", std::process::id());
    let m = Mixed::start(None, &tag, "127.0.0.2", None);
    let pool = m.of_kind("client");
    let mut fixture = Fixture::start(&["127.0.0.1:0"], &[]);
    let fx = fixture.pid();
    let mut d = LoggedDaemon::start(
        "selectors-policy",
        &policy(
            false,
            &format!(
                "  - name: pool\n    match: {{cmdline: '--tag {tag} ', remote_ports: [{}]}}\n    \
                 older_than: 1s\n    action: shutdown\n\
                 \x20 - name: sentinel\n    match: {{pid: {fx}}}\n    older_than: 100ms\n    \
                 action: shutdown\n",
                m.backend
            ),
        ),
    );
    let reaped = d.wait_for("the pool's ends reaped", |d| {
        let r = audited(d, "reaped", m.pid());
        (r.len() >= pool.len()).then_some(r)
    });
    assert_eq!(reaped, pool, "{}", d.log());
    for i in 0..3 {
        let (mut client, _) = fixture.close_wait(0);
        d.wait_for("the sentinel's socket reaped", |d| {
            (audited(d, "reaped", fx).len() > i).then_some(())
        });
        assert!(
            reads_eof(&mut client, HANG_GUARD),
            "sentinel {i} not shut down"
        );
    }
    let others: Vec<_> = d
        .audit()
        .into_iter()
        .filter(|v| v["event"] == "action" && v["outcome"] != "reaped")
        .collect();
    assert!(others.is_empty(), "{others:?}\n{}", d.log());
    assert_eq!(audited(&d, "reaped", m.pid()), pool, "{}", d.log());
    let rest: BTreeSet<End> = m.all().difference(&pool).copied().collect();
    assert_eq!(
        ends_in_ss(m.pid()),
        rest,
        "the other ends stay in CLOSE_WAIT"
    );
}

/// Split a shell line as `check` writes it: words, 'single-quoted' words.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut in_word = false;
    for c in line.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                in_word = true;
            }
            ' ' if !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                }
                in_word = false;
            }
            _ => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

/// The scan line `check` prints for a target selects what the daemon's dry run of that
/// target audits: process and socket criteria, negatives (IPv4-mapped peers too) and the
/// threshold, which here keeps one of two processes out. A later target that may share
/// sockets with an earlier one is marked, and its line selects its own sockets plus ones
/// the earlier target's criteria take first (whether or not its threshold lets it act).
#[test]
#[ignore = "needs root: runs a server as nobody (setpriv), and the daemon's dry run proves permission with pidfd_getfd"]
fn the_scan_line_of_check_selects_what_the_dry_run_audits() {
    let tag = format!("line-{}", std::process::id());
    let a = Mixed::start(None, &format!("{tag}-a"), "127.0.0.2", None);
    let b = Mixed::start(Some(65534), &format!("{tag}-b"), "127.0.0.5", None);
    let targets = format!(
        "  - name: pools\n    match: {{cmdline: '--tag {tag}-', remote_cidrs: [127.0.0.2/31, '::1']}}\n    \
         exclude: {{local_ports: [{a_app}]}}\n    min_close_wait: 4\n    older_than: 1s\n    \
         action: shutdown\n\
         \x20 - name: nobody\n    match: {{uid: nobody, comm: '^python3$', local_cidrs: [127.0.0.1]}}\n    \
         exclude: {{remote_cidrs: [127.0.0.4]}}\n    min_close_wait: 2\n    older_than: 1s\n    \
         action: shutdown\n",
        a_app = a.app
    );
    let yaml = policy(true, &targets);
    let kinds = |m: &Mixed, ks: &[&str]| -> BTreeSet<End> {
        ks.iter().flat_map(|k| m.of_kind(k)).collect()
    };
    // By the kinds mixed.py made. `pools` selects peers 127.0.0.2 or .3 or ::1 off a's app
    // port: a's 3 client ends and its v6 one (4: enough), b's 2 server ends and its v6 one
    // (3: too few, so they are taken but not acted on). `nobody` selects b's IPv4 ends but
    // the IPv4-mapped one: its 2 server ends (taken by `pools` first) and 3 client ends.
    let first = kinds(&a, &["client", "v6"]);
    let taken_idle = kinds(&b, &["server", "v6"]);
    let second_alone = kinds(&b, &["server", "client"]);
    let second = kinds(&b, &["client"]);
    let mut d = LoggedDaemon::start("selectors-line", &yaml);
    let cfg = d.dir.join("cwreap.yaml");
    let check = cwreap(&["check", "--config", &cfg.to_string_lossy()]);
    assert!(check.status.success(), "{}", stderr(&check));
    let lines: Vec<(String, String)> = stdout(&check)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("# the same sockets"))
        .map(|l| {
            let (mark, line) = l.split_once("cwreap scan ").expect("a scan line");
            (mark.to_string(), line.to_string())
        })
        .collect();
    assert_eq!(lines.len(), 2, "{}", stdout(&check));
    assert_eq!(lines[0].0, ": ", "{}", stdout(&check));
    assert!(
        lines[1].0.contains("`pools` takes first"),
        "{}",
        stdout(&check)
    );
    let pids = [a.pid(), b.pid()];
    let dry = d.wait_for("both targets' dry runs", |d| {
        let by_target = |t: &str| -> BTreeSet<End> {
            d.audit()
                .iter()
                .filter(|v| v["outcome"] == "dry_run" && v["target"] == t)
                .map(|v| {
                    (
                        field_i64(v, "pid") as i32,
                        field_str(v, "local").parse().expect("local"),
                        field_str(v, "remote").parse().expect("remote"),
                    )
                })
                .filter(|e| pids.contains(&e.0))
                .collect()
        };
        let got = [by_target("pools"), by_target("nobody")];
        (got[0].is_superset(&first) && got[1].is_superset(&second)).then_some(got)
    });
    assert_eq!(dry[0], first, "target pools: dry run vs ss\n{}", d.log());
    assert_eq!(dry[1], second, "target nobody: dry run vs ss\n{}", d.log());
    let scan = |line: &str| -> BTreeSet<End> {
        let words = shell_words(line);
        let args: Vec<&str> = words.iter().map(String::as_str).collect();
        scanned(&args, &pids).into_keys().collect()
    };
    assert_eq!(scan(&lines[0].1), dry[0], "`cwreap scan {}`", lines[0].1);
    // The first line without its threshold: every socket `pools` takes.
    let unthresholded = lines[0].1.replace(" --min-close-wait 4", "");
    assert_ne!(unthresholded, lines[0].1, "the threshold is on the line");
    let taken = scan(&unthresholded);
    assert_eq!(
        taken,
        first.union(&taken_idle).copied().collect(),
        "`cwreap scan {unthresholded}`"
    );
    let alone = scan(&lines[1].1);
    assert_eq!(alone, second_alone, "`cwreap scan {}`", lines[1].1);
    let less_first: BTreeSet<End> = alone.difference(&taken).copied().collect();
    assert_eq!(
        less_first, dry[1],
        "`cwreap scan {}` less what `pools` takes",
        lines[1].1
    );
}

/// A urllib3 keep-alive pool of 30 connections to a server that closes idle ones: its
/// CLOSE_WAIT ends are found by the server's port as the remote port (exactly what ss
/// shows, all `out`), reaped with shutdown, and the pool's next 40 requests all succeed,
/// each answered with its own path.
#[test]
#[ignore = "needs root: cwreap duplicates the fixture's sockets with pidfd_getfd (CAP_SYS_PTRACE)"]
fn a_urllib3_pools_ends_are_found_by_remote_port_and_reaped_without_harm() {
    let test = "a_urllib3_pools_ends_are_found_by_remote_port_and_reaped_without_harm";
    const CONNS: usize = 30;
    let Some(mut p) = PoolPair::start(test, CONNS) else {
        return;
    };
    p.send(&format!("fill {CONNS}"));
    let said = p.expect("filled");
    assert_eq!(said.len(), 1, "fill failed: {said:?}");
    let pid = p.pid();
    // The server closes each after a second idle: the pool's ends go to CLOSE_WAIT.
    let ends = wait_until("30 pooled ends in CLOSE_WAIT", String::new, || {
        let e = ends_in_ss(pid);
        (e.len() >= CONNS).then_some(e)
    });
    assert_eq!(ends.len(), CONNS);
    let port = p.port.to_string();
    // By the local port (the server's) there is nothing of the client's.
    assert!(scanned(&["--port", &port], &[pid]).is_empty());
    let found = scanned(&["--remote-port", &port], &[pid]);
    assert_eq!(found.keys().copied().collect::<BTreeSet<_>>(), ends);
    assert!(found.values().all(|d| d == "out"), "{found:?}");

    let rows = reap_once_old(&port, "127.0.0.1", pid, CONNS);
    let reaped = rows.iter().filter(|v| v["outcome"] == "reaped").count();
    assert_eq!(reaped, CONNS, "{rows:?}");
    let left = wait_until("no pooled end in CLOSE_WAIT", String::new, || {
        let left = ends_in_ss(pid);
        left.is_empty().then_some(left)
    });
    assert!(left.is_empty());

    // The pool notices each dead connection on its next use and opens a new one.
    p.send("request 40");
    let said = p.expect("done");
    let ok = said.iter().filter(|l| l.starts_with("ok ")).count();
    assert_eq!(ok, 40, "{said:?}");
    assert_eq!(said.len(), 41, "{said:?}");
}
