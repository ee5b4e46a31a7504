//! Termination and reload signals for the long-running commands. Handlers are installed once,
//! at creation, so a signal arriving while the program is busy is not lost.

use anyhow::{Context as _, Result};
use tokio::signal::unix::{Signal, SignalKind, signal};

pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
}

/// What arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// SIGINT or SIGTERM: stop.
    Terminate,
    /// SIGHUP: reload the configuration.
    Reload,
}

impl Signals {
    /// Installs the handlers (needs a running tokio runtime).
    pub fn new() -> Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
        })
    }

    /// Waits for the next signal.
    pub async fn recv(&mut self) -> Received {
        tokio::select! {
            _ = self.int.recv() => Received::Terminate,
            _ = self.term.recv() => Received::Terminate,
            _ = self.hup.recv() => Received::Reload,
        }
    }
}
