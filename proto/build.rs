//! Compiles the crabbox.daemon.v1 protos with protox (pure Rust, no system
//! `protoc`) and generates prost types and tonic stubs from the result.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One file per service (plus the shared task types).
    let protos = [
        "crabbox/daemon/v1/task.proto",
        "crabbox/daemon/v1/daemon.proto",
        "crabbox/daemon/v1/leases.proto",
        "crabbox/daemon/v1/egress.proto",
        "crabbox/daemon/v1/runs.proto",
        "crabbox/daemon/v1/ssh.proto",
        "crabbox/daemon/v1/desktop.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection. protox
    // includes every import, so the well-known types (Timestamp, Duration)
    // are in it and reflection clients can resolve them.
    fs::write(out.join("crabbox_daemon_v1.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
