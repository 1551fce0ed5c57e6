//! Service-manager notifications: systemd `Type=notify` READY/STOPPING. They
//! are no-ops when the daemon was not started by systemd (`NOTIFY_SOCKET`
//! unset), including under launchd and in the foreground.

use sd_notify::NotifyState;

/// Tells systemd the daemon is ready (the socket is bound and serving).
pub fn ready() {
    send(&[NotifyState::Ready]);
}

/// Tells systemd the daemon is shutting down.
pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// Sets the one-line status systemd shows in `systemctl status`.
pub fn status(line: &str) {
    send(&[NotifyState::Status(line)]);
}

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
