//! One module per subcommand; each connects, makes one call (or one
//! stream), and renders the reply.

pub mod attach;
pub mod completions;
pub mod cp;
pub mod daemon;
pub mod desktop;
pub mod doctor;
pub mod egress;
pub mod exec;
pub mod heartbeat;
pub mod lease;
pub mod log_level;
pub mod man;
pub mod rsh;
pub mod run;
pub mod ssh;
pub mod status;
pub mod tasks;
