//! Discovery across network namespaces: one sock_diag socket per distinct
//! /proc/<pid>/ns/net among the processes of interest, kept open for later lookups and
//! SOCK_DESTROY in the same namespace (it is the real [`SocketKiller`]).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use crate::netlink::{Diag, DiagSocket, DumpError};
use crate::os::SocketKiller;
use crate::procfs::ProcFs;

/// The sock_diag sockets, one per network namespace, by namespace inode.
#[derive(Default)]
pub struct Namespaces {
    diags: BTreeMap<u64, Diag>,
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
            let path = proc.root().join(pid.to_string()).join("ns/net");
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
    #[cfg(feature = "testing")]
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

    /// Dump every covered namespace. A namespace that fails is recorded and skipped.
    pub fn dump(&mut self) -> Result<Found, DumpError> {
        let mut found = Found::default();
        let mut dumped = 0usize;
        let mut last_err = None;
        for (ino, d) in self.diags.iter_mut() {
            match d.close_wait() {
                Ok(cw) => {
                    dumped += 1;
                    if cw.iter().any(|s| s.inode == 0) {
                        match d.listeners() {
                            Ok(l) => found.listeners.extend(l),
                            Err(e) => self.failures.push((*ino, e.to_string())),
                        }
                    }
                    found.close_wait.extend(cw);
                }
                Err(e) => {
                    self.failures.push((*ino, e.to_string()));
                    last_err = Some(e);
                }
            }
        }
        match (dumped, last_err) {
            (0, Some(e)) => Err(e),
            _ => Ok(found),
        }
    }
}

fn to_io(e: DumpError) -> io::Error {
    match e {
        DumpError::Io(e) | DumpError::Kernel(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

impl SocketKiller for Namespaces {
    fn lookup(&mut self, s: &DiagSocket) -> io::Result<Option<DiagSocket>> {
        let d = self.get_mut(s.netns).ok_or_else(|| {
            io::Error::other(format!(
                "no sock_diag socket for network namespace {}",
                s.netns
            ))
        })?;
        d.lookup(s).map_err(to_io)
    }

    fn destroy(&mut self, s: &DiagSocket) -> io::Result<()> {
        let d = self.get_mut(s.netns).ok_or_else(|| {
            io::Error::other(format!(
                "no sock_diag socket for network namespace {}",
                s.netns
            ))
        })?;
        d.destroy(s).map_err(to_io)
    }
}
