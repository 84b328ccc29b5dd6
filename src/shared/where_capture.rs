//! What `explain --where` and the daemon's `where: on` record from the programs of
//! `where.bpf.o`: per socket, the stack of the read that returned its EOF and of the
//! connect or accept that opened it; and how the programs may name a stack by its hash
//! alone ([`Trust`]). The programs keep the per-socket records in the kernel (a socket is
//! forgotten there as it is freed) and send each stack once: [`Recorded`] keeps the stacks
//! as they come and looks up the sockets it reports. The daemon publishes what it keeps
//! ([`Recorded::to_bytes`]) in its run directory, and the command line reads it back
//! ([`Recorded::from_bytes`]) for sockets whose EOF came before its own window.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use cwreap_linux::bpf::{StackCapture, WhereAt, WhereCounts, WhereKind, WhereProbe, WhereRecord};
use cwreap_linux::stacks;

/// One record of a socket, and which stack it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub ts_ns: u64,
    /// Into [`Recorded::captures`]; None when the stack it names was not received (the ring
    /// buffer was full).
    pub capture: Option<u64>,
}

type HashKey = (u32, WhereKind, u64);

/// Reading what the programs keep costs a system call or two per entry: the next read
/// waits at least this many times what the last one took (a twentieth of a CPU at most).
const READ_SHARE: u32 = 20;

/// How long to wait before reading the programs' maps again: `floor`, or longer when the
/// last read `took` more than a [`READ_SHARE`]th of it.
pub fn read_gap(floor: Duration, took: Duration) -> Duration {
    floor.max(took * READ_SHARE)
}

/// The stacks received, and the records of the sockets looked up.
#[derive(Debug, Default)]
pub struct Recorded {
    /// The EOF read of each socket (by cookie).
    pub eof: HashMap<u64, Seen>,
    /// The connect of each socket (by cookie).
    pub connect: HashMap<u64, Seen>,
    /// The last accept that returned each (process, fd).
    pub accept: HashMap<(u32, u32), Seen>,
    /// Every stack received, by arrival number.
    pub captures: HashMap<u64, StackCapture>,
    /// The stack received per (tgid, kind, hash): what a kept record names.
    by_hash: HashMap<HashKey, u64>,
    /// The stacks the programs name by hash from now on (the others name one record).
    remembered: HashSet<u64>,
    next: u64,
}

impl Recorded {
    /// Take one stack in.
    pub fn add(&mut self, r: WhereRecord) {
        let id = self.next;
        self.next += 1;
        self.captures.insert(id, r.capture);
        if r.remembered {
            self.remembered.insert(id);
        }
        // Sent again (the programs' map of stacks sent was full): the older copy stays
        // while a record names it.
        if let Some(old) = self.by_hash.insert((r.tgid, r.kind, r.hash), id) {
            self.remembered.remove(&old);
        }
    }

    /// Take in every stack `probe` has queued, learning from each through `trust` how the
    /// programs may name its process's stacks (`buf` is scratch). How many there were.
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

    fn seen(&self, kind: WhereKind, at: WhereAt) -> Seen {
        Seen {
            ts_ns: at.ts_ns,
            capture: self.by_hash.get(&(at.tgid, kind, at.hash)).copied(),
        }
    }

    /// Look up what the programs keep of socket `cookie` (its EOF read, its connect) and,
    /// when `fd` is given, of the last accept into that fd of process `tgid`; what they
    /// keep replaces what was here. A failed lookup leaves what was here.
    pub fn look_up(&mut self, probe: &WhereProbe, cookie: u64, fd: Option<(u32, u32)>) {
        if let Ok((eof, connect)) = probe.socket(cookie) {
            if let Some(at) = eof {
                self.eof.insert(cookie, self.seen(WhereKind::Eof, at));
            }
            if let Some(at) = connect {
                self.connect
                    .insert(cookie, self.seen(WhereKind::Connect, at));
            }
        }
        if let Some(key) = fd
            && let Ok(Some(at)) = probe.accept(key.0, key.1)
        {
            self.accept.insert(key, self.seen(WhereKind::Accept, at));
        }
    }

