//! `crabbox-api`: the crabboxd local API (`crabbox.daemon.v1`) — generated
//! protobuf types and gRPC stubs, version metadata, and a typed client that
//! connects over the daemon's Unix socket.
//!
//! The `.proto` files under `proto/crabbox/daemon/v1/` are the source of
//! truth; they are compiled at build time with protox, so no system `protoc`
//! is needed. Both `crabboxd` (server) and `crabboxctl` (client) depend on this
//! crate, and nothing else in the workspace knows the proto types.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod client;
pub mod errors;
pub mod paths;
pub mod version;

/// Generated types and services of package `crabbox.daemon.v1`: one
/// service per domain (`Daemon`, `Leases`, `Egress`, `Runs`), each from its
/// own `.proto` file, and the shared task types.
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod v1 {
    tonic::include_proto!("crabbox.daemon.v1");

    /// The encoded `FileDescriptorSet` of this package, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("crabbox_daemon_v1");
}

pub use client::{Client, ConnectError};
/// The well-known types (`Timestamp`, `Duration`) the generated messages
/// use, re-exported so clients need no direct dependency to build or read
/// them.
pub use prost_types;
pub use version::{PROTOCOL, VERSION};
