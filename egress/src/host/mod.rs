//! The operator side: the allowlist [`Policy`], the public-address rules ([`addr`]), the resolve-once-and-pin dialer ([`dial`]) and [`run_host`].

pub mod addr;
pub mod dial;
pub mod policy;
mod serve;

pub use dial::{DialError, Resolver, system_resolver};
pub use policy::{Pattern, Policy, PolicyBuilder, PolicyError, builtin_profile};
pub(crate) use serve::reply_message;
pub use serve::{HostConfig, run_host};
