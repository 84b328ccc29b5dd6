//! What `explain` reads to name the runtime a process runs, and for a JVM its collections:
//! the executable's path, the files it maps (/proc/PID/maps), the executable's ELF section
//! names, and the JVM's perf data file (hsperfdata).
//!
//! Each of these can be held up by the target or by a file system: reading maps takes the
//! target's mmap lock (see [`super::slow`]), and the executable and the perf data file may
//! sit on a FUSE mount whose server never answers. So every read runs under the deadline
//! of [`SlowReads`]; past it the caller gets `TimedOut` and names no runtime.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::ProcFs;
use super::elf;
use super::hsperf::{JvmGc, parse_jvm_gc};
use super::parse::{in_file, parse_maps_line, parse_status};
use super::slow::{SLOW_READ_DEADLINE, SlowReads};

/// A perf data file is 32 KiB by default (`-XX:PerfDataMemorySize`); larger ones are not
/// read.
const MAX_PERF_FILE: u64 = 1 << 20;

/// What a process shows of the runtime it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeClues {
    /// The executable's path, as /proc/PID/exe shows it.
    pub exe: String,
    /// The files mapped into the process, each once, in the order of its map.
    pub mapped: Vec<String>,
    /// The executable's ELF section names; None when it could not be read as ELF.
    pub exe_sections: Option<Vec<String>>,
}

/// The files of a /proc/PID/maps text, each once, in order.
pub fn mapped_files(maps: &str) -> Vec<String> {
    let mut seen = HashSet::new();
    maps.lines()
        .filter_map(parse_maps_line)
        .map(|(_, _, _, path)| path)
        .filter(|p| p.starts_with('/') && seen.insert(*p))
        .map(str::to_owned)
        .collect()
}

