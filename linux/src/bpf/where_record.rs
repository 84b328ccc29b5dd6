//! The record of `explain --where`'s programs (`struct cw_where` in linux/bpf/where.bpf.c)
//! and its parser.

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
const KIND_CLOSED: u8 = 4;
const FLAG_FULL: u8 = 1;

/// What the thread was doing when its stack was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WhereKind {
    /// A read of a TCP socket returned 0: the peer's FIN, read.
    Eof,
    /// connect(2) on a TCP socket (the SYN went out).
    Connect,
    /// accept(2) or accept4(2) returned this fd.
    Accept,
    /// The socket of an earlier [`WhereKind::Eof`] or [`WhereKind::Connect`] record was
    /// freed (every fd to it closed): it did not leak. Only the cookie and time are set.
    Closed,
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

/// One record.
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
    /// Identifies the stack within (tgid, kind): a record without a capture has the stack
    /// of an earlier record of the same process, kind and hash.
    pub hash: u64,
    /// The thread's name.
    pub comm: String,
    /// The stack, when this is the first record with it.
    pub capture: Option<StackCapture>,
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
        KIND_CLOSED => WhereKind::Closed,
        k => return Err(BadWhere::Kind(k)),
    };
    let full = b[1] & FLAG_FULL != 0;
    let nframes = usize::from(u16::from_le_bytes([b[2], b[3]]));
    let comm_bytes = &b[40..56];
    let comm_end = comm_bytes.iter().position(|&c| c == 0).unwrap_or(16);
    let stack_len = u32_at(b, 80) as usize;
    let capture = if full {
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
        Some(StackCapture {
            frames: (0..nframes)
                .map(|i| u64_at(b, WHERE_HEADER_LEN + 8 * i))
                .collect(),
            ip: u64_at(b, 56),
            sp: u64_at(b, 64),
            bp: u64_at(b, 72),
            stack: b[FIXED..need].to_vec(),
        })
    } else {
        None
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

    #[test]
    fn a_header_only_record() {
        let r = parse_where(&header(1, 0, 5, 0)).unwrap();
        assert_eq!(r.kind, WhereKind::Eof);
        assert_eq!((r.tgid, r.tid, r.fd), (4242, 4243, 7));
        assert_eq!(r.cookie, 0x1122_3344_5566_7788);
        assert_eq!((r.ts_ns, r.hash), (99, 0xfeed));
        assert_eq!(r.comm, "leaky-server");
        assert_eq!(r.capture, None);
    }

    #[test]
    fn a_full_record() {
        let mut b = header(3, 1, 2, 16);
        let mut frames = vec![0u8; 8 * WHERE_FRAMES];
        frames[..8].copy_from_slice(&0xaaaa_u64.to_le_bytes());
        frames[8..16].copy_from_slice(&0xbbbb_u64.to_le_bytes());
        frames[16..24].copy_from_slice(&0xcccc_u64.to_le_bytes()); // beyond nframes
        b.extend(frames);
        b.extend(1u8..=16);
        let r = parse_where(&b).unwrap();
        assert_eq!(r.kind, WhereKind::Accept);
        let c = r.capture.unwrap();
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
        assert_eq!(parse_where(&header(9, 0, 0, 0)), Err(BadWhere::Kind(9)));
        assert_eq!(
            parse_where(&header(4, 0, 0, 0)).unwrap().kind,
            WhereKind::Closed
        );
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
        let mut b = header(1, 0, 0, 0);
        b[40..56].copy_from_slice(b"abcdefghijklmnop");
        assert_eq!(parse_where(&b).unwrap().comm, "abcdefghijklmnop");
    }
}
