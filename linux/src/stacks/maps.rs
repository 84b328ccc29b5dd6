//! /proc/PID/maps: which file (or anonymous region) holds an address, and how to open that
//! file from outside the target's mount namespace.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub start: u64,
    pub end: u64,
    pub executable: bool,
    /// Offset in the file of the byte mapped at `start`.
    pub offset: u64,
    /// Device (major << 32 | minor) and inode of the file; (0, 0) for anonymous memory.
    pub dev: u64,
    pub inode: u64,
    /// The path as the kernel shows it (in the target's mount namespace), without a
    /// " (deleted)" suffix; empty for anonymous memory, "[vdso]" and the like otherwise.
    pub path: String,
}

impl Mapping {
    /// Whether a regular file backs this mapping.
    pub fn file_backed(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// Parse one line; `None` for a line that is not of the kernel's form.
pub(crate) fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let (major, minor) = fields.next()?.split_once(':')?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end <= start || perms.len() != 4 {
        return None;
    }
    Some(Mapping {
        start,
        end,
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: (u64::from_str_radix(major, 16).ok()? << 32) | u64::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        path: path.to_string(),
    })
}

/// The mappings of a process, in address order; lines not of the kernel's form are skipped.
pub(crate) fn parse(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = text.lines().filter_map(parse_line).collect();
    maps.sort_by_key(|m| m.start);
    maps
}

pub(crate) fn read(pid: u32) -> io::Result<Vec<Mapping>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    Ok(parse(&text))
}

/// The mapping holding `addr`, if any (`maps` in address order).
pub(crate) fn find(maps: &[Mapping], addr: u64) -> Option<&Mapping> {
    let i = maps.partition_point(|m| m.start <= addr);
    let m = maps.get(i.checked_sub(1)?)?;
    m.contains(addr).then_some(m)
}

/// The size and modification time of the file behind `m` now: a file rewritten in place
/// keeps its inode, not these.
pub(crate) fn stamp(pid: u32, m: &Mapping) -> Option<(u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let direct = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
    let md = std::fs::metadata(direct)
        .or_else(|_| std::fs::metadata(format!("/proc/{pid}/root{}", m.path)))
        .ok()?;
    Some((md.len(), md.mtime(), md.mtime_nsec()))
}

/// The largest file read whole for its symbols or unwind tables.
const MAX_FILE: u64 = 2 << 30;

/// Read the file behind `m`: through /proc/PID/map_files (the very file mapped, even if
/// deleted or in another mount namespace), else through /proc/PID/root and the path, checked
/// to be the same inode.
pub(crate) fn read_file(pid: u32, m: &Mapping) -> io::Result<Vec<u8>> {
    let direct = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
    let file = match File::open(&direct) {
        Ok(f) => f,
        Err(_) => {
            let rooted = PathBuf::from(format!("/proc/{pid}/root{}", m.path));
            let f = File::open(&rooted)?;
            let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata()?);
            if ino != m.inode {
                return Err(io::Error::other(format!(
                    "{} is inode {ino}, but the process maps inode {}",
                    rooted.display(),
                    m.inode
                )));
            }
            f
        }
    };
    let len = file.metadata()?.len();
    if len > MAX_FILE {
        return Err(io::Error::other(format!(
            "{} is {len} bytes: too large",
            m.path
        )));
    }
    let mut data = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    file.take(MAX_FILE).read_to_end(&mut data)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_lines_and_skips_garbage() {
        let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234                       /usr/bin/x
55d0c0a01000-55d0c0a02000 r-xp 00001000 fd:01 1234                       /usr/bin/x (deleted)
7ffd1000-7ffd3000 r-xp 00000000 00:00 0                                  [vdso]
garbage
1-0 r-xp 0 0:0 0
7f0000000000-7f0000001000 rwxp 00000000 00:00 0 \n";
        let maps = parse(text);
        assert_eq!(maps.len(), 4, "{maps:?}");
        let x = find(&maps, 0x55d0c0a01800).expect("text mapping");
        assert!(x.executable && x.file_backed());
        assert_eq!((x.offset, x.inode, x.dev), (0x1000, 1234, (0xfd << 32) | 1));
        assert_eq!(x.path, "/usr/bin/x");
        assert!(!find(&maps, 0x7ffd1000).expect("vdso").file_backed());
        assert!(find(&maps, 0x10).is_none());
        assert!(find(&maps, 0x55d0c0a02000).is_none());
    }

    /// Without its map_files entry a file is read through /proc/PID/root and its path,
    /// and only if it is still the inode the process maps.
    #[test]
    fn reads_through_the_root_when_map_files_fails() {
        let pid = std::process::id();
        let own = read(pid).unwrap_or_default();
        let exe = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        let exe = exe.to_string_lossy().to_string();
        let m = own
            .iter()
            .find(|m| m.path == exe)
            .expect("this test's executable is mapped");
        let want = std::fs::read("/proc/self/exe").unwrap_or_default();
        assert_eq!(
            read_file(pid, m).ok(),
            Some(want.clone()),
            "through map_files"
        );
        let unmapped = Mapping {
            start: 0x10,
            end: 0x20,
            ..m.clone()
        };
        assert_eq!(
            read_file(pid, &unmapped).ok(),
            Some(want),
            "through /proc/PID/root"
        );
        let replaced = Mapping {
            inode: m.inode + 1,
            ..unmapped
        };
        let err = read_file(pid, &replaced).expect_err("another inode");
        assert!(err.to_string().contains("inode"), "{err}");
    }
}
