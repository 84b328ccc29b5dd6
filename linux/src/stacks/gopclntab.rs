//! Go's own symbol table, `.gopclntab`: function names and lines of Go binaries stripped of
//! `.symtab` and DWARF (`-ldflags="-s -w"`, the usual build for containers), which the Go
//! runtime keeps for its own tracebacks. Layouts of Go 1.16 to 1.2x (magic 0xfffffffa,
//! 0xfffffff0, 0xfffffff1). Lines inside inlined code are not given (the inline tree is not
//! read), so a line is never the callee's shown as the caller's.

/// The table, over its section bytes.
pub(crate) struct GoPcln<'a> {
    data: &'a [u8],
    ptr: usize,
    min_lc: u64,
    nfunc: usize,
    text_start: u64,
    funcnames: usize,
    cutab: usize,
    filetab: usize,
    pctab: usize,
    /// The function table: (entry, funcoff) pairs of u32 (1.18+) or of pointers (1.16).
    functab: usize,
    /// 1.18 and later: entries are u32 offsets from `text_start`.
    relative: bool,
    /// 1.20 and later: `_func` has a startLine field.
    start_line: bool,
}

/// A Go function at an address: its name, and its file and line outside inlined code.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct GoFrame {
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
}

const PCDATA_INL_TREE_INDEX: usize = 2;

