//! Compiles the crabbox.daemon.v1 protos with protox (pure Rust, no system
//! `protoc`) and generates prost types and tonic stubs from the result.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "crabbox/daemon/v1/daemon.proto",
        "crabbox/daemon/v1/ssh.proto",
    ];
    for proto in &protos {
        println!("cargo:rerun-if-changed=proto/{proto}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    // The encoded descriptor set feeds gRPC server reflection.
    fs::write(out.join("crabbox_daemon_v1.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
