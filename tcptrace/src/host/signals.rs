//! Termination and reload signals for the long-running commands. Handlers are installed once,
//! at creation, so a signal arriving while the program is busy is not lost.

use tokio::signal::unix::{Signal, SignalKind, signal};

/// A signal handler could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("installing the {name} handler")]
pub struct SignalError {
    name: &'static str,
    source: std::io::Error,
}

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
    pub fn new() -> Result<Self, SignalError> {
        let install = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| SignalError { name, source })
        };
        Ok(Self {
            int: install(SignalKind::interrupt(), "SIGINT")?,
            term: install(SignalKind::terminate(), "SIGTERM")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
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
