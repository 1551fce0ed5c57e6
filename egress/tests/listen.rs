//! The loopback-only listen rule (reference §3.10) as a table, and the accept queue of `listen::bind`.

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

/// `bind`'s accept queue holds a burst far past `TcpListener::bind`'s 128:
/// 600 dials to a listener that accepts none of them all complete (each
/// one the kernel queued). With a 128-deep queue the rest are dropped and
/// their SYN retries are dropped too, so they never connect.
#[tokio::test]
async fn bind_queues_a_burst_of_600_connections_without_accepting() {
    // The kernel caps the queue at net.core.somaxconn (4096 since Linux 5.4).
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if somaxconn < 1024 {
        eprintln!("skipped: net.core.somaxconn is {somaxconn}, below the 600 this test queues");
        return;
    }
    let listener = crabbox_egress::proxy::listen::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let dials = (0..600).map(|_| {
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tokio::net::TcpStream::connect(addr),
        )
    });
    let results = futures::future::join_all(dials).await;
    let connected = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(connected, 600, "dials queued without an accept");
    drop(listener);
}
