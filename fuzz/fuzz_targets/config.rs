//! Any text given as a policy file: validation returns Ok or a positioned error, never
//! panics; an accepted policy's `describe()` output is itself an accepted policy; and an
//! accepted policy runs three cycles (on the recording kernel, whose clock moves by the
//! interval between them) without a panic, whatever its values.
#![no_main]

use std::sync::atomic::AtomicBool;

use cwreap::daemon::Daemon;
use cwreap::daemon::metrics::Health;
use cwreap_linux::kernel::fake::{FakeKernel, Process};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match cwreap::shared::config::parse(text, "fuzz.yaml") {
        Ok(cfg) => {
            let again = cwreap::shared::config::parse(&cfg.describe(), "described.yaml");
            assert!(again.is_ok(), "describe() produced an invalid policy: {again:?}");
            let k = FakeKernel::new();
            k.spawn(Process::new(100, "api").files(50));
            k.close_wait_many(100, 10, 3, "10.0.0.1:8080");
            // Nothing of the fuzzed text may write on this machine.
            let mut cfg = cfg;
            cfg.audit_log = None;
            let interval = cfg.interval;
            let Ok(mut d) = Daemon::with_kernel(k, cfg, false, Health::default()) else {
                return;
            };
            for _ in 0..3 {
                d.cycle(&AtomicBool::new(false));
                d.kernel().advance(interval);
            }
        }
        Err(e) => {
            // The message is one line naming the file.
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.yaml"), "{msg}");
        }
    }
});
