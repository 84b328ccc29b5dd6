//! The section names of an ELF executable, read from its section header table and its
//! section-name string table: a few small reads at offsets the header gives, never the whole
//! file. `explain` looks for Go's sections in them (a Go binary is static and maps no
//! library that would name its runtime).
//!
//! Everything read is bounded ([`MAX_SECTIONS`], [`MAX_NAMES`]), and a file that is not what
//! its header claims is `None`, never a panic.

use std::io;

/// At most this many section headers are read (Go binaries have about 25).
pub const MAX_SECTIONS: usize = 4096;
/// At most this many bytes of section names.
pub const MAX_NAMES: usize = 1 << 20;

/// The layout of one ELF class (32- or 64-bit).
struct Class {
    /// Offsets in the file header of e_shoff, e_shentsize, e_shnum, e_shstrndx.
    shoff: usize,
    shentsize: usize,
    shnum: usize,
    shstrndx: usize,
    /// Width of e_shoff, sh_offset and sh_size.
    word: usize,
    /// Offsets in a section header of sh_name, sh_offset and sh_size.
    sh_name: usize,
    sh_offset: usize,
    sh_size: usize,
    /// The smallest section header.
    sh_min: usize,
}

const ELF32: Class = Class {
    shoff: 0x20,
    shentsize: 0x2e,
    shnum: 0x30,
    shstrndx: 0x32,
    word: 4,
    sh_name: 0,
    sh_offset: 16,
    sh_size: 20,
    sh_min: 40,
};

const ELF64: Class = Class {
    shoff: 0x28,
    shentsize: 0x3a,
    shnum: 0x3c,
    shstrndx: 0x3e,
    word: 8,
    sh_name: 0,
    sh_offset: 24,
    sh_size: 32,
    sh_min: 64,
};

/// The file header is read in one piece of this size (the 64-bit header is 64 bytes).
pub const HEADER: usize = 64;

/// An unsigned integer of `width` bytes at `at` in `b`, in the file's byte order.
fn uint(b: &[u8], at: usize, width: usize, little: bool) -> Option<u64> {
    let bytes = b.get(at..at.checked_add(width)?)?;
    let mut v: u64 = 0;
    for i in 0..width {
        let byte = if little {
            bytes[width - 1 - i]
        } else {
            bytes[i]
        };
        v = (v << 8) | u64::from(byte);
    }
    Some(v)
}

