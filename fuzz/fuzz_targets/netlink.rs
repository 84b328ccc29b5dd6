//! Arbitrary bytes as a sock_diag datagram (cwreap-linux's parser): parsed or rejected,
//! never a panic; and what parsed goes through cwreap's listener matching.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(chunk) = cwreap_linux::netlink::parse_dump(data) {
        for s in &chunk.sockets {
            let _ = cwreap::shared::attribute::listener_for(s, &chunk.sockets);
        }
    }
});
