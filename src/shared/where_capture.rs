//! What `explain --where` and the daemon's `where: on` record from the programs of
//! `where.bpf.o`: per socket, the stack of the read that returned its EOF and of the
//! connect or accept that opened it, forgotten as the socket closes; and how the programs
//! may send a stack already sent as its hash only ([`Trust`]). The daemon publishes what
//! it keeps ([`Recorded::to_bytes`]) in its run directory, and the command line reads it
//! back ([`Recorded::from_bytes`]) for sockets whose EOF came before its own window.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use cwreap_linux::bpf::{StackCapture, WhereCounts, WhereKind, WhereProbe, WhereRecord};
use cwreap_linux::stacks;

/// One record of a socket, and which stack it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub ts_ns: u64,
    /// Into [`Recorded::captures`]; None when the record referred to a stack not kept.
    pub capture: Option<u64>,
}

type HashKey = (u32, WhereKind, u64);

/// What was recorded, sockets that closed already forgotten.
#[derive(Debug, Default)]
pub struct Recorded {
    /// The EOF read of each socket (by cookie).
    pub eof: HashMap<u64, Seen>,
    /// The connect of each socket (by cookie).
    pub connect: HashMap<u64, Seen>,
    /// The last accept that returned each (process, fd).
    pub accept: HashMap<(u32, u32), Seen>,
    /// Every stack received, by arrival number. Not by hash: in a binary without frame
    /// pointers, two paths may hash alike.
    pub captures: HashMap<u64, StackCapture>,
    /// The last stack received per (tgid, kind, hash): what a record without a stack
    /// refers to (sent only for trusted processes, whose hashes tell paths apart).
    by_hash: HashMap<HashKey, u64>,
    next: u64,
}

impl Recorded {
    /// Take one record in: a stack, or the end of a socket (which forgets it).
    pub fn add(&mut self, r: WhereRecord) {
        let key = (r.tgid, r.kind, r.hash);
        let capture = match r.capture {
            Some(c) => {
                let id = self.next;
                self.next += 1;
                self.captures.insert(id, c);
                self.by_hash.insert(key, id);
                Some(id)
            }
            None => self.by_hash.get(&key).copied(),
        };
        let seen = Seen {
            ts_ns: r.ts_ns,
            capture,
        };
        match r.kind {
            WhereKind::Eof => {
                self.eof.insert(r.cookie, seen);
            }
            WhereKind::Connect => {
                self.connect.insert(r.cookie, seen);
            }
            WhereKind::Accept => {
                self.accept.insert((r.tgid, r.fd), seen);
            }
            WhereKind::Closed => {
                self.eof.remove(&r.cookie);
                self.connect.remove(&r.cookie);
            }
        }
    }

    /// Take in every record `probe` has queued, learning from each through `trust` how
    /// the programs may send its process's stacks (`buf` is scratch). How many there were.
    pub fn take(
        &mut self,
        probe: &mut WhereProbe,
        trust: &mut Trust,
        buf: &mut Vec<WhereRecord>,
    ) -> usize {
        probe.drain(buf);
        let n = buf.len();
        for r in buf.drain(..) {
            trust.check(probe, &r);
            self.add(r);
        }
        n
    }

    /// Forget the stacks no socket refers to any more. The last stack per hash of a trusted
    /// process stays: later records refer to it without carrying it.
    pub fn prune(&mut self, trust: &Trust) {
        let mut live: HashSet<u64> = HashSet::new();
        live.extend(self.eof.values().filter_map(|s| s.capture));
        live.extend(self.connect.values().filter_map(|s| s.capture));
        live.extend(self.accept.values().filter_map(|s| s.capture));
        self.by_hash
            .retain(|k, id| trust.deduplicated(k.0) || live.contains(id));
        live.extend(self.by_hash.values().copied());
        self.captures.retain(|id, _| live.contains(id));
    }
}

/// How the programs may tell stacks of a process apart without sending them: by its frame
/// pointers, once they agree with CFI; else by the words at the offsets of the return
/// addresses CFI found in a stack taken at the same instruction pointer (a layout).
#[derive(Debug, Default)]
pub struct Trust {
    /// Frame-pointer checks made per process, and whether it is trusted.
    checked: HashMap<u32, (u32, bool)>,
    /// Layout attempts per (process, instruction pointer), and whether one was set.
    layouts: HashMap<(u32, u64), (u32, bool)>,
}

impl Trust {
    /// Checks per process (frame pointers) or per instruction pointer (layouts) before
    /// giving up: those stacks are then always sent whole.
    const TRIES: u32 = 4;

    /// Whether the programs may send stacks of `tgid` as hashes only.
    pub fn deduplicated(&self, tgid: u32) -> bool {
        self.checked.get(&tgid).is_some_and(|c| c.1)
            || self
                .layouts
                .iter()
                .any(|((t, _), (_, set))| *t == tgid && *set)
    }

