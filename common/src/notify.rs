//! The systemd notify protocol: READY, WATCHDOG, STOPPING, RELOADING. Without `NOTIFY_SOCKET`
//! every call is a no-op, so the daemons run the same under systemd, in tests and by hand.

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "failed to notify the service manager");
    }
}

pub fn ready() {
    send(&[NotifyState::Ready]);
}

pub fn watchdog() {
    send(&[NotifyState::Watchdog]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

/// `RELOADING=1` with the `MONOTONIC_USEC` systemd needs to match the later `READY=1`.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Asks systemd for more start (or stop) time: `EXTEND_TIMEOUT_USEC`.
pub fn extend_timeout(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// How often to send `WATCHDOG=1`: half the interval systemd gave us, if it gave one.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|d| d / 2)
}
