//! Fuzz target: the v1 JSON frame decoder must never panic, and what it decodes must re-encode to an equal frame.
#![no_main]

use crabbox_egress::frame_v1::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(frame) = decode(text) {
        let again = decode(&encode(&frame)).expect("re-encoded frame must decode");
        assert_eq!(again, frame);
    }
});
