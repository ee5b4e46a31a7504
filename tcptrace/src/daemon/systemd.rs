//! systemd integration through the `sd-notify` crate (every call a no-op without
//! NOTIFY_SOCKET): READY once attached, RELOADING (with MONOTONIC_USEC, for
//! `Type=notify-reload`) then READY around a SIGHUP reload, STOPPING, a STATUS line kept up to
//! date, and WATCHDOG pings while the tracer keeps draining the kernel's rings (`WatchdogSec=`).

use std::time::Duration;

use sd_notify::NotifyState;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// A reload begins (READY follows with [`notify_reloaded`]).
pub fn notify_reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// The reload is done.
pub fn notify_reloaded() {
    send(&[NotifyState::Ready]);
}

/// The daemon is stopping.
pub fn notify_stopping() {
    send(&[NotifyState::Stopping]);
}

/// The STATUS line (`systemctl status`), sent when it changes, and the watchdog.
#[derive(Debug)]
pub struct Notifier {
    status: String,
    /// Half the watchdog period systemd set, when it set one.
    ping_every: Option<Duration>,
    /// The tracer's drain count at the last ping: no progress, no ping.
    last_drains: u64,
}

impl Notifier {
    /// The watchdog period from the environment systemd set (WATCHDOG_USEC, WATCHDOG_PID).
    pub fn from_env() -> Self {
        Self {
            status: String::new(),
            ping_every: sd_notify::watchdog_enabled().map(|d| d / 2),
            last_drains: 0,
        }
    }

    /// Start-up is done.
    pub fn ready(&mut self, status: String) {
        send(&[NotifyState::Ready, NotifyState::Status(&status)]);
        self.status = status;
    }

    /// How often [`Notifier::ping`] must run (None: no watchdog): half the period systemd
    /// set.
    pub fn ping_every(&self) -> Option<Duration> {
        self.ping_every
    }

    /// Sends the status line when it changed.
    pub fn status(&mut self, status: String) {
        if status != self.status {
            send(&[NotifyState::Status(&status)]);
            self.status = status;
        }
    }

    /// A watchdog ping, when the tracer's reader has drained the rings since the last one
    /// (`drains`: its drain count). A reader that hangs stops the pings, and systemd restarts
    /// the service.
    pub fn ping(&mut self, drains: u64) {
        if self.ping_every.is_some() && drains != self.last_drains {
            send(&[NotifyState::Watchdog]);
            self.last_drains = drains;
        }
    }
}
