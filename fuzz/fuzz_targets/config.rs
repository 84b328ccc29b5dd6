//! Any text given as a policy file: validation returns Ok or a positioned error, never
//! panics, and an accepted policy's `describe()` output is itself an accepted policy.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = cwreap::shared::config::parse(text, "fuzz.yaml") {
        let again = cwreap::shared::config::parse(&cfg.describe(), "described.yaml");
        assert!(again.is_ok(), "describe() produced an invalid policy: {again:?}");
    } else if let Err(e) = cwreap::shared::config::parse(text, "fuzz.yaml") {
        // The message is one line naming the file.
        let msg = e.to_string();
        assert!(msg.starts_with("fuzz.yaml"), "{msg}");
    }
});
