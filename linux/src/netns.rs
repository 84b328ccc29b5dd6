//! Discovery across network namespaces: one sock_diag socket per distinct
//! /proc/<pid>/ns/net among the processes of interest, kept open for later lookups and
//! SOCK_DESTROY in the same namespace (it is the real [`Destroy`]).
//!
//! A socket that saw any error (a failed or cut dump, a timeout, a kernel error) is never
//! used again: it is replaced at once by a fresh socket of the same namespace, so whatever
//! the kernel had still queued for it is dropped with it. When no fresh one can be made,
//! the namespace is left uncovered until the next [`Namespaces::cover`].

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::kernel::Destroy;
use crate::netlink::{Diag, DiagSocket, DumpError};
use crate::procfs::ProcFs;

/// The sock_diag sockets, one per network namespace, by namespace inode.
#[derive(Default)]
pub struct Namespaces {
    diags: BTreeMap<u64, Diag>,
    /// A /proc/PID/ns/net path for each namespace entered, to enter it again.
    paths: BTreeMap<u64, PathBuf>,
    /// Namespaces we could not enter or dump, with why.
    pub failures: Vec<(u64, String)>,
}

/// What one discovery pass found.
#[derive(Debug, Default)]
pub struct Found {
    pub close_wait: Vec<DiagSocket>,
    /// LISTEN sockets of the namespaces that have CLOSE_WAIT sockets without a file (inode
    /// 0, still in an accept queue), to find their listener.
    pub listeners: Vec<DiagSocket>,
}

impl Namespaces {
    /// Our own namespace only.
    pub fn own() -> io::Result<Self> {
        let d = Diag::new()?;
        let mut diags = BTreeMap::new();
        diags.insert(d.netns(), d);
        Ok(Self {
            diags,
            paths: BTreeMap::new(),
            failures: Vec::new(),
        })
    }

    /// Make sure there is a socket for the namespace of each of `pids` (unreadable or
    /// vanished processes are skipped). Our own namespace is included when `own`.
    pub fn cover(&mut self, proc: &ProcFs, pids: &[i32], own: bool) {
        let own_ino = crate::netlink::netns_inode(std::path::Path::new("/proc/self/ns/net")).ok();
        if own && own_ino.is_none_or(|i| !self.diags.contains_key(&i)) {
            match Diag::new() {
                Ok(d) => {
                    self.diags.insert(d.netns(), d);
                }
                Err(e) => self.failures.push((own_ino.unwrap_or(0), e.to_string())),
            }
        }
        let mut wanted: BTreeMap<u64, PathBuf> = BTreeMap::new();
        for &pid in pids {
            let path = proc.netns_path(pid);
            if let Ok(meta) = std::fs::metadata(&path) {
                wanted.entry(meta.ino()).or_insert(path);
            }
        }
        for (ino, path) in wanted {
            if self.diags.contains_key(&ino) || self.failures.iter().any(|(f, _)| *f == ino) {
                continue;
            }
            match Diag::in_netns(&path) {
                Ok(d) => {
                    self.diags.insert(ino, d);
                    self.paths.insert(ino, path);
                }
                Err(e) => {
                    let why = if e.raw_os_error() == Some(libc::EPERM) {
                        format!(
                            "cannot enter network namespace via {} (setns needs CAP_SYS_ADMIN): {e}",
                            path.display()
                        )
                    } else {
                        format!("cannot enter network namespace via {}: {e}", path.display())
                    };
                    self.failures.push((ino, why));
                }
            }
        }
    }

    /// Use `d` for its network namespace from now on, instead of a socket of our own. A
    /// seam for tests (see `Diag::over`); [`Namespaces::cover`] keeps it.
    #[cfg(test)]
    pub fn insert(&mut self, d: Diag) {
        self.diags.insert(d.netns(), d);
    }

    /// Forget namespaces none of `pids` lives in any more (the daemon, between cycles).
    pub fn retain(&mut self, keep: impl Fn(u64) -> bool) {
        self.diags.retain(|ino, _| keep(*ino));
        self.failures.retain(|(ino, _)| keep(*ino));
    }

    pub fn get_mut(&mut self, netns: u64) -> Option<&mut Diag> {
        self.diags.get_mut(&netns)
    }

