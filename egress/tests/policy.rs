//! The host's rules as tables: allowlist matching and profiles, the public-address table, resolve-once pinning with a fake resolver, and the allow_private opt-in.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crabbox_egress::host::addr::is_public;
use crabbox_egress::host::dial::{DialError, Resolver, candidates};
use crabbox_egress::{Policy, PolicyError};

fn policy(allow: &[&str]) -> Policy {
    Policy::builder().allow(allow).build().unwrap()
}

#[test]
fn allowlist_matching_table() {
    let p = Policy::builder()
        .profile("Discord")
        .allow(["Example.org.", "10.1.2.3"])
        .allow_private(true)
        .build()
        .unwrap();
    let cases = [
        ("discord.com", true),
        ("DISCORD.com.", true),
        ("cdn.discord.com", true),
        ("a.b.discord.com", true),
        ("discord.com.evil.test", false),
        ("evildiscord.com", false),
        ("hcaptcha.com", true),
        ("example.org", true),
        ("www.example.org", false),
        ("10.1.2.3", true),
        ("10.1.2.4", false),
        ("slack.com", false),
        ("", false),
    ];
    for (host, want) in cases {
        assert_eq!(p.allows(host), want, "{host}");
    }
}

#[test]
fn profiles_merge_and_normalise() {
    let p = Policy::builder()
        .allow(["b.example, a.example", "B.EXAMPLE"])
        .profile("slack")
        .build()
        .unwrap();
    let listed: Vec<String> = p.patterns().iter().map(ToString::to_string).collect();
    assert_eq!(
        listed,
        [
            "b.example",
            "a.example",
            "slack.com",
            "*.slack.com",
            "slack-edge.com",
            "*.slack-edge.com"
        ]
    );
    assert_eq!(
        p.summary(),
        "profile=slack allow=b.example,a.example,slack.com,*.slack.com,slack-edge.com,*.slack-edge.com"
    );
    let custom = Policy::builder()
        .define_profile("work", ["*.corp.example"])
        .profile("work")
        .build()
        .unwrap();
    assert!(custom.allows("git.corp.example") && custom.allows("corp.example"));
}

#[test]
fn refuses_open_proxies_and_bad_patterns() {
    assert_eq!(Policy::builder().build().unwrap_err(), PolicyError::Empty);
    assert_eq!(
        Policy::builder().allow([" , "]).build().unwrap_err(),
        PolicyError::Empty
    );
    assert_eq!(
        Policy::builder().allow(["*"]).build().unwrap_err(),
        PolicyError::BareWildcard
    );
    assert!(
        PolicyError::Empty
            .to_string()
            .contains("refusing to start an open proxy")
    );
    assert!(matches!(
        Policy::builder().allow(["a*.example"]).build(),
        Err(PolicyError::InvalidPattern(_))
    ));
    assert!(matches!(
        Policy::builder().allow(["https://x"]).build(),
        Err(PolicyError::InvalidPattern(_))
    ));
    assert!(matches!(
        Policy::builder().profile("nope").build(),
        Err(PolicyError::UnknownProfile(_))
    ));
}

#[test]
fn public_address_table() {
    let cases = [
        ("8.8.8.8", true),
        ("1.1.1.1", true),
        ("0.0.0.0", false),
        ("0.1.2.3", false),
        ("10.0.0.1", false),
        ("100.64.0.1", false),
        ("127.0.0.1", false),
        ("169.254.169.254", false),
        ("172.16.0.1", false),
        ("172.32.0.1", true),
        ("192.0.0.8", false),
        ("192.0.2.1", false),
        ("192.88.99.1", false),
        ("192.168.1.1", false),
        ("198.18.0.1", false),
        ("198.51.100.1", false),
        ("203.0.113.1", false),
        ("224.0.0.1", false),
        ("240.0.0.1", false),
        ("255.255.255.255", false),
        ("2606:4700:4700::1111", true),
        ("::", false),
        ("::1", false),
        ("::8.8.8.8", false),
        ("::ffff:8.8.8.8", true),
        ("::ffff:127.0.0.1", false),
        ("64:ff9b::808:808", true),
        ("64:ff9b::a00:1", false),
        ("64:ff9b:1::1", false),
        ("100::1", false),
        ("2001::1", false),
        ("2001:db8::1", false),
        ("2002::1", false),
        ("fc00::1", false),
        ("fd12::1", false),
        ("fe80::1", false),
        ("fec0::1", false),
        ("ff02::1", false),
        ("4000::1", false),
    ];
    for (ip, want) in cases {
        assert_eq!(is_public(ip.parse().unwrap()), want, "{ip}");
    }
}

fn fake_resolver(answers: &'static [&'static str]) -> Resolver {
    Arc::new(move |_host: String| {
        let ips: Vec<IpAddr> = answers.iter().map(|s| s.parse().unwrap()).collect();
        Box::pin(async move { Ok(ips) })
    })
}

