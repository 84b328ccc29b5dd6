//! Network namespaces of a test's own (`ip netns`).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::process::Command;

use crate::leaky::Clients;
use crate::programs::{fixture_bin, run_ok};
use crate::ss::Ss;

/// A network namespace of our own (`ip netns add`), deleted on drop even when a test fails.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Run `f` on a thread that entered this namespace (setns): the sockets it creates live
    /// there, and /proc/sys/net is the namespace's.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("open the namespace's file");
            rustix::thread::move_into_link_name_space(
                std::os::fd::AsFd::as_fd(&file),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .expect("setns into the test's namespace");
            f()
        })
        .join()
        .expect("the thread in the namespace")
    }

    pub fn create(tag: &str) -> Netns {
        let name = format!("cwreap-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Netns { name };
        run_ok(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        ns
    }

    /// `ss` inside the namespace.
    pub fn ss(&self) -> Ss {
        Ss::new().netns(&self.name)
    }

    /// (fd, local, peer) of the CLOSE_WAIT sockets of `pid` inside the namespace, by `ss`.
    pub fn ss_close_wait(&self, pid: i32) -> BTreeSet<(i32, SocketAddr, SocketAddr)> {
        self.ss().state("close-wait").held_by(pid)
    }

    /// Half-closing clients inside the namespace: a `cwreap-fixture client` process.
    pub fn clients(&self, addr: SocketAddr, count: usize) -> Clients {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(fixture_bin());
        Clients::start(cmd, addr, count)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Inode of the network namespace of `pid` ("self" for us).
pub fn netns_of(pid: &str) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("ns/net")
        .ino()
}