/// The section names of the ELF file at `path`.
fn section_names_of(path: &Path) -> io::Result<Option<Vec<String>>> {
    let mut file = fs::File::open(path)?;
    let mut header = Vec::with_capacity(elf::HEADER);
    file.by_ref()
        .take(elf::HEADER as u64)
        .read_to_end(&mut header)?;
    elf::section_names(&header, |at, len| {
        let mut buf = vec![0u8; len];
        let mut got = 0;
        while got < len {
            match file.read_at(&mut buf[got..], at.saturating_add(got as u64)) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        buf.truncate(got);
        Ok(buf)
    })
}

/// The perf data file of JVM `nspid` (its pid in its own namespace) owned by `uid`, under
/// the process's /tmp: `hsperfdata_USER/NSPID`, the user being whoever the JVM ran as.
/// None when there is none (the JVM runs with -XX:-UsePerfData, or is no JVM). A file
/// that is no regular file of `uid` is not read: not a FIFO, not a link, not someone
/// else's.
fn perf_file(tmp: &Path, nspid: i32, uid: u32) -> io::Result<Option<Vec<u8>>> {
    let leaf = nspid.to_string();
    for entry in fs::read_dir(tmp)? {
        let Ok(entry) = entry else { continue };
        if !entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(b"hsperfdata_")
        {
            continue;
        }
        let path: PathBuf = entry.path().join(&leaf);
        let Ok(file) = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
        else {
            continue;
        };
        let meta = file.metadata()?;
        if !meta.is_file() || meta.uid() != uid || meta.len() > MAX_PERF_FILE {
            continue;
        }
        let mut bytes = Vec::new();
        file.take(MAX_PERF_FILE).read_to_end(&mut bytes)?;
        return Ok(Some(bytes));
    }
    Ok(None)
}

impl ProcFs {
    /// The executable, the mapped files and the executable's ELF sections of `pid`, each
    /// read under the deadline: `TimedOut` when the map did not come back in time (the
    /// sections alone are then None).
    pub fn runtime_clues_within(&self, slow: &SlowReads, pid: i32) -> io::Result<RuntimeClues> {
        let exe = self.exe(pid)?;
        let mapped = mapped_files(&self.maps_within(slow, pid)?);
        let me = self.clone();
        let exe_sections = slow
            .read(pid, SLOW_READ_DEADLINE, move || {
                me.leader_or_thread(pid, "exe", section_names_of, |_| true)
            })
            .ok()
            .flatten();
        Ok(RuntimeClues {
            exe,
            mapped,
            exe_sections,
        })
    }

    /// The collections of JVM `pid`, from its perf data file, read under the deadline.
    /// Ok(None) when it publishes none; `InvalidData` when the file is not what HotSpot
    /// writes.
    pub fn jvm_gc_within(&self, slow: &SlowReads, pid: i32) -> io::Result<Option<JvmGc>> {
        let path = self.pid_path(pid, "status");
        let status = parse_status(&fs::read(&path)?).map_err(|e| in_file(&path, e))?;
        let nspid = status
            .nspid
            .as_ref()
            .and_then(|ids| ids.last().copied())
            .unwrap_or(pid);
        let tmp = self.pid_path(pid, "root/tmp");
        let uid = status.euid;
        let Some(bytes) =
            slow.read(pid, SLOW_READ_DEADLINE, move || perf_file(&tmp, nspid, uid))?
        else {
            return Ok(None);
        };
        parse_jvm_gc(&bytes)
            .map(Some)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_files_once_each_in_order() {
        let maps = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 fd:01 1234 /usr/bin/python3.11
55d0c0a01000-55d0c0a02000 r-xp 00001000 fd:01 1234 /usr/bin/python3.11
7f0000000000-7f0000001000 rw-p 00000000 00:00 0
7f0000001000-7f0000002000 r-xp 00000000 fd:01 99   /usr/lib/jvm/lib/server/libjvm.so
7f0000002000-7f0000003000 r--p 00000000 fd:01 98   /tmp/x (deleted)
7ffc00000000-7ffc00001000 rw-p 00000000 00:00 0    [stack]
garbage
";
        assert_eq!(
            mapped_files(maps),
            [
                "/usr/bin/python3.11",
                "/usr/lib/jvm/lib/server/libjvm.so",
                "/tmp/x (deleted)"
            ]
        );
    }

    #[test]
    fn own_clues_name_this_executable() {
        let proc = ProcFs::default();
        let me = i32::try_from(std::process::id()).expect("pid");
        let clues = proc
            .runtime_clues_within(&SlowReads::default(), me)
            .expect("own clues");
        assert_eq!(clues.mapped.first(), Some(&clues.exe), "{clues:?}");
        let sections = clues.exe_sections.expect("an ELF executable");
        assert!(sections.iter().any(|s| s == ".text"), "{sections:?}");
    }

    /// A JVM in a pid namespace: its perf data file is named by its pid there (the last
    /// NSpid), under its own root's /tmp.
    #[test]
    fn a_jvms_perf_file_is_found_under_its_root_by_its_namespace_pid() {
        let dir = std::env::temp_dir().join(format!("cwreap-jvmroot-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (proc_root, fs_root) = (dir.join("proc"), dir.join("fs"));
        let user = fs_root.join("tmp/hsperfdata_app");
        fs::create_dir_all(proc_root.join("77")).expect("mkdir");
        fs::create_dir_all(&user).expect("mkdir");
        std::os::unix::fs::symlink(&fs_root, proc_root.join("77/root")).expect("symlink");
        let status = fs::read_to_string("/proc/self/status").expect("own status");
        let status: String = status
            .lines()
            .map(|l| {
                if l.starts_with("NSpid:") {
                    "NSpid:\t77\t5".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .map(|l| l + "\n")
            .collect();
        fs::write(proc_root.join("77/status"), status).expect("write status");
        let proc = ProcFs::new(&proc_root);
        let read = || proc.jvm_gc_within(&SlowReads::default(), 77);
        assert_eq!(read().expect("no file"), None);
        // Named by the host pid: not it.
        fs::write(user.join("77"), b"not perf data").expect("write");
        assert_eq!(read().expect("no file"), None);
        // Named by the namespace pid: found, read and parsed (this one is no perf data).
        fs::write(user.join("5"), b"not perf data").expect("write");
        assert_eq!(
            read().expect_err("garbage").kind(),
            io::ErrorKind::InvalidData
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_perf_file_must_be_a_regular_file_of_the_owner() {
        let dir = std::env::temp_dir().join(format!("cwreap-hsperf-{}", std::process::id()));
        let user = dir.join("hsperfdata_someone");
        fs::create_dir_all(&user).expect("mkdir");
        let me = own_uid(&dir);
        fs::write(user.join("42"), b"data").expect("write");
        std::os::unix::fs::symlink(user.join("42"), user.join("43")).expect("symlink");
        assert_eq!(
            perf_file(&dir, 42, me).expect("read"),
            Some(b"data".to_vec())
        );
        assert_eq!(
            perf_file(&dir, 42, me + 1).expect("read"),
            None,
            "another uid"
        );
        assert_eq!(perf_file(&dir, 43, me).expect("read"), None, "a link");
        assert_eq!(perf_file(&dir, 44, me).expect("read"), None, "no such pid");
        let _ = fs::remove_dir_all(&dir);
    }

    /// Our uid, as the owner of a directory we just made.
    fn own_uid(dir: &Path) -> u32 {
        fs::metadata(dir).expect("stat").uid()
    }
}