    /// Everything the programs keep now, instead of what was here: the sockets not freed
    /// yet, and the accepts of the processes `keep` lets stay (the others are forgotten in
    /// the kernel too). Then the stacks nothing names any more are forgotten.
    pub fn refresh(&mut self, probe: &mut WhereProbe, keep: impl Fn(u32) -> bool) {
        let sockets = probe.sockets();
        let accepts = probe.accepts(keep);
        let mut eof = HashMap::with_capacity(sockets.len());
        let mut connect = HashMap::new();
        for (cookie, e, c) in sockets {
            if let Some(at) = e {
                eof.insert(cookie, self.seen(WhereKind::Eof, at));
            }
            if let Some(at) = c {
                connect.insert(cookie, self.seen(WhereKind::Connect, at));
            }
        }
        let accept = accepts
            .into_iter()
            .map(|(k, at)| (k, self.seen(WhereKind::Accept, at)))
            .collect();
        (self.eof, self.connect, self.accept) = (eof, connect, accept);
        self.prune(&[]);
    }

    /// Forget the stacks that name one record each when neither what is here nor `live`
    /// (the hashes the programs keep now) names them; the stacks the programs name by
    /// hash stay, as later records may refer to them.
    pub fn prune(&mut self, live: &[(u32, WhereKind, u64)]) {
        let mut named: HashSet<u64> = self.remembered.clone();
        named.extend(self.eof.values().filter_map(|s| s.capture));
        named.extend(self.connect.values().filter_map(|s| s.capture));
        named.extend(self.accept.values().filter_map(|s| s.capture));
        named.extend(live.iter().filter_map(|k| self.by_hash.get(k).copied()));
        self.by_hash.retain(|_, id| named.contains(id));
        self.captures.retain(|id, _| named.contains(id));
    }

    /// [`Self::prune`] against what `probe` keeps now (during a window, when no socket
    /// has been looked up yet).
    pub fn prune_against(&mut self, probe: &mut WhereProbe) {
        let mut live = Vec::new();
        for (_, eof, connect) in probe.sockets() {
            live.extend(eof.map(|a| (a.tgid, WhereKind::Eof, a.hash)));
            live.extend(connect.map(|a| (a.tgid, WhereKind::Connect, a.hash)));
        }
        live.extend(
            probe
                .accepts(|_| true)
                .into_iter()
                .map(|(_, a)| (a.tgid, WhereKind::Accept, a.hash)),
        );
        self.prune(&live);
    }
}

