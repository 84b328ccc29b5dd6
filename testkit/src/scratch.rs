//! Private directories and policy files for one test, and the fd limit.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A private directory for one test (policy, audit log, sockets) under the temp dir, with
/// mode `mode`; removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(test: &str, mode: u32) -> Scratch {
        let dir = std::env::temp_dir().join(format!("cwreap-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .expect("chmod scratch");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Write a policy the way root must keep it: owned by us (root), mode 0600.
pub fn write_policy(path: &Path, text: &str) {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("open policy");
    f.write_all(text.as_bytes()).expect("write policy");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600 policy");
}

/// Let this process (and the children it starts) use its hard fd limit.
pub fn raise_nofile() {
    use rustix::process::{Resource, Rlimit};
    let hard = rustix::process::getrlimit(Resource::Nofile).maximum;
    rustix::process::setrlimit(
        Resource::Nofile,
        Rlimit {
            current: hard,
            maximum: hard,
        },
    )
    .expect("raise RLIMIT_NOFILE to the hard limit");
}
