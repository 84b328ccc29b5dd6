//! `ss` (iproute2), the independent witness of what the kernel holds: one query builder and
//! one parser for every test and benchmark.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;

/// One TCP socket as `ss -tanH[p]` prints it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Socket {
    /// As ss shows it: `ESTAB`, `CLOSE-WAIT`, `LISTEN`, `TIME-WAIT`, ...
    pub state: String,
    pub recv_q: u64,
    pub send_q: u64,
    pub local: SocketAddr,
    /// None for a listener (`*`).
    pub peer: Option<SocketAddr>,
    /// (pid, fd) of each process fd that holds it (only when processes are asked for).
    pub holders: Vec<(i32, i32)>,
}

impl Socket {
    /// The fd by which `pid` holds this socket, if it does.
    pub fn fd_of(&self, pid: i32) -> Option<i32> {
        self.holders
            .iter()
            .find_map(|&(p, fd)| (p == pid).then_some(fd))
    }
}

/// `ss -t -a -n -H [-p] [state S] [sport = :P]`, perhaps inside a network namespace.
#[derive(Debug, Clone)]
pub struct Ss {
    netns: Option<String>,
    processes: bool,
    state: Option<String>,
    sport: Option<u16>,
}

impl Default for Ss {
    fn default() -> Ss {
        Ss::new()
    }
}

impl Ss {
    /// Every TCP socket of this network namespace, with the processes that hold it.
    pub fn new() -> Ss {
        Ss {
            netns: None,
            processes: true,
            state: None,
            sport: None,
        }
    }

    /// Inside network namespace `name` (`ip netns exec`).
    pub fn netns(mut self, name: &str) -> Ss {
        self.netns = Some(name.to_owned());
        self
    }

    /// Without `-p`: no holders, and no walk of every process's fd table (faster).
    pub fn without_processes(mut self) -> Ss {
        self.processes = false;
        self
    }

    /// Only sockets in `state`, as ss's filter names it (`close-wait`, `established`,
    /// `listening`, ...).
    pub fn state(mut self, state: &str) -> Ss {
        self.state = Some(state.to_owned());
        self
    }

    /// Only sockets whose local port is `port`.
    pub fn sport(mut self, port: u16) -> Ss {
        self.sport = Some(port);
        self
    }

    /// The command line.
    pub fn command(&self) -> Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "ss"]);
                c
            }
            None => Command::new("ss"),
        };
        cmd.arg(if self.processes { "-tanpH" } else { "-tanH" });
        if let Some(s) = &self.state {
            cmd.args(["state", s]);
        }
        if let Some(p) = self.sport {
            cmd.args(["sport", "=", &format!(":{p}")]);
        }
        cmd
    }

    /// Run it; a failure of ss fails the test.
    pub fn run(&self) -> Vec<Socket> {
        let mut cmd = self.command();
        let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
        assert!(out.status.success(), "{cmd:?} failed: {out:?}");
        parse(&String::from_utf8_lossy(&out.stdout), self.state.as_deref())
    }

    /// (fd, local, peer) of each socket `pid` holds, one per fd.
    pub fn held_by(&self, pid: i32) -> BTreeSet<(i32, SocketAddr, SocketAddr)> {
        let mut set = BTreeSet::new();
        for s in self.run() {
            let Some(peer) = s.peer else { continue };
            for &(p, fd) in &s.holders {
                if p == pid {
                    set.insert((fd, s.local, peer));
                }
            }
        }
        set
    }
}

/// How ss shows a state its filter names (the column is left out when one state is asked
/// for).
fn shown(filter: &str) -> String {
    match filter {
        "established" => "ESTAB".to_owned(),
        "listening" => "LISTEN".to_owned(),
        other => other.to_uppercase(),
    }
}

/// Parse `ss -tanH[p]` output; `state` is the one state filtered on, if any (ss then leaves
/// the State column out). Lines whose local address is not an address (`*:*`, a scope
/// `%lo`) are left out.
pub fn parse(text: &str, state: Option<&str>) -> Vec<Socket> {
    let mut out = Vec::new();
    for line in text.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (state, rest) = match cols.first() {
            Some(c) if c.parse::<u64>().is_ok() => (shown(state.unwrap_or("?")), &cols[..]),
            Some(c) => ((*c).to_owned(), &cols[1..]),
            None => continue,
        };
        let [recv_q, send_q, local, peer, users @ ..] = rest else {
            continue;
        };
        let (Ok(recv_q), Ok(send_q), Ok(local)) = (recv_q.parse(), send_q.parse(), local.parse())
        else {
            continue;
        };
        out.push(Socket {
            state,
            recv_q,
            send_q,
            local,
            peer: peer.parse().ok(),
            holders: holders(&users.join(" ")),
        });
    }
    out
}

/// Every `pid=P,fd=F` of a `users:((...),(...))` column.
fn holders(users: &str) -> Vec<(i32, i32)> {
    let number = |s: &str| -> Option<i32> {
        let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    users
        .split("pid=")
        .skip(1)
        .filter_map(|part| {
            let pid = number(part)?;
            let fd = number(&part[part.find(",fd=")? + 4..])?;
            Some((pid, fd))
        })
        .collect()
}

/// (fd, local, peer) of each CLOSE_WAIT socket `pid` holds, by `ss -tanpH state close-wait`.
pub fn ss_close_wait(pid: i32) -> BTreeSet<(i32, SocketAddr, SocketAddr)> {
    Ss::new().state("close-wait").held_by(pid)
}

/// Count of sockets of `pid` in `state` according to ss (e.g. "established", "listening").
pub fn ss_count(pid: i32, state: &str) -> usize {
    Ss::new()
        .state(state)
        .run()
        .iter()
        .filter(|s| s.fd_of(pid).is_some())
        .count()
}

/// CLOSE_WAIT sockets whose local port is `port`, whoever holds them, also none (an accept
/// queue; or a process whose main thread has exited, whose /proc/PID/fd is empty).
pub fn ss_close_wait_on_port(port: u16) -> usize {
    Ss::new()
        .without_processes()
        .state("close-wait")
        .sport(port)
        .run()
        .len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_with_and_without_the_state_column() {
        let one_state = "1      0      127.0.0.1:7000   127.0.0.1:51234 users:((\"cwreap-fixture\",pid=42,fd=5),(\"hold\",pid=43,fd=3))\n\
                         0      0      [::1]:7000        [::1]:40000\n";
        let got = parse(one_state, Some("close-wait"));
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].state, "CLOSE-WAIT");
        assert_eq!(got[0].recv_q, 1);
        assert_eq!(got[0].holders, [(42, 5), (43, 3)]);
        assert_eq!(got[0].fd_of(43), Some(3));
        assert_eq!(got[1].local, "[::1]:7000".parse().unwrap());
        assert!(got[1].holders.is_empty());

        let all = "LISTEN 0 128 127.0.0.1:7000 0.0.0.0:* users:((\"x\",pid=7,fd=3))\n\
                   ESTAB  0 0   127.0.0.1:7000 127.0.0.1:5000\n\
                   LISTEN 0 4096 127.0.0.53%lo:53 0.0.0.0:*\n";
        let got = parse(all, None);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            (got[0].state.as_str(), got[0].peer, got[0].send_q),
            ("LISTEN", None, 128)
        );
        assert_eq!(got[1].state, "ESTAB");
        assert_eq!(got[1].peer, Some("127.0.0.1:5000".parse().unwrap()));
        assert_eq!(parse("", Some("listening")), []);
        assert_eq!(shown("listening"), "LISTEN");
    }
}