/// The section names of the ELF file whose first [`HEADER`] bytes are `header`; `read_at`
/// reads `len` bytes at an offset of the file (fewer at its end). Ok(None) when it is not
/// an ELF file, or its tables are missing, too large or out of place.
pub fn section_names(
    header: &[u8],
    mut read_at: impl FnMut(u64, usize) -> io::Result<Vec<u8>>,
) -> io::Result<Option<Vec<String>>> {
    if header.get(..4) != Some(b"\x7fELF".as_slice()) {
        return Ok(None);
    }
    let class = match header.get(4) {
        Some(1) => &ELF32,
        Some(2) => &ELF64,
        _ => return Ok(None),
    };
    let little = match header.get(5) {
        Some(1) => true,
        Some(2) => false,
        _ => return Ok(None),
    };
    let field = |at, width| uint(header, at, width, little);
    let (Some(shoff), Some(entsize), Some(count), Some(strndx)) = (
        field(class.shoff, class.word),
        field(class.shentsize, 2),
        field(class.shnum, 2),
        field(class.shstrndx, 2),
    ) else {
        return Ok(None);
    };
    let (Ok(entsize), Ok(count), Ok(strndx)) = (
        usize::try_from(entsize),
        usize::try_from(count),
        usize::try_from(strndx),
    ) else {
        return Ok(None);
    };
    // No table, extended numbering (more than 0xff00 sections), headers of an odd size, or
    // an index past the end.
    if shoff == 0
        || count == 0
        || count > MAX_SECTIONS
        || !(class.sh_min..=4 * class.sh_min).contains(&entsize)
        || strndx >= count
    {
        return Ok(None);
    }
    let table = read_at(shoff, entsize * count)?;
    if table.len() < entsize * count {
        return Ok(None);
    }
    let header_of = |i: usize| &table[i * entsize..(i + 1) * entsize];
    let strtab = header_of(strndx);
    let (Some(str_off), Some(str_size)) = (
        uint(strtab, class.sh_offset, class.word, little),
        uint(strtab, class.sh_size, class.word, little),
    ) else {
        return Ok(None);
    };
    let Ok(str_size) = usize::try_from(str_size) else {
        return Ok(None);
    };
    if str_size > MAX_NAMES {
        return Ok(None);
    }
    let names = read_at(str_off, str_size)?;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let Some(at) =
            uint(header_of(i), class.sh_name, 4, little).and_then(|a| usize::try_from(a).ok())
        else {
            return Ok(None);
        };
        let Some(rest) = names.get(at..) else {
            return Ok(None);
        };
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        out.push(String::from_utf8_lossy(&rest[..end]).into_owned());
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A little-endian 64-bit ELF file with three sections: the null one, `.go.buildinfo`
    /// and the section-name table.
    fn go_like() -> Vec<u8> {
        let names = b"\0.go.buildinfo\0.shstrtab\0";
        let mut f = vec![0u8; 64];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // EI_CLASS: ELFCLASS64
        f[5] = 1; // EI_DATA: little-endian
        f[6] = 1; // EI_VERSION
        let names_at = 64u64;
        let shoff = names_at + names.len() as u64;
        f[0x28..0x30].copy_from_slice(&shoff.to_le_bytes()); // e_shoff
        f[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        f[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes()); // e_shnum
        f[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes()); // e_shstrndx
        f.extend_from_slice(names);
        for (name, offset, size) in [(0u32, 0u64, 0u64), (1, 0, 0), (15, names_at, 25)] {
            let mut sh = vec![0u8; 64];
            sh[0..4].copy_from_slice(&name.to_le_bytes()); // sh_name
            sh[24..32].copy_from_slice(&offset.to_le_bytes()); // sh_offset
            sh[32..40].copy_from_slice(&size.to_le_bytes()); // sh_size
            f.extend_from_slice(&sh);
        }
        f
    }

    fn names_of(file: &[u8]) -> Option<Vec<String>> {
        let header = &file[..HEADER.min(file.len())];
        section_names(header, |at, len| {
            let at = usize::try_from(at).unwrap_or(usize::MAX);
            Ok(file
                .get(at..)
                .map(|r| r[..len.min(r.len())].to_vec())
                .unwrap_or_default())
        })
        .expect("in-memory reads do not fail")
    }

    #[test]
    fn names_from_the_section_name_table() {
        assert_eq!(
            names_of(&go_like()),
            Some(vec![
                String::new(),
                ".go.buildinfo".to_string(),
                ".shstrtab".to_string()
            ])
        );
    }

    #[test]
    fn not_elf_or_broken_is_none() {
        assert_eq!(names_of(b"#!/bin/sh\n"), None);
        let mut f = go_like();
        f[4] = 3; // no such class
        assert_eq!(names_of(&f), None);
        let mut f = go_like();
        f[0x3e] = 9; // e_shstrndx past the table
        assert_eq!(names_of(&f), None);
        let f = go_like();
        assert_eq!(names_of(&f[..f.len() - 10]), None, "a cut table");
        let mut f = go_like();
        f[0x3c] = 0; // e_shnum 0: extended numbering, not read
        f[0x3d] = 0;
        assert_eq!(names_of(&f), None);
    }

    #[test]
    fn this_test_binary_is_elf_and_not_go() {
        use std::io::Read;
        use std::os::unix::fs::FileExt;
        let mut file = std::fs::File::open("/proc/self/exe").expect("open own exe");
        let mut header = vec![0u8; HEADER];
        file.read_exact(&mut header).expect("header");
        let names = section_names(&header, |at, len| {
            let mut buf = vec![0u8; len];
            let n = file.read_at(&mut buf, at)?;
            buf.truncate(n);
            Ok(buf)
        })
        .expect("read")
        .expect("an ELF file");
        assert!(names.iter().any(|n| n == ".text"), "{names:?}");
        // `.got` is every linker's; Go's own are `.go.buildinfo`, `.note.go.buildid` and
        // `.gopclntab`.
        assert!(
            !names
                .iter()
                .any(|n| n.starts_with(".go.") || n.contains(".go.") || n == ".gopclntab"),
            "{names:?}"
        );
    }
}