    /// Learn from a record with a stack how the programs may tell this process's stacks
    /// apart, and tell them.
    pub fn check(&mut self, probe: &mut WhereProbe, r: &WhereRecord) {
        let Some(c) = &r.capture else {
            return;
        };
        let (tries, trusted) = self.checked.entry(r.tgid).or_default();
        if *trusted {
            return;
        }
        let regs = stacks::UserRegs {
            ip: c.ip,
            sp: c.sp,
            bp: c.bp,
        };
        let Ok(cfi) = stacks::unwind_cfi(r.tgid, &regs, &c.stack) else {
            return;
        };
        if *tries < Self::TRIES && c.frames.len() >= 3 {
            *tries += 1;
            if fp_agrees_with_cfi(&c.frames, &cfi) && probe.trust(r.tgid).is_ok() {
                *trusted = true;
                return;
            }
        }
        let (tries, set) = self.layouts.entry((r.tgid, c.ip)).or_default();
        if *set || *tries >= Self::TRIES {
            return;
        }
        *tries += 1;
        let offsets = layout(&cfi, &c.stack);
        if offsets.len() >= 2 && probe.set_layout(r.tgid, c.ip, &offsets).is_ok() {
            *set = true;
        }
    }
}

/// Every frame-pointer return address is one CFI unwinding finds too.
fn fp_agrees_with_cfi(fp: &[u64], cfi: &[u64]) -> bool {
    let cfi: HashSet<u64> = cfi.iter().copied().collect();
    cfi.len() >= 3 && fp.iter().skip(1).all(|a| cfi.contains(a))
}

/// The offsets from sp of the return addresses `cfi` found (after the instruction pointer),
/// innermost first, while each is in the copied stack exactly once: a value seen twice
/// could be a stale copy, whose offset would say nothing of the path.
fn layout(cfi: &[u64], stack: &[u8]) -> Vec<u32> {
    let words: Vec<u64> = stack
        .chunks_exact(8)
        .map(|w| {
            let mut b = [0u8; 8];
            b.copy_from_slice(w);
            u64::from_le_bytes(b)
        })
        .collect();
    let mut out = Vec::new();
    for a in cfi
        .iter()
        .skip(1)
        .take(cwreap_linux::bpf::WHERE_LAYOUT_DEPTH)
    {
        let mut at = words
            .iter()
            .enumerate()
            .filter(|(_, w)| *w == a)
            .map(|(i, _)| i);
        let (Some(i), None) = (at.next(), at.next()) else {
            break;
        };
        let (Ok(off), Some(prev)) = (u32::try_from(i * 8), out.last().copied().or(Some(0))) else {
            break;
        };
        if !out.is_empty() && off <= prev {
            break;
        }
        out.push(off);
    }
    out
}

/// The published form: the maps as lists, the stack bytes as hex.
#[derive(Serialize, Deserialize)]
struct RecordedFile {
    eof: Vec<(u64, Seen)>,
    connect: Vec<(u64, Seen)>,
    accept: Vec<((u32, u32), Seen)>,
    captures: Vec<(u64, CaptureFile)>,
    counts: CountsFile,
}

#[derive(Serialize, Deserialize)]
struct CaptureFile {
    frames: Vec<u64>,
    ip: u64,
    sp: u64,
    bp: u64,
    stack: String,
}

#[derive(Serialize, Deserialize, Default)]
struct CountsFile {
    lost: u64,
    seen_full: u64,
    no_stack: u64,
    full: u64,
    short: u64,
    open_full: u64,
    malformed: u64,
}

