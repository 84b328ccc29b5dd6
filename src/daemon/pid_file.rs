//! `cwreap run --pid-file PATH`: the daemon's own pid file, for `kill -HUP "$(cat PATH)"`.
//!
//! Written safely: the directory must be one only root or cwreap's own user can change
//! (a directory others may write to, sticky ones aside, would let them swap the file and
//! point a `kill` elsewhere); the pid goes into a new file of that directory, created
//! exclusively and without following a symlink (mode 0644), then renamed over `PATH`, so
//! a reader never sees a half-written file. At a clean exit it is removed, only if it
//! still holds our pid (another daemon may have taken the path over since).

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The daemon's pid file; see [`PidFile::remove`].
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

/// What is wrong with the directory a pid file would go in: None when it is safe.
fn dir_problem(dir: &Path, owners: &[u32]) -> Option<String> {
    let m = match fs::metadata(dir) {
        Ok(m) => m,
        Err(e) => return Some(format!("its directory {}: {e}", dir.display())),
    };
    if !m.is_dir() {
        return Some(format!("{} is not a directory", dir.display()));
    }
    if !owners.contains(&m.uid()) {
        return Some(format!(
            "its directory {} belongs to uid {}, not to root or cwreap's user, who could replace the file (chown root {})",
            dir.display(),
            m.uid(),
            dir.display()
        ));
    }
    let mode = m.mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Some(format!(
            "its directory {} is writable by others (mode {:04o}, not sticky), who could replace the file (chmod go-w {})",
            dir.display(),
            mode & 0o7777,
            dir.display()
        ));
    }
    None
}

impl PidFile {
    /// Write this process's pid to `path`. The error names the path and the problem.
    pub fn write(path: &Path) -> Result<PidFile, String> {
        let fail = |why: String| format!("--pid-file {}: {why}", path.display());
        let name = path
            .file_name()
            .ok_or_else(|| fail("names no file".into()))?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if let Some(problem) = dir_problem(&dir, &crate::shared::pid_file::trusted_owners()) {
            return Err(fail(problem));
        }
        let pid = std::process::id();
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".{pid}.tmp"));
        let tmp = dir.join(tmp_name);
        // A leftover of an earlier daemon with our pid (it crashed between create and
        // rename): ours to remove; anything else there makes the exclusive create fail.
        let _ = fs::remove_file(&tmp);
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .and_then(|mut f| {
                // The umask may have taken bits away: the file is readable by all.
                f.set_permissions(fs::Permissions::from_mode(0o644))?;
                f.write_all(format!("{pid}\n").as_bytes())?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(fail(format!("cannot write it: {e}")));
        }
        Ok(PidFile {
            path: path.to_path_buf(),
            pid,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the file if it still holds our pid; leave it to whoever rewrote it.
    pub fn remove(self) {
        let mut text = String::new();
        let ours = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&self.path)
            .and_then(|f| f.take(64).read_to_string(&mut text))
            .is_ok_and(|_| text.trim().parse::<u32>().ok() == Some(self.pid));
        if ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str, mode: u32) -> PathBuf {
        let d = std::env::temp_dir().join(format!("cwreap-pidfile-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("mkdir");
        fs::set_permissions(&d, fs::Permissions::from_mode(mode)).expect("chmod");
        d
    }

    #[test]
    fn written_with_our_pid_mode_0644_and_removed_only_while_ours() {
        let d = scratch("ok", 0o755);
        let p = d.join("cwreap.pid");
        fs::write(&p, "1\n").expect("stale file");
        let f = PidFile::write(&p).expect("write");
        let text = fs::read_to_string(&p).expect("read");
        assert_eq!(text, format!("{}\n", std::process::id()));
        let m = fs::symlink_metadata(&p).expect("stat");
        assert_eq!(m.mode() & 0o7777, 0o644);
        assert!(m.is_file());
        assert_eq!(
            fs::read_dir(&d).expect("ls").count(),
            1,
            "no temporary left"
        );
        f.remove();
        assert!(!p.exists());
        // Taken over by another daemon: left alone.
        let f = PidFile::write(&p).expect("write");
        fs::write(&p, "1\n").expect("rewrite");
        f.remove();
        assert!(p.exists());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_directory_others_may_write_is_refused_unless_sticky() {
        let d = scratch("open", 0o777);
        let e = PidFile::write(&d.join("x.pid")).expect_err("world-writable");
        assert!(e.contains(&d.display().to_string()), "{e}");
        assert!(e.contains("writable by others"), "{e}");
        fs::set_permissions(&d, fs::Permissions::from_mode(0o1777)).expect("chmod");
        PidFile::write(&d.join("x.pid"))
            .expect("sticky is fine")
            .remove();
        let _ = fs::remove_dir_all(&d);
    }
}
