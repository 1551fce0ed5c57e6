//! One module per subcommand; each connects, makes one call (or one
//! stream), and renders the reply.

pub mod attach;
pub mod completions;
pub mod daemon;
pub mod doctor;
pub mod egress;
pub mod heartbeat;
pub mod lease;
pub mod log_level;
pub mod man;
pub mod status;
pub mod tasks;