    pub fn inodes(&self) -> impl Iterator<Item = u64> + '_ {
        self.diags.keys().copied()
    }

    /// Dump every covered namespace. A namespace that fails is recorded and skipped, and
    /// its socket replaced (see the module notes).
    pub fn dump(&mut self) -> Result<Found, DumpError> {
        self.dump_with(false)
    }

    /// The inodes of every socket of kind `listed` in every covered namespace. A namespace
    /// that fails is recorded and skipped, its socket replaced, as for a dump.
    pub fn live_inodes(
        &mut self,
        listed: crate::netlink::Listed,
    ) -> Result<std::collections::HashSet<u64>, DumpError> {
        let mut out = std::collections::HashSet::new();
        let mut broken = Vec::new();
        let mut last_err = None;
        let mut ok = 0usize;
        for (ino, d) in self.diags.iter_mut() {
            match d.inodes(listed) {
                Ok(v) => {
                    ok += 1;
                    out.extend(v);
                }
                Err(e) => {
                    self.failures.push((*ino, e.to_string()));
                    broken.push(*ino);
                    last_err = Some(e);
                }
            }
        }
        for ino in broken {
            self.renew(ino);
        }
        match last_err {
            Some(e) if ok == 0 => Err(e),
            _ => Ok(out),
        }
    }

    /// [`Namespaces::dump`], with the LISTEN sockets of every namespace that has CLOSE_WAIT
    /// ones (not only of those with sockets still in an accept queue): the command line
    /// tells a server's end of a connection from a client's by them.
    pub fn dump_with_listeners(&mut self) -> Result<Found, DumpError> {
        self.dump_with(true)
    }

    fn dump_with(&mut self, all_listeners: bool) -> Result<Found, DumpError> {
        let mut found = Found::default();
        let mut dumped = 0usize;
        let mut last_err = None;
        let mut broken = Vec::new();
        for (ino, d) in self.diags.iter_mut() {
            match d.close_wait() {
                Ok(cw) => {
                    dumped += 1;
                    let wanted = if all_listeners {
                        !cw.is_empty()
                    } else {
                        cw.iter().any(|s| s.inode == 0)
                    };
                    if wanted {
                        match d.listeners() {
                            Ok(l) => found.listeners.extend(l),
                            Err(e) => {
                                self.failures.push((*ino, e.to_string()));
                                broken.push(*ino);
                            }
                        }
                    }
                    found.close_wait.extend(cw);
                }
                Err(e) => {
                    self.failures.push((*ino, e.to_string()));
                    broken.push(*ino);
                    last_err = Some(e);
                }
            }
        }
        for ino in broken {
            self.renew(ino);
        }
        match (dumped, last_err) {
            (0, Some(e)) => Err(e),
            _ => Ok(found),
        }
    }

    /// Replace the socket of `netns` with a fresh one after an error; drop it when none can
    /// be made (the next [`Namespaces::cover`] tries again).
    fn renew(&mut self, netns: u64) {
        let Some(old) = self.diags.remove(&netns) else {
            return;
        };
        if let Ok(fresh) = old.reopen() {
            self.diags.insert(netns, fresh);
        }
    }

    /// Run `op` on the socket of `s`'s namespace, renewing that socket if it fails.
    fn with_diag<T>(
        &mut self,
        s: &DiagSocket,
        op: impl FnOnce(&mut Diag, &DiagSocket) -> Result<T, DumpError>,
    ) -> io::Result<T> {
        let d = self.get_mut(s.netns).ok_or_else(|| {
            io::Error::other(format!(
                "no sock_diag socket for network namespace {}",
                s.netns
            ))
        })?;
        let res = op(d, s);
        if res.is_err() {
            self.renew(s.netns);
        }
        res.map_err(to_io)
    }
}

