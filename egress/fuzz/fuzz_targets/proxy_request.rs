//! Fuzz target: the proxy's request-head parser, destination logic, body framing, origin-form rewrite and chunked scanner must never panic.
#![no_main]

use crabbox_egress::proxy::request::{Action, ChunkedScanner, parse_head};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((head, len))) = parse_head(data) {
        assert!(len <= data.len());
        let _ = head.body_framing();
        if let Ok(Action::Forward { path, host_header, dest }) = head.action() {
            assert!(dest.port > 0);
            let _ = head.rewrite_origin_form(&path, &host_header);
        }
    }
    let mut scanner = ChunkedScanner::new();
    if let Ok(Some(end)) = scanner.feed(data) {
        assert!(end <= data.len());
    }
});