/// How the programs may tell stacks of a process apart without sending them: by the words
/// at the offsets of the return addresses CFI found in a stack taken at the same
/// instruction pointer (a layout); until a call site has one, by the process's frame
/// pointers, once they agree with CFI.
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

    /// Learn from a stack how the programs may tell this process's stacks apart, and tell
    /// them.
    pub fn check(&mut self, probe: &mut WhereProbe, r: &WhereRecord) {
        let c = &r.capture;
        let (_, set) = self.layouts.entry((r.tgid, c.ip)).or_default();
        if *set {
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
        let (tries, trusted) = self.checked.entry(r.tgid).or_default();
        if !*trusted && *tries < Self::TRIES && c.frames.len() >= 3 {
            *tries += 1;
            if fp_agrees_with_cfi(&c.frames, &cfi) && probe.trust(r.tgid).is_ok() {
                *trusted = true;
            }
        }
        // A layout even where frame pointers are trusted: reading the words at its offsets
        // costs the traced thread far less than a walk of the frame pointers (a
        // bpf_get_stack per record: most of what the programs cost a busy server).
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
/// innermost first, while each is in the copied stack exactly once (a value seen twice
/// could be a stale copy, whose offset would say nothing of the path) and within the span
/// the programs read.
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
        if (!out.is_empty() && off <= prev) || off >= cwreap_linux::bpf::WHERE_LAYOUT_SPAN {
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
    socks_full: u64,
    accepts_full: u64,
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
                socks_full: counts.socks_full,
                accepts_full: counts.accepts_full,
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
                remembered: HashSet::new(),
                next,
            },
            WhereCounts {
                lost: c.lost,
                seen_full: c.seen_full,
                no_stack: c.no_stack,
                full: c.full,
                short: c.short,
                socks_full: c.socks_full,
                accepts_full: c.accepts_full,
                malformed: c.malformed,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: WhereKind, hash: u64, remembered: bool) -> WhereRecord {
        WhereRecord {
            kind,
            tgid: 42,
            tid: 43,
            fd: 0,
            cookie: 0,
            ts_ns: 1,
            hash,
            comm: "srv".into(),
            capture: StackCapture {
                frames: vec![hash, hash + 0x10, hash + 0x20],
                ip: hash,
                sp: 0x7ffd_0000,
                bp: 0x7ffd_0100,
                stack: vec![0xab, 0, 0xff, 7],
            },
            remembered,
        }
    }

    fn at(ts_ns: u64, hash: u64) -> WhereAt {
        WhereAt {
            ts_ns,
            hash,
            tgid: 42,
            tid: 43,
        }
    }

    #[test]
    fn a_kept_record_names_the_stack_of_its_process_kind_and_hash() {
        let mut rec = Recorded::default();
        rec.add(record(WhereKind::Eof, 0x1000, true));
        rec.add(record(WhereKind::Accept, 0x1000, true));
        let eof = rec.seen(WhereKind::Eof, at(5, 0x1000));
        let accept = rec.seen(WhereKind::Accept, at(4, 0x1000));
        assert_eq!(eof.ts_ns, 5);
        let (e, a) = (eof.capture.expect("named"), accept.capture.expect("named"));
        assert_ne!(e, a, "same hash, another kind: another stack");
        // A stack not received (the ring buffer was full) names nothing.
        assert_eq!(rec.seen(WhereKind::Eof, at(6, 0x2000)).capture, None);
        let other = WhereAt {
            tgid: 7,
            ..at(6, 0x1000)
        };
        assert_eq!(
            rec.seen(WhereKind::Eof, other).capture,
            None,
            "another process"
        );
    }

    #[test]
    fn stacks_that_name_one_record_are_forgotten_once_nothing_names_them() {
        let mut rec = Recorded::default();
        rec.add(record(WhereKind::Eof, 0x1000, true)); // named by hash for good
        rec.add(record(WhereKind::Eof, 0x2000, false)); // one record's, still kept
        rec.add(record(WhereKind::Eof, 0x3000, false)); // one record's, freed
        rec.add(record(WhereKind::Connect, 0x4000, false)); // looked up already
        let looked = rec.seen(WhereKind::Connect, at(9, 0x4000));
        rec.connect.insert(99, looked);
        rec.prune(&[(42, WhereKind::Eof, 0x2000)]);
        let left: HashSet<u64> = rec.captures.values().map(|c| c.ip).collect();
        assert_eq!(left, HashSet::from([0x1000, 0x2000, 0x4000]));
        assert_eq!(rec.seen(WhereKind::Eof, at(1, 0x3000)).capture, None);
        assert!(rec.seen(WhereKind::Eof, at(1, 0x2000)).capture.is_some());
        // Nothing live any more: the remembered one and the looked-up one stay.
        rec.prune(&[]);
        let left: HashSet<u64> = rec.captures.values().map(|c| c.ip).collect();
        assert_eq!(left, HashSet::from([0x1000, 0x4000]));
    }

    #[test]
    fn what_the_daemon_publishes_reads_back_the_same() {
        let mut rec = Recorded::default();
        rec.add(record(WhereKind::Accept, 0x1000, true));
        rec.add(record(WhereKind::Eof, 0x2000, true));
        rec.add(record(WhereKind::Connect, 0x3000, false));
        rec.accept
            .insert((42, 9), rec.seen(WhereKind::Accept, at(1, 0x1000)));
        rec.eof.insert(77, rec.seen(WhereKind::Eof, at(2, 0x2000)));
        rec.connect
            .insert(78, rec.seen(WhereKind::Connect, at(3, 0x3000)));
        rec.eof.insert(79, rec.seen(WhereKind::Eof, at(4, 0x5000)));
        let counts = WhereCounts {
            lost: 1,
            full: 4,
            short: 2,
            socks_full: 3,
            accepts_full: 5,
            ..WhereCounts::default()
        };
        let (back, c) = Recorded::from_bytes(&rec.to_bytes(&counts)).expect("parses");
        assert_eq!(c, counts);
        assert_eq!(back.eof, rec.eof);
        assert_eq!(back.connect, rec.connect);
        assert_eq!(back.accept, rec.accept);
        assert_eq!(back.captures, rec.captures);
        assert_eq!(back.eof[&79].capture, None, "a stack lost stays lost");
        // Stacks received after it are numbered past the ones read.
        let mut more = back;
        more.add(record(WhereKind::Eof, 0x6000, true));
        let id = more
            .seen(WhereKind::Eof, at(6, 0x6000))
            .capture
            .expect("kept");
        assert!(!rec.captures.contains_key(&id), "a fresh number: {id}");
        assert!(Recorded::from_bytes(b"{\"eof\": 3}").is_err());
    }
}
