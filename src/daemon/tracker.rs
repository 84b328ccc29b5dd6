//! The CLOSE_WAIT sockets of the watched namespaces, kept from one cycle to the next from
//! what discovery reports (a snapshot, then the changes), each with when the daemon first
//! saw it in CLOSE_WAIT.

use std::collections::HashMap;

use cwreap_linux::kernel::{Boottime, Changes, SocketKey, key_of};
use cwreap_linux::netlink::DiagSocket;
use cwreap_linux::netns::Found;

struct Tracked {
    diag: DiagSocket,
    first_seen: Boottime,
    /// The observation it first appeared at.
    since: u64,
}

/// The sockets in CLOSE_WAIT now, as far as the last discovery told.
#[derive(Default)]
pub struct Tracker {
    sockets: HashMap<SocketKey, Tracked>,
    listeners: Vec<DiagSocket>,
    /// Observations so far (snapshots and changes applied).
    observed: u64,
    /// The last observation changed something (a snapshot always counts as one).
    changed: bool,
    /// Changes applied between observations changed something: the next one has.
    between: bool,
}

impl Tracker {
    /// Take a full view: sockets not in it are gone; those still there keep their first
    /// sight. Returns the sockets that left, as last seen.
    pub fn reset(&mut self, found: Found, now: Boottime) -> Vec<DiagSocket> {
        self.observed += 1;
        self.changed = true;
        self.between = false;
        let mut next = HashMap::with_capacity(found.close_wait.len());
        for diag in found.close_wait {
            let key = key_of(&diag);
            let (first_seen, since) = self
                .sockets
                .remove(&key)
                .map_or((now, self.observed), |t| (t.first_seen, t.since));
            next.insert(
                key,
                Tracked {
                    diag,
                    first_seen,
                    since,
                },
            );
        }
        let left = self.sockets.drain().map(|(_, t)| t.diag).collect();
        self.sockets = next;
        self.listeners = found.listeners;
        left
    }

    /// Apply what changed since the last observation. Returns the sockets that left
    /// CLOSE_WAIT, as last seen.
    pub fn apply(&mut self, changes: Changes, now: Boottime) -> Vec<DiagSocket> {
        self.observed += 1;
        let (changed, left, _) = self.merge(changes, now, self.observed);
        self.changed = changed || std::mem::take(&mut self.between);
        left
    }

    /// Apply changes read between two observations (the events, as they come): they count
    /// as part of the next observation, which finds them arrived and changed. Returns the
    /// sockets that entered and those that left CLOSE_WAIT.
    pub fn apply_between(
        &mut self,
        changes: Changes,
        now: Boottime,
    ) -> (Vec<DiagSocket>, Vec<DiagSocket>) {
        let (changed, left, entered) = self.merge(changes, now, self.observed + 1);
        self.between |= changed;
        (entered, left)
    }

    /// Apply `changes` as observation `since`: whether anything changed, what left, and
    /// what is newly tracked.
    fn merge(
        &mut self,
        changes: Changes,
        now: Boottime,
        since: u64,
    ) -> (bool, Vec<DiagSocket>, Vec<DiagSocket>) {
        let mut changed = changes.listeners != self.listeners;
        let mut left = Vec::new();
        let mut entered = Vec::new();
        for key in changes.left.iter().chain(changes.ended.iter()) {
            if let Some(t) = self.sockets.remove(key) {
                left.push(t.diag);
            }
        }
        changed |= !left.is_empty();
        for diag in changes.refreshed.into_iter().chain(changes.entered) {
            match self.sockets.get_mut(&key_of(&diag)) {
                Some(t) if t.diag == diag => {}
                Some(t) => {
                    t.diag = diag;
                    changed = true;
                }
                None => {
                    changed = true;
                    entered.push(diag.clone());
                    self.sockets.insert(
                        key_of(&diag),
                        Tracked {
                            diag,
                            first_seen: now,
                            since,
                        },
                    );
                }
            }
        }
        self.listeners = changes.listeners;
        (changed, left, entered)
    }

    /// The sockets and listeners as one discovery pass, for attribution.
    pub fn found(&self) -> Found {
        let mut close_wait: Vec<DiagSocket> =
            self.sockets.values().map(|t| t.diag.clone()).collect();
        close_wait.sort_unstable_by_key(key_of);
        Found {
            close_wait,
            listeners: self.listeners.clone(),
        }
    }

    /// Whether the last observation changed any socket or listener.
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// When each tracked socket was first seen, for the command line to age sockets as the
    /// daemon does.
    pub fn first_sights(&self) -> Vec<(SocketKey, Boottime)> {
        self.sockets
            .iter()
            .map(|(k, t)| (*k, t.first_seen))
            .collect()
    }

    pub fn first_seen(&self, key: &SocketKey) -> Option<Boottime> {
        self.sockets.get(key).map(|t| t.first_seen)
    }

