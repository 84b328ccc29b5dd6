//! The audit log: one JSON object per line for every action and every release check.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::error;

use super::Daemon;

pub(super) fn open(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

impl Daemon {
    pub(super) fn audit(&mut self, line: serde_json::Value) {
        let Some(f) = self.audit.as_mut() else { return };
        if let Err(e) = writeln!(f, "{line}").and_then(|()| f.flush()) {
            error!(error = %e, "cannot write the audit log");
        }
    }
}

pub(super) fn unix_ts() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
