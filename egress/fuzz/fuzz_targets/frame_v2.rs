//! Fuzz target: the v2 open request and reply decoders must never panic, never over-consume, and round-trip what they accept.
#![no_main]

use crabbox_egress::frame_v2::{OpenReply, OpenRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = OpenRequest::decode(data) {
        assert!(used <= data.len());
        assert_eq!(req.encode(), &data[..used]);
    }
    if let Ok(Some((reply, used))) = OpenReply::decode(data) {
        assert!(used <= data.len());
        assert_eq!(reply.encode(), &data[..used]);
    }
});
