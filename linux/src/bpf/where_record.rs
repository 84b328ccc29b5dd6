//! The record of `explain --where`'s programs (`struct cw_where` in linux/bpf/where.bpf.c)
//! and its parser: a stack, sent the first time the programs see it. What they keep per
//! socket and per accepted fd stays in kernel maps ([`WhereAt`]) and names the stack by
//! its hash.

/// Bytes of the header every record has.
pub const WHERE_HEADER_LEN: usize = 88;
/// Frame-pointer frames a full record has room for.
pub const WHERE_FRAMES: usize = 64;
/// The most stack bytes a record carries.
pub const WHERE_STACK_MAX: usize = 16384;
const FIXED: usize = WHERE_HEADER_LEN + 8 * WHERE_FRAMES;

const KIND_EOF: u8 = 1;
const KIND_CONNECT: u8 = 2;
const KIND_ACCEPT: u8 = 3;
const FLAG_FULL: u8 = 1;
const FLAG_REMEMBERED: u8 = 2;

/// What the thread was doing when its stack was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WhereKind {
    /// A read of a TCP socket returned 0: the peer's FIN, read.
    Eof,
    /// connect(2) on a TCP socket (the SYN went out).
    Connect,
    /// accept(2) or accept4(2) returned this fd.
    Accept,
}

/// The user stack of one thread at one syscall, as the programs sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackCapture {
    /// Return addresses by frame pointers, innermost first, the instruction pointer first.
    pub frames: Vec<u64>,
    /// User registers at the syscall.
    pub ip: u64,
    /// Stack pointer.
    pub sp: u64,
    /// Frame pointer register (any value in a binary built without frame pointers).
    pub bp: u64,
    /// The top of the user stack, from `sp` up; empty when it could not be read.
    pub stack: Vec<u8>,
}

/// One record: a stack, and the first thread seen at it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WhereRecord {
    /// What the thread did.
    pub kind: WhereKind,
    /// Process.
    pub tgid: u32,
    /// Thread.
    pub tid: u32,
    /// For [`WhereKind::Accept`], the fd accept returned; else 0.
    pub fd: u32,
    /// For [`WhereKind::Eof`] and [`WhereKind::Connect`], the socket cookie; else 0.
    pub cookie: u64,
    /// CLOCK_BOOTTIME ns.
    pub ts_ns: u64,
    /// Names the stack within (tgid, kind): what a [`WhereAt`] of the same process and
    /// kind refers to.
    pub hash: u64,
    /// The thread's name.
    pub comm: String,
    /// The stack.
    pub capture: StackCapture,
    /// The programs name this stack by its hash from now on: records kept later may refer
    /// to it without sending it. Else the hash is this record's alone (a stack of a process
    /// whose stacks cannot be told apart by hash yet), referred to only by the one record
    /// kept with it.
    pub remembered: bool,
}

/// What the programs keep in the kernel of one EOF read, connect or accept: when, which
/// thread, and which stack (the [`WhereRecord`] of the same process and kind with this
/// hash). `struct cw_where_at` in linux/bpf/where.bpf.c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhereAt {
    /// CLOCK_BOOTTIME ns.
    pub ts_ns: u64,
    /// The stack's [`WhereRecord::hash`].
    pub hash: u64,
    /// Process.
    pub tgid: u32,
    /// Thread.
    pub tid: u32,
}

/// Bytes of a `struct cw_where_at`.
pub(crate) const WHERE_AT_LEN: usize = 24;

impl WhereAt {
    /// Parse one (host order, as the BPF target writes it on x86_64); None when its time
    /// is 0: nothing kept.
    pub(crate) fn parse(b: &[u8]) -> Option<WhereAt> {
        if b.len() < WHERE_AT_LEN {
            return None;
        }
        let at = WhereAt {
            ts_ns: u64_at(b, 0),
            hash: u64_at(b, 8),
            tgid: u32_at(b, 16),
            tid: u32_at(b, 20),
        };
        (at.ts_ns != 0).then_some(at)
    }
}

