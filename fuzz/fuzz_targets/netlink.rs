//! Arbitrary bytes as a sock_diag datagram: parsed or rejected, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(chunk) = cwreap::netlink::parse_dump(data) {
        for s in &chunk.sockets {
            let _ = cwreap::snapshot::listener_for(s, &chunk.sockets);
        }
    }
});