fn failing_resolver() -> Resolver {
    Arc::new(|_host: String| Box::pin(async { Err(io::Error::other("no such host")) }))
}

#[tokio::test]
async fn resolve_once_and_pin_public_answers() {
    let p = policy(&["*.example.com"]);
    let r = fake_resolver(&[
        "10.0.0.1",
        "93.184.216.34",
        "::ffff:93.184.216.34",
        "2606:2800::1",
    ]);
    let got = candidates(&p, "www.example.com", 443, &r).await.unwrap();
    let want: Vec<SocketAddr> = vec![
        "93.184.216.34:443".parse().unwrap(),
        "[2606:2800::1]:443".parse().unwrap(),
    ];
    assert_eq!(
        got, want,
        "private answers dropped, mapped duplicates folded, families interleaved"
    );
    let private_only = fake_resolver(&["127.0.0.1", "10.0.0.1"]);
    assert_eq!(
        candidates(&p, "www.example.com", 443, &private_only).await,
        Err(DialError::NoPublicAddress)
    );
    assert_eq!(
        candidates(&p, "www.example.com", 443, &fake_resolver(&[])).await,
        Err(DialError::NoAddress)
    );
    assert!(matches!(
        candidates(&p, "www.example.com", 443, &failing_resolver()).await,
        Err(DialError::Resolve(_))
    ));
    // Not allowed: refused before any lookup.
    assert_eq!(
        candidates(&p, "example.org", 443, &failing_resolver()).await,
        Err(DialError::NotAllowed)
    );
}

#[tokio::test]
async fn private_literals_need_the_opt_in_and_a_literal_listing() {
    let r = failing_resolver(); // literals never reach DNS
    // Listing a private literal without the opt-in is refused when the policy is built…
    let err = Policy::builder()
        .allow(["127.0.0.1", "8.8.8.8"])
        .build()
        .unwrap_err();
    assert!(matches!(err, PolicyError::PrivateAddress(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1")
            && text.contains("--allow-private")
            && text.contains("never dials"),
        "{text}"
    );
    // …and a name that resolves to one is still refused when dialling.
    let without = policy(&["localhost", "8.8.8.8"]);
    assert_eq!(
        candidates(&without, "localhost", 80, &fake_resolver(&["127.0.0.1"])).await,
        Err(DialError::NoPublicAddress)
    );
    assert_eq!(
        candidates(&without, "8.8.8.8", 53, &r).await.unwrap(),
        vec!["8.8.8.8:53".parse::<SocketAddr>().unwrap()]
    );
    let with = Policy::builder()
        .allow(["127.0.0.1", "localhost", "*.internal.test"])
        .allow_private(true)
        .build()
        .unwrap();
    assert_eq!(
        candidates(&with, "127.0.0.1", 80, &r).await.unwrap(),
        vec!["127.0.0.1:80".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(
        candidates(&with, "127.0.0.2", 80, &r).await,
        Err(DialError::NotAllowed)
    );
    // Names never unlock private addresses, even listed and with the opt-in.
    let loopback = fake_resolver(&["127.0.0.1"]);
    assert_eq!(
        candidates(&with, "localhost", 80, &loopback).await,
        Err(DialError::NoPublicAddress)
    );
    assert_eq!(
        candidates(&with, "db.internal.test", 80, &loopback).await,
        Err(DialError::NoPublicAddress)
    );
}

#[test]
fn wildcards_over_a_public_suffix_are_refused() {
    for bad in ["*.com", "*.co.uk", "*.CO.UK.", "*.github.io", "*.org"] {
        let err = Policy::builder().allow([bad]).build().unwrap_err();
        assert!(matches!(err, PolicyError::PublicSuffix(..)), "{bad}: {err}");
        assert!(err.to_string().contains("public suffix"), "{err}");
    }
    for good in [
        "*.example.com",
        "*.bbc.co.uk",
        "*.discord.com",
        "*.corp.internal",
    ] {
        Policy::builder()
            .allow([good])
            .build()
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
}

#[test]
fn huge_allowlists_are_refused_quickly_with_a_sentence() {
    let many: Vec<String> = (0..100_000).map(|i| format!("h{i}.example.com")).collect();
    let started = tokio::time::Instant::now();
    let err = Policy::builder().allow(&many).build().unwrap_err();
    assert!(
        matches!(err, PolicyError::TooManyPatterns(100_000)),
        "{err}"
    );
    assert!(err.to_string().contains("at most 4096"), "{err}");
    // At the cap, building (with dedup) is a set operation, not a quadratic scan.
    let at_cap = &many[..4096];
    let p = Policy::builder()
        .allow(at_cap)
        .allow(at_cap)
        .build()
        .unwrap();
    assert_eq!(p.patterns().len(), 4096);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
