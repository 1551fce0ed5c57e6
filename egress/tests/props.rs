//! Property tests: codec round-trips (v1 JSON frames, v2 open request/reply), request-head parsing, the chunked scanner, and no panics on arbitrary input.

use bytes::Bytes;
use crabbox_egress::frame_v1::{self, TextFrame};
use crabbox_egress::frame_v2::{OpenCode, OpenReply, OpenRequest};
use crabbox_egress::proxy::request::{Action, ChunkedScanner, parse_head};
use proptest::prelude::*;

fn text_frame() -> impl Strategy<Value = TextFrame> {
    let id = "[a-zA-Z0-9_:.-]{1,40}";
    prop_oneof![
        (id, "[a-z0-9.-]{1,60}", "[0-9]{1,5}").prop_map(|(id, host, port)| TextFrame::Open {
            id,
            host,
            port
        }),
        id.prop_map(|id| TextFrame::OpenOk { id }),
        (id, "\\PC{1,80}").prop_map(|(id, error)| TextFrame::Error { id, error }),
        (id, proptest::collection::vec(any::<u8>(), 0..4096)).prop_map(|(id, b)| TextFrame::Data {
            id,
            body: Bytes::from(b)
        }),
        id.prop_map(|id| TextFrame::Close { id }),
    ]
}

proptest! {
    #[test]
    fn v1_frames_round_trip(frame in text_frame()) {
        let text = frame_v1::encode(&frame);
        prop_assert_eq!(frame_v1::decode(&text).unwrap(), frame);
    }

    #[test]
    fn v2_open_request_round_trips(host in "[a-z0-9.-]{1,253}", port in 1u16..) {
        let req = OpenRequest { host, port };
        let mut enc = req.encode();
        enc.extend_from_slice(b"trailing stream bytes");
        let (back, used) = OpenRequest::decode(&enc).unwrap().unwrap();
        prop_assert_eq!(back, req.clone());
        prop_assert_eq!(used, req.encode().len());
        for cut in 0..req.encode().len() {
            prop_assert_eq!(OpenRequest::decode(&enc[..cut]), Ok(None));
        }
    }

    #[test]
    fn v2_open_reply_round_trips(code in 0u8..7, message in "\\PC{0,80}") {
        let code = [OpenCode::Ok, OpenCode::NotAllowed, OpenCode::NoPublicAddress, OpenCode::ConnectFailed,
                    OpenCode::TimedOut, OpenCode::BadRequest, OpenCode::Overloaded][code as usize];
        let reply = OpenReply { code, message };
        let enc = reply.encode();
        let (back, used) = OpenReply::decode(&enc).unwrap().unwrap();
        prop_assert_eq!(used, enc.len());
        prop_assert_eq!(back, reply);
    }

    #[test]
    fn request_heads_parse_to_their_destination(
        host in "[a-z][a-z0-9-]{0,20}(\\.[a-z0-9-]{1,10}){0,3}",
        port in 1u16..,
        path in "/[a-zA-Z0-9/_.-]{0,30}",
        connect in any::<bool>(),
    ) {
        let raw = if connect {
            format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\nextra")
        } else {
            format!("GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\nextra")
        };
        let (head, len) = parse_head(raw.as_bytes()).unwrap().unwrap();
        prop_assert_eq!(&raw[len..], "extra");
        match head.action().unwrap() {
            Action::Tunnel(d) => { prop_assert!(connect); prop_assert_eq!((d.host, d.port), (host, port)); }
            Action::Forward { dest, path: p, .. } => {
                prop_assert!(!connect);
                prop_assert_eq!((dest.host, dest.port), (host, port));
                prop_assert_eq!(p, path);
            }
        }
        for cut in 0..len {
            prop_assert!(parse_head(&raw.as_bytes()[..cut]).unwrap().is_none());
        }
    }

    #[test]
    fn chunked_scanner_finds_the_end_at_any_split(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..6),
        split in any::<prop::sample::Index>(),
    ) {
        let mut body = Vec::new();
        for c in &chunks {
            body.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            body.extend_from_slice(c);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        let end = body.len();
        body.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let at = split.index(body.len() + 1);
        let mut s = ChunkedScanner::new();
        let found = match s.feed(&body[..at]).unwrap() {
            Some(n) => n,
            None => at + s.feed(&body[at..]).unwrap().unwrap(),
        };
        prop_assert_eq!(found, end);
    }

    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = OpenRequest::decode(&bytes);
        let _ = OpenReply::decode(&bytes);
        let _ = parse_head(&bytes).map(|h| h.map(|(h, _)| (h.action(), h.body_framing())));
        let _ = ChunkedScanner::new().feed(&bytes);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = frame_v1::decode(text);
        }
    }
}