/// Why a record could not be read (only a mismatch between object and parser).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadWhere {
    /// Shorter than its header or its declared contents.
    #[error("where record of {got} bytes, needs {need}")]
    Short {
        /// Its length.
        got: usize,
        /// What it needs.
        need: usize,
    },
    /// An unknown kind.
    #[error("where record of unknown kind {0}")]
    Kind(u8),
    /// A header without the stack every record carries.
    #[error("where record without its stack")]
    NoStack,
    /// More frames or stack bytes than a record holds.
    #[error("where record claims {frames} frames and {stack} stack bytes")]
    Oversized {
        /// Frames.
        frames: usize,
        /// Stack bytes.
        stack: usize,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Parse one record (little-endian, as the BPF target writes it on x86_64).
pub fn parse_where(b: &[u8]) -> Result<WhereRecord, BadWhere> {
    if b.len() < WHERE_HEADER_LEN {
        return Err(BadWhere::Short {
            got: b.len(),
            need: WHERE_HEADER_LEN,
        });
    }
    let kind = match b[0] {
        KIND_EOF => WhereKind::Eof,
        KIND_CONNECT => WhereKind::Connect,
        KIND_ACCEPT => WhereKind::Accept,
        k => return Err(BadWhere::Kind(k)),
    };
    if b[1] & FLAG_FULL == 0 {
        return Err(BadWhere::NoStack);
    }
    let nframes = usize::from(u16::from_le_bytes([b[2], b[3]]));
    let comm_bytes = &b[40..56];
    let comm_end = comm_bytes.iter().position(|&c| c == 0).unwrap_or(16);
    let stack_len = u32_at(b, 80) as usize;
    if nframes > WHERE_FRAMES || stack_len > WHERE_STACK_MAX {
        return Err(BadWhere::Oversized {
            frames: nframes,
            stack: stack_len,
        });
    }
    let need = FIXED + stack_len;
    if b.len() < need {
        return Err(BadWhere::Short { got: b.len(), need });
    }
    let capture = StackCapture {
        frames: (0..nframes)
            .map(|i| u64_at(b, WHERE_HEADER_LEN + 8 * i))
            .collect(),
        ip: u64_at(b, 56),
        sp: u64_at(b, 64),
        bp: u64_at(b, 72),
        stack: b[FIXED..need].to_vec(),
    };
    Ok(WhereRecord {
        kind,
        tgid: u32_at(b, 4),
        tid: u32_at(b, 8),
        fd: u32_at(b, 12),
        cookie: u64_at(b, 16),
        ts_ns: u64_at(b, 24),
        hash: u64_at(b, 32),
        comm: String::from_utf8_lossy(&comm_bytes[..comm_end]).into_owned(),
        capture,
        remembered: b[1] & FLAG_REMEMBERED != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u8, flags: u8, nframes: u16, stack_len: u32) -> Vec<u8> {
        let mut b = vec![kind, flags];
        b.extend(nframes.to_le_bytes());
        b.extend(4242u32.to_le_bytes()); // tgid
        b.extend(4243u32.to_le_bytes()); // tid
        b.extend(7u32.to_le_bytes()); // fd
        b.extend(0x1122_3344_5566_7788u64.to_le_bytes()); // cookie
        b.extend(99u64.to_le_bytes()); // ts
        b.extend(0xfeedu64.to_le_bytes()); // hash
        let mut comm = *b"leaky-server\0\0\0\0";
        comm[15] = 0;
        b.extend(comm);
        b.extend(0x5555_0000_1000u64.to_le_bytes()); // ip
        b.extend(0x7ffc_0000_0000u64.to_le_bytes()); // sp
        b.extend(0x7ffc_0000_0100u64.to_le_bytes()); // bp
        b.extend(stack_len.to_le_bytes());
        b.extend(0u32.to_le_bytes());
        assert_eq!(b.len(), WHERE_HEADER_LEN);
        b
    }

    fn full(kind: u8, nframes: u16, stack: &[u8]) -> Vec<u8> {
        let mut b = header(kind, 1, nframes, stack.len() as u32);
        b.extend(vec![0u8; 8 * WHERE_FRAMES]);
        b.extend(stack);
        b
    }

    #[test]
    fn a_record_without_stack_bytes() {
        let r = parse_where(&full(1, 0, &[])).unwrap();
        assert!(!r.remembered);
        assert_eq!(r.kind, WhereKind::Eof);
        assert_eq!((r.tgid, r.tid, r.fd), (4242, 4243, 7));
        assert_eq!(r.cookie, 0x1122_3344_5566_7788);
        assert_eq!((r.ts_ns, r.hash), (99, 0xfeed));
        assert_eq!(r.comm, "leaky-server");
        assert!(r.capture.stack.is_empty() && r.capture.frames.is_empty());
    }

    #[test]
    fn a_kept_record_reads_as_laid_out_and_time_zero_is_none() {
        let mut b = Vec::new();
        b.extend(77u64.to_ne_bytes());
        b.extend(0xabcdu64.to_ne_bytes());
        b.extend(4242u32.to_ne_bytes());
        b.extend(4243u32.to_ne_bytes());
        assert_eq!(
            WhereAt::parse(&b),
            Some(WhereAt {
                ts_ns: 77,
                hash: 0xabcd,
                tgid: 4242,
                tid: 4243
            })
        );
        b[..8].copy_from_slice(&0u64.to_ne_bytes());
        assert_eq!(WhereAt::parse(&b), None);
        assert_eq!(WhereAt::parse(&b[..20]), None);
    }

    #[test]
    fn a_full_record() {
        let mut b = header(3, 3, 2, 16);
        let mut frames = vec![0u8; 8 * WHERE_FRAMES];
        frames[..8].copy_from_slice(&0xaaaa_u64.to_le_bytes());
        frames[8..16].copy_from_slice(&0xbbbb_u64.to_le_bytes());
        frames[16..24].copy_from_slice(&0xcccc_u64.to_le_bytes()); // beyond nframes
        b.extend(frames);
        b.extend(1u8..=16);
        let r = parse_where(&b).unwrap();
        assert_eq!(r.kind, WhereKind::Accept);
        assert!(r.remembered);
        let c = r.capture;
        assert_eq!(c.frames, vec![0xaaaa, 0xbbbb]);
        assert_eq!(
            (c.ip, c.sp, c.bp),
            (0x5555_0000_1000, 0x7ffc_0000_0000, 0x7ffc_0000_0100)
        );
        assert_eq!(c.stack, (1u8..=16).collect::<Vec<_>>());
    }

    #[test]
    fn truncated_and_unknown_records_are_refused() {
        assert_eq!(
            parse_where(&[1; 10]),
            Err(BadWhere::Short { got: 10, need: 88 })
        );
        assert_eq!(parse_where(&full(9, 0, &[])), Err(BadWhere::Kind(9)));
        assert_eq!(parse_where(&full(4, 0, &[])), Err(BadWhere::Kind(4)));
        assert_eq!(parse_where(&header(1, 0, 0, 0)), Err(BadWhere::NoStack));
        // Full, declaring 16 stack bytes, carrying none.
        let b = header(2, 1, 0, 16);
        assert_eq!(
            parse_where(&b),
            Err(BadWhere::Short {
                got: 88,
                need: 88 + 512 + 16
            })
        );
        let b = header(2, 1, 65, 0);
        assert!(matches!(parse_where(&b), Err(BadWhere::Oversized { .. })));
        let b = header(2, 1, 0, 16385);
        assert!(matches!(parse_where(&b), Err(BadWhere::Oversized { .. })));
    }

    #[test]
    fn a_comm_of_sixteen_bytes_has_no_terminator() {
        let mut b = full(1, 0, &[]);
        b[40..56].copy_from_slice(b"abcdefghijklmnop");
        assert_eq!(parse_where(&b).unwrap().comm, "abcdefghijklmnop");
    }
}
