//! The loopback-only listen rule (reference §3.10) as a table.

use crabbox_egress::proxy::{ListenError, validate_listen};

#[test]
fn loopback_listen_table() {
    let ok = [
        ("127.0.0.1:3128", "127.0.0.1:3128"),
        ("127.1.2.3:8080", "127.1.2.3:8080"),
        ("localhost:3128", "127.0.0.1:3128"),
        ("LOCALHOST:1", "127.0.0.1:1"),
        ("[::1]:3128", "[::1]:3128"),
        ("127.0.0.1:0", "127.0.0.1:0"),
    ];
    for (input, want) in ok {
        assert_eq!(validate_listen(input).unwrap().to_string(), want, "{input}");
    }
    let not_loopback = [
        "0.0.0.0:3128",
        ":3128",
        "[::]:3128",
        "192.168.1.10:3128",
        "10.0.0.1:3128",
        "example.com:3128",
        "[::ffff:127.0.0.1]:3128",
    ];
    for input in not_loopback {
        assert!(
            matches!(validate_listen(input), Err(ListenError::NotLoopback(_))),
            "{input}"
        );
    }
    for input in [
        "127.0.0.1",
        "127.0.0.1:",
        "127.0.0.1:http",
        "::1:3128",
        "127.0.0.1:70000",
    ] {
        assert!(validate_listen(input).is_err(), "{input}");
    }
    assert!(
        validate_listen("0.0.0.0:3128")
            .unwrap_err()
            .to_string()
            .contains("loopback")
    );
}