impl Recorded {
    /// How many entries (EOF reads, connects, accepts) are kept.
    pub fn len(&self) -> usize {
        self.eof.len() + self.connect.len() + self.accept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep at most `max` EOF reads, as many connects and as many accepts, the newest: a
    /// socket whose close the programs could not follow is otherwise kept for ever, and
    /// so is the last accept of every fd number. Returns how many were dropped.
    pub fn cap(&mut self, max: usize) -> usize {
        fn newest<K: std::hash::Hash + Eq>(m: &mut HashMap<K, Seen>, max: usize) -> usize {
            if m.len() <= max {
                return 0;
            }
            let mut ts: Vec<u64> = m.values().map(|s| s.ts_ns).collect();
            let cut = ts.len() - max;
            ts.select_nth_unstable(cut);
            let limit = ts[cut];
            let before = m.len();
            m.retain(|_, s| s.ts_ns >= limit);
            before - m.len()
        }
        newest(&mut self.eof, max) + newest(&mut self.connect, max) + newest(&mut self.accept, max)
    }

    /// The bytes the daemon publishes: what is kept, with the programs' counts.
    pub fn to_bytes(&self, counts: &WhereCounts) -> Vec<u8> {
        let file = RecordedFile {
            eof: self.eof.iter().map(|(k, v)| (*k, *v)).collect(),
            connect: self.connect.iter().map(|(k, v)| (*k, *v)).collect(),
            accept: self.accept.iter().map(|(k, v)| (*k, *v)).collect(),
            captures: self
                .captures
                .iter()
                .map(|(id, c)| {
                    (
                        *id,
                        CaptureFile {
                            frames: c.frames.clone(),
                            ip: c.ip,
                            sp: c.sp,
                            bp: c.bp,
                            stack: hex::encode(&c.stack),
                        },
                    )
                })
                .collect(),
            counts: CountsFile {
                lost: counts.lost,
                seen_full: counts.seen_full,
                no_stack: counts.no_stack,
                full: counts.full,
                short: counts.short,
                open_full: counts.open_full,
                malformed: counts.malformed,
            },
        };
        serde_json::to_vec(&file).unwrap_or_default()
    }

    /// Read back what [`Self::to_bytes`] wrote, with the counts; the error says what is
    /// wrong. Stacks recorded after it are numbered past the ones read.
    pub fn from_bytes(b: &[u8]) -> Result<(Recorded, WhereCounts), String> {
        let file: RecordedFile = serde_json::from_slice(b).map_err(|e| e.to_string())?;
        let mut captures = HashMap::with_capacity(file.captures.len());
        for (id, c) in file.captures {
            let stack = hex::decode(&c.stack).map_err(|e| format!("stack {id}: {e}"))?;
            captures.insert(
                id,
                StackCapture {
                    frames: c.frames,
                    ip: c.ip,
                    sp: c.sp,
                    bp: c.bp,
                    stack,
                },
            );
        }
        let next = captures.keys().max().map_or(0, |m| m + 1);
        let c = file.counts;
        Ok((
            Recorded {
                eof: file.eof.into_iter().collect(),
                connect: file.connect.into_iter().collect(),
                accept: file.accept.into_iter().collect(),
                captures,
                by_hash: HashMap::new(),
                next,
            },
            WhereCounts {
                lost: c.lost,
                seen_full: c.seen_full,
                no_stack: c.no_stack,
                full: c.full,
                short: c.short,
                open_full: c.open_full,
                malformed: c.malformed,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: WhereKind, cookie: u64, fd: u32, ts_ns: u64, ip: u64) -> WhereRecord {
        WhereRecord {
            kind,
            tgid: 42,
            tid: 43,
            fd,
            cookie,
            ts_ns,
            hash: ip,
            comm: "srv".into(),
            capture: (kind != WhereKind::Closed).then(|| StackCapture {
                frames: vec![ip, ip + 0x10, ip + 0x20],
                ip,
                sp: 0x7ffd_0000,
                bp: 0x7ffd_0100,
                stack: vec![0xab, 0, 0xff, 7],
            }),
        }
    }

    #[test]
    fn what_the_daemon_publishes_reads_back_the_same() {
        let mut rec = Recorded::default();
        rec.add(record(WhereKind::Accept, 0, 9, 1, 0x1000));
        rec.add(record(WhereKind::Eof, 77, 0, 2, 0x2000));
        rec.add(record(WhereKind::Connect, 78, 0, 3, 0x3000));
        rec.add(record(WhereKind::Eof, 79, 0, 4, 0x4000));
        rec.add(record(WhereKind::Closed, 79, 0, 5, 0));
        let counts = WhereCounts {
            lost: 1,
            full: 4,
            short: 2,
            ..WhereCounts::default()
        };
        let (back, c) = Recorded::from_bytes(&rec.to_bytes(&counts)).expect("parses");
        assert_eq!(c, counts);
        assert_eq!(back.eof, rec.eof);
        assert_eq!(back.connect, rec.connect);
        assert_eq!(back.accept, rec.accept);
        assert_eq!(back.captures, rec.captures);
        assert!(!back.eof.contains_key(&79), "a closed socket is forgotten");
        // Stacks recorded after it are numbered past the ones read.
        let mut more = back;
        more.add(record(WhereKind::Eof, 80, 0, 6, 0x5000));
        let id = more.eof[&80].capture.expect("kept");
        assert!(!rec.captures.contains_key(&id), "a fresh number: {id}");
        assert!(Recorded::from_bytes(b"{\"eof\": 3}").is_err());
    }

    #[test]
    fn the_oldest_are_forgotten_past_the_cap() {
        let mut rec = Recorded::default();
        for i in 0..10 {
            rec.add(record(WhereKind::Eof, 100 + i, 0, i, 0x1000));
        }
        for fd in 0..6 {
            rec.add(record(WhereKind::Accept, 0, fd, 20 + u64::from(fd), 0x2000));
        }
        assert_eq!(rec.cap(4), 6 + 2);
        let mut left: Vec<u64> = rec.eof.keys().copied().collect();
        left.sort_unstable();
        assert_eq!(left, vec![106, 107, 108, 109]);
        let mut fds: Vec<u32> = rec.accept.keys().map(|k| k.1).collect();
        fds.sort_unstable();
        assert_eq!(fds, vec![2, 3, 4, 5]);
        assert_eq!(rec.cap(4), 0);
    }
}