impl<'a> GoPcln<'a> {
    /// Parse the header; `text_svma` is the .text section's address, used when the header's
    /// own text start is 0 (PIE binaries fill it at run time).
    pub fn parse(data: &'a [u8], text_svma: u64) -> Option<GoPcln<'a>> {
        let magic = u32::from_le_bytes(data.get(0..4)?.try_into().ok()?);
        let (relative, start_line) = match magic {
            0xffff_fffa => (false, false),
            0xffff_fff0 => (true, false),
            0xffff_fff1 => (true, true),
            _ => return None,
        };
        let min_lc = u64::from(*data.get(6)?);
        let ptr = usize::from(*data.get(7)?);
        if ptr != 8 && ptr != 4 || min_lc == 0 {
            return None;
        }
        let word = |i: usize| read_uint(data, 8 + i * ptr, ptr);
        let nfunc = usize::try_from(word(0)?).ok()?;
        let (text_start, rest) = if relative { (word(2)?, 3) } else { (0, 2) };
        let off = |i: usize| usize::try_from(word(rest + i)?).ok();
        let t = GoPcln {
            data,
            ptr,
            min_lc,
            nfunc,
            text_start: if text_start == 0 {
                text_svma
            } else {
                text_start
            },
            funcnames: off(0)?,
            cutab: off(1)?,
            filetab: off(2)?,
            pctab: off(3)?,
            functab: off(4)?,
            relative,
            start_line,
        };
        (t.functab < data.len()).then_some(t)
    }

    /// (entry address, offset of its `_func` from the function table) of function `i`.
    fn entry(&self, i: usize) -> Option<(u64, usize)> {
        if self.relative {
            let at = self.functab.checked_add(i.checked_mul(8)?)?;
            let entry = read_uint(self.data, at, 4)?;
            let func = read_uint(self.data, at + 4, 4)?;
            Some((
                self.text_start.checked_add(entry)?,
                usize::try_from(func).ok()?,
            ))
        } else {
            let at = self.functab.checked_add(i.checked_mul(2 * self.ptr)?)?;
            let entry = read_uint(self.data, at, self.ptr)?;
            let func = read_uint(self.data, at + self.ptr, self.ptr)?;
            Some((entry, usize::try_from(func).ok()?))
        }
    }

    /// The function holding `pc` (a file address), with its line where that is not
    /// inlined code.
    pub fn lookup(&self, pc: u64) -> Option<GoFrame> {
        let (first, _) = self.entry(0)?;
        let (end, _) = self.entry(self.nfunc)?;
        if pc < first || pc >= end {
            return None;
        }
        // The last function whose entry is <= pc.
        let (mut lo, mut hi) = (0usize, self.nfunc);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.entry(mid)?.0 <= pc {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        let (entry, funcoff) = self.entry(lo)?;
        let f = self.functab.checked_add(funcoff)?;
        let field = |i: usize| read_uint(self.data, f.checked_add(i * 4)?, 4);
        // The fields after the entry: 1.18+ has a u32 entryOff, 1.16 a pointer.
        let base = if self.relative { 1 } else { self.ptr / 4 };
        let name_off = usize::try_from(field(base)?).ok()?;
        let function = self.string(self.funcnames.checked_add(name_off)?)?;
        // After nameOff: args, deferreturn, pcsp, pcfile, pcln, npcdata, cuOffset, then
        // startLine (1.20+) and four bytes (funcID, flag, pad, nfuncdata).
        let (pcfile, pcln, npcdata, cu) = (
            field(base + 4)?,
            field(base + 5)?,
            field(base + 6)?,
            field(base + 7)?,
        );
        let mut frame = GoFrame {
            function,
            file: None,
            line: None,
        };
        // The pcdata offsets follow.
        let fixed = (base + 8 + usize::from(self.start_line)) * 4 + 4;
        let pcdata = |i: usize| {
            (i < usize::try_from(npcdata).ok()?)
                .then(|| read_uint(self.data, f.checked_add(fixed + i * 4)?, 4))?
        };
        let inlined = match pcdata(PCDATA_INL_TREE_INDEX) {
            Some(0) | None => false,
            Some(table) => self.pcvalue(table, entry, pc).is_none_or(|v| v >= 0),
        };
        if inlined {
            return Some(frame);
        }
        let line = self.pcvalue(pcln, entry, pc).filter(|l| *l > 0);
        let fileno = self.pcvalue(pcfile, entry, pc).filter(|n| *n >= 0);
        frame.line = line.and_then(|l| u32::try_from(l).ok());
        frame.file = fileno.and_then(|n| {
            let idx = self
                .cutab
                .checked_add((usize::try_from(cu).ok()? + n as usize) * 4)?;
            let off = usize::try_from(read_uint(self.data, idx, 4)?).ok()?;
            self.string(self.filetab.checked_add(off)?)
        });
        Some(frame)
    }

    /// The value of a pc-value table at `pc`: zigzag value deltas and pc deltas, as the Go
    /// runtime's pcvalue reads them.
    fn pcvalue(&self, table: u64, entry: u64, pc: u64) -> Option<i64> {
        let mut at = self.pctab.checked_add(usize::try_from(table).ok()?)?;
        let (mut value, mut cur) = (-1i64, entry);
        for first in std::iter::once(true)
            .chain(std::iter::repeat(false))
            .take(1 << 20)
        {
            let (uv, n) = varint(self.data.get(at..)?)?;
            at += n;
            if uv == 0 && !first {
                return None;
            }
            let delta = if uv & 1 != 0 {
                !((uv >> 1) as i64)
            } else {
                (uv >> 1) as i64
            };
            value = value.checked_add(delta)?;
            let (pcd, n) = varint(self.data.get(at..)?)?;
            at += n;
            cur = cur.checked_add(pcd.checked_mul(self.min_lc)?)?;
            if pc < cur {
                return Some(value);
            }
        }
        None
    }

    /// The NUL-terminated string at `at`.
    fn string(&self, at: usize) -> Option<String> {
        let bytes = self.data.get(at..)?;
        let end = bytes.iter().position(|b| *b == 0)?;
        Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
    }
}

fn read_uint(data: &[u8], at: usize, size: usize) -> Option<u64> {
    let bytes = data.get(at..at.checked_add(size)?)?;
    Some(match size {
        4 => u64::from(u32::from_le_bytes(bytes.try_into().ok()?)),
        8 => u64::from_le_bytes(bytes.try_into().ok()?),
        _ => return None,
    })
}

/// An unsigned LEB128 varint: (value, bytes read).
fn varint(data: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, b) in data.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_varints() {
        assert_eq!(varint(&[0x05]), Some((5, 1)));
        assert_eq!(varint(&[0x80, 0x01]), Some((128, 2)));
        assert_eq!(varint(&[0x80, 0x80]), None);
        assert_eq!(varint(&[]), None);
    }

    /// Headers and tables cut short or filled with garbage: nothing, never a panic.
    #[test]
    fn garbage_tables_do_not_panic() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for len in [0usize, 4, 8, 16, 64, 200, 4096] {
            for magic in [0xffff_fffau32, 0xffff_fff0, 0xffff_fff1] {
                let mut data = vec![0u8; len];
                for b in data.iter_mut() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    *b = seed as u8;
                }
                if len >= 8 {
                    data[..4].copy_from_slice(&magic.to_le_bytes());
                    data[6] = 1;
                    data[7] = 8;
                }
                if let Some(t) = GoPcln::parse(&data, 0x401000) {
                    for pc in (0..0x10_0000u64).step_by(0x3333) {
                        let _ = t.lookup(pc);
                    }
                }
            }
        }
    }
}