fn to_io(e: DumpError) -> io::Error {
    match e {
        DumpError::Io(e) | DumpError::Kernel(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl Destroy for Namespaces {
    fn lookup(&mut self, s: &DiagSocket) -> io::Result<Option<DiagSocket>> {
        self.with_diag(s, Diag::lookup)
    }

    fn destroy(&mut self, s: &DiagSocket) -> io::Result<()> {
        self.with_diag(s, Diag::destroy)
    }

    fn prove_destroy(&mut self, netns: u64) -> io::Result<()> {
        Namespaces::prove_destroy(self, netns)
    }
}

impl Namespaces {
    /// Prove that SOCK_DESTROY works in namespace `netns` by destroying a loopback
    /// connection of our own made there for the purpose. A made-up 4-tuple proves nothing:
    /// the kernel looks the socket up before it checks CAP_NET_ADMIN, so it answers ENOENT
    /// whatever the privileges. EPERM here means CAP_NET_ADMIN is missing; EOPNOTSUPP that
    /// the kernel has no SOCK_DESTROY.
    pub fn prove_destroy(&mut self, netns: u64) -> io::Result<()> {
        let own = crate::netlink::netns_inode(std::path::Path::new("/proc/self/ns/net")).ok();
        let path = self
            .paths
            .get(&netns)
            .cloned()
            .filter(|_| own != Some(netns));
        let (client, _server, _listener) = match path {
            Some(p) => in_netns(&p, loopback_pair)??,
            None => loopback_pair()?,
        };
        let probe = DiagSocket {
            netns,
            local: client.local_addr()?,
            remote: client.peer_addr()?,
            inode: 0,
            uid: 0,
            cookie: crate::sys::socket_cookie(std::os::fd::AsFd::as_fd(&client))?,
            state: 0,
            recv_q: 0,
            send_q: 0,
            last_ack_recv_ms: None,
            last_data_recv_ms: None,
            keepalive: false,
        };
        self.destroy(&probe)
    }
}

type Pair = (
    std::net::TcpStream,
    std::net::TcpStream,
    std::net::TcpListener,
);

/// A connected loopback pair in the current network namespace: (client, server, listener).
fn loopback_pair() -> io::Result<Pair> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    Ok((client, server, listener))
}

/// Run `f` on a short-lived thread that joined the network namespace at `path`.
fn in_netns<T: Send>(path: &std::path::Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let file = std::fs::File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                crate::sys::join_netns(std::os::fd::AsFd::as_fd(&file))?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    /// A fake kernel that ends the first dump it is asked for with an error in NLMSG_DONE,
    /// then sends what a confused kernel might still have queued.
    fn failing_kernel() -> (UnixDatagram, std::thread::JoinHandle<()>) {
        let (ours, theirs) = UnixDatagram::pair().expect("socketpair");
        let thread = std::thread::spawn(move || {
            let _ = theirs.set_read_timeout(Some(Duration::from_secs(10)));
            let mut buf = [0u8; 4096];
            let Ok(n) = theirs.recv(&mut buf) else { return };
            if n < 16 {
                return;
            }
            let seq = [buf[8], buf[9], buf[10], buf[11]]; // nlmsg_seq of the request
            let mut done = Vec::new();
            done.extend_from_slice(&20u32.to_ne_bytes()); // nlmsg_len
            done.extend_from_slice(&3u16.to_ne_bytes()); // nlmsg_type: NLMSG_DONE
            done.extend_from_slice(&2u16.to_ne_bytes()); // nlmsg_flags: NLM_F_MULTI
            done.extend_from_slice(&seq); // nlmsg_seq
            done.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the fake's port id
            done.extend_from_slice(&(-libc::EIO).to_ne_bytes()); // the dump's status
            let _ = theirs.send(&done);
            let _ = theirs.send(&done); // a leftover
        });
        (ours, thread)
    }

    #[test]
    fn a_namespace_whose_dump_fails_is_recorded_and_its_socket_not_reused() {
        let mut ns = Namespaces::own().expect("own namespace");
        let own: Vec<u64> = ns.inodes().collect();
        let (wire, kernel) = failing_kernel();
        ns.insert(Diag::over(wire, 77));
        let found = ns.dump().expect("the healthy namespace still dumps");
        assert!(found.close_wait.iter().all(|s| s.netns != 77));
        assert_eq!(ns.failures.len(), 1, "{:?}", ns.failures);
        assert_eq!(ns.failures[0].0, 77);
        assert!(ns.failures[0].1.contains("error"), "{:?}", ns.failures);
        // A fake cannot be reopened: the namespace is dropped, never dumped again through
        // the socket that still holds the leftover.
        assert!(ns.get_mut(77).is_none());
        assert_eq!(ns.inodes().collect::<Vec<_>>(), own);
        let _ = kernel.join();
        // Only failing namespaces: the dump itself fails.
        let mut lone = Namespaces::default();
        let (wire, kernel) = failing_kernel();
        lone.insert(Diag::over(wire, 78));
        assert!(
            matches!(lone.dump(), Err(DumpError::Kernel(e)) if e.raw_os_error() == Some(libc::EIO))
        );
        assert!(lone.get_mut(78).is_none());
        let _ = kernel.join();
    }
}
