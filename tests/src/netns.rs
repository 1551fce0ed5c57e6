//! A test network namespace ("the lease") joined to the root namespace by a
//! veth pair on a private /30, removed again on drop. Traffic from inside
//! can reach only the root end of the veth: not the root namespace's
//! loopback, not the internet.

use std::{net::Ipv4Addr, process::Command};

/// A namespace and its veth link.
#[derive(Debug)]
pub struct TestNetns {
    /// The namespace name (for `ip netns exec`).
    pub name: String,
    /// The root-side address of the veth.
    pub host_ip: Ipv4Addr,
    /// The namespace-side address of the veth.
    pub ns_ip: Ipv4Addr,
    host_if: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TestNetns {
    /// Whether this process can create namespaces (root with `ip`).
    pub fn available() -> bool {
        nix::unistd::geteuid().is_root()
            && Command::new("ip")
                .arg("-V")
                .output()
                .is_ok_and(|o| o.status.success())
    }

    /// Creates a namespace named after this process and `tag`.
    pub fn create(tag: u8) -> Result<TestNetns, String> {
        let pid = std::process::id();
        let name = format!("cbxt{pid}-{tag}");
        // Interface names are at most 15 bytes.
        let host_if = format!("cbh{:x}{tag:x}", pid % 0xffff);
        let ns_if = format!("cbl{:x}{tag:x}", pid % 0xffff);
        // A /30 in 10.213.0.0/16 picked from the pid, so parallel runs of
        // the suite do not collide.
        let third = ((pid % 250) as u8).wrapping_add(tag);
        let host_ip = Ipv4Addr::new(10, 213, third, 1);
        let ns_ip = Ipv4Addr::new(10, 213, third, 2);
        let ns = TestNetns {
            name: name.clone(),
            host_ip,
            ns_ip,
            host_if: host_if.clone(),
        };
        ip(&["netns", "add", &name])?;
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &name])?;
        ip(&["addr", "add", &format!("{host_ip}/30"), "dev", &host_if])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/30"),
            "dev",
            &ns_if,
        ])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"])?;
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `["ip", "netns", "exec", <name>]`, to prefix a command with.
    pub fn exec_prefix(&self) -> [&str; 4] {
        ["ip", "netns", "exec", &self.name]
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
