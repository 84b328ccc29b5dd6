//! Which discovery the daemon runs, decided once at start: the kernel's events (BPF
//! tracepoints on the state change, exact entry times, no dump per cycle) or polling (a
//! sock_diag dump every cycle). `discovery: auto` takes events when the programs load and
//! says once why not otherwise; `events` refuses to start without them; `poll` never tries.
//!
//! With events, the entry times are pinned on a BPF filesystem for `scan`, `reap` and
//! `explain` (`/sys/fs/bpf/cwreap`, or `$CWREAP_BPF_DIR`). Run as root outside systemd, the
//! daemon mounts the BPF filesystem on /sys/fs/bpf where none is, as systemd does at boot;
//! under systemd the unit's drop-in provides the directory. Where the pins cannot be made,
//! events still run and the command line falls back to its estimates.

use tracing::{info, warn};

use cwreap_linux::bpf::{Options, Unavailable};
use cwreap_linux::kernel::Linux;
use cwreap_linux::kernel::events::{pin_dir, prepare_pins};

use crate::shared::config::{Config, Discovery};
use crate::shared::usage::UsageError;

/// The kernel the daemon runs on, with events loaded when the policy wants and can.
pub fn kernel(cfg: &Config) -> Result<Linux, UsageError> {
    let mut k = Linux::default();
    if cfg.discovery == Discovery::Poll {
        info!(
            mode = "poll",
            "discovery: a sock_diag dump every cycle (`discovery: poll`)"
        );
        return Ok(k);
    }
    let dir = pin_dir();
    let mut no_pins = match prepare_pins(&dir) {
        Ok(mounted) => {
            if mounted {
                info!(path = %dir.display(), "mounted a BPF filesystem for the pins, as systemd does at boot");
            }
            None
        }
        Err(why) => Some(why),
    };
    let with_pins = Options {
        pin_dir: no_pins.is_none().then(|| dir.clone()),
        ..Options::default()
    };
    let mut loaded = k.enable_events(&with_pins);
    if let Err(e @ (Unavailable::NoBpffs { .. } | Unavailable::PinBusy { .. })) = &loaded {
        no_pins = Some(e.to_string());
        loaded = k.enable_events(&Options::default());
    } else if let Err(e) = &loaded
        && with_pins.pin_dir.is_some()
        && !matches!(
            e,
            Unavailable::KernelTooOld { .. }
                | Unavailable::NoBtf { .. }
                | Unavailable::MissingCapabilities { .. }
        )
    {
        // Pinning may have been what failed (a directory the service user cannot write):
        // the events without the pins are still worth having.
        let why = e.to_string();
        if k.enable_events(&Options::default()).is_ok() {
            no_pins = Some(why);
            loaded = Ok(());
        }
    }
    match loaded {
        Ok(()) => {
            match no_pins {
                None => info!(mode = "events", pins = %dir.display(),
                    "discovery: the kernel's events (BPF); exact entry times, shared with the command line"),
                Some(why) => warn!(mode = "events", reason = %why,
                    "discovery: the kernel's events (BPF); the entry times are not shared with the command line, which estimates ages"),
            }
            Ok(k)
        }
        Err(e) if cfg.discovery == Discovery::Events => Err(UsageError(format!(
            "`discovery: events`, but the BPF programs cannot be loaded: {e}; use `discovery: auto` to fall back to polling"
        ))),
        Err(e) => {
            warn!(mode = "poll", reason = %e,
                "discovery: a sock_diag dump every cycle; the kernel's events (BPF) cannot be used");
            Ok(k)
        }
    }
}