    /// Whether the socket appeared at the last observation, and not at the first one,
    /// which finds what was there already.
    pub fn arrived(&self, key: &SocketKey) -> bool {
        // An observation that changed nothing brought nothing new.
        self.observed > 1
            && self.changed
            && self
                .sockets
                .get(key)
                .is_some_and(|t| t.since == self.observed)
    }

    /// The inode of a tracked socket (0 while it waits in an accept queue).
    pub fn inode(&self, key: &SocketKey) -> Option<u64> {
        self.sockets.get(key).map(|t| t.diag.inode)
    }

    /// Whether the socket is in CLOSE_WAIT as of the last observation.
    pub fn tracks(&self, key: &SocketKey) -> bool {
        self.sockets.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.sockets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sockets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn sock(cookie: u64) -> DiagSocket {
        DiagSocket {
            netns: 1,
            local: "127.0.0.1:80".parse().expect("addr"),
            remote: "127.0.0.1:5000".parse().expect("addr"),
            inode: cookie + 1000,
            uid: 0,
            cookie,
            state: 8,
            recv_q: 1,
            send_q: 0,
            last_ack_recv_ms: None,
            last_data_recv_ms: None,
            keepalive: false,
        }
    }

    fn at(s: u64) -> Boottime {
        Boottime::from_duration(Duration::from_secs(s))
    }

    #[test]
    fn first_sight_survives_snapshots_and_refreshes() {
        let mut t = Tracker::default();
        t.reset(
            Found {
                close_wait: vec![sock(1)],
                listeners: Vec::new(),
            },
            at(10),
        );
        assert!(
            !t.arrived(&(1, 1)),
            "what the first look finds was there already"
        );
        t.apply(
            Changes {
                entered: vec![sock(2)],
                refreshed: vec![sock(1)],
                ..Changes::default()
            },
            at(20),
        );
        assert_eq!(t.first_seen(&(1, 1)), Some(at(10)));
        assert_eq!(t.first_seen(&(1, 2)), Some(at(20)));
        assert!(t.arrived(&(1, 2)) && !t.arrived(&(1, 1)));
        t.reset(
            Found {
                close_wait: vec![sock(2)],
                listeners: Vec::new(),
            },
            at(30),
        );
        assert!(!t.tracks(&(1, 1)), "a snapshot without it: gone");
        assert_eq!(
            t.first_seen(&(1, 2)),
            Some(at(20)),
            "a snapshot keeps first sight"
        );
        assert!(!t.arrived(&(1, 2)));
    }

    #[test]
    fn left_and_ended_sockets_are_forgotten() {
        let mut t = Tracker::default();
        t.apply(
            Changes {
                entered: vec![sock(1), sock(2), sock(3)],
                ..Changes::default()
            },
            at(1),
        );
        t.apply(
            Changes {
                left: vec![(1, 1)],
                ended: vec![(1, 3)],
                ..Changes::default()
            },
            at(2),
        );
        assert_eq!(t.len(), 1);
        assert!(t.tracks(&(1, 2)));
        assert_eq!(t.found().close_wait.len(), 1);
    }

    #[test]
    fn changes_between_observations_count_as_the_next_ones() {
        let mut t = Tracker::default();
        t.reset(
            Found {
                close_wait: vec![sock(1), sock(2)],
                listeners: Vec::new(),
            },
            at(10),
        );
        t.apply(Changes::default(), at(11));
        assert!(!t.changed(), "nothing happened");
        let (entered, left) = t.apply_between(
            Changes {
                entered: vec![sock(3)],
                left: vec![(1, 1)],
                ..Changes::default()
            },
            at(12),
        );
        assert_eq!(entered, vec![sock(3)]);
        assert_eq!(left, vec![sock(1)]);
        assert!(t.tracks(&(1, 3)) && !t.tracks(&(1, 1)));
        assert_eq!(t.first_seen(&(1, 3)), Some(at(12)), "seen when it came");
        assert!(
            !t.changed() || !t.arrived(&(1, 3)),
            "not an observation yet"
        );
        // The next observation brings nothing more, and still finds it arrived.
        t.apply(Changes::default(), at(20));
        assert!(t.changed());
        assert!(t.arrived(&(1, 3)) && !t.arrived(&(1, 2)));
        t.apply(Changes::default(), at(30));
        assert!(!t.changed() && !t.arrived(&(1, 3)), "once only");
        // A snapshot after changes between observations finds them arrived too.
        t.apply_between(
            Changes {
                entered: vec![sock(4)],
                ..Changes::default()
            },
            at(31),
        );
        t.reset(
            Found {
                close_wait: vec![sock(2), sock(3), sock(4)],
                listeners: Vec::new(),
            },
            at(40),
        );
        assert!(t.arrived(&(1, 4)) && !t.arrived(&(1, 3)));
        assert_eq!(t.first_seen(&(1, 4)), Some(at(31)));
    }
}
