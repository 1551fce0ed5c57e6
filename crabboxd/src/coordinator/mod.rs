//! The coordinator client: the only module that knows the coordinator's
//! HTTP routes and JSON shapes (protocol doc §1). Every failure is
//! classified once, as fatal or retryable, for the supervisor.

mod client;
pub mod control;
mod egress;
mod runs;
mod token;
mod types;

pub use client::{Client, CoordinatorError, ErrorKind, Health, LeaseEnd, install_crypto_provider};
pub use egress::{Bridge, EgressStatus, Role, Ticket, TicketRequest};
pub use runs::{EventInput, FinishInput, NewRun, timeouts as runs_timeouts};
pub use types::{Lease, Run, RunEvent};
