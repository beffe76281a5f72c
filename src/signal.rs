//! The signals the daemons answer: SIGTERM and SIGINT stop them; SIGHUP
//! asks them to re-read what they run on (the agent: a successor takes
//! over; the registrar: its service files and flags), never ends them.
//!
//! Handlers are installed when these are created, not when first awaited:
//! a signal during start-up then finds a handler instead of the default
//! action, which would kill the process.

use tokio::signal::unix::{signal, Signal, SignalKind};

/// Completes on SIGTERM or SIGINT.
pub fn shutdown() -> impl std::future::Future<Output = ()> {
    let signals = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()));
    async move {
        match signals {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// SIGHUPs, as they come.
pub struct Hangups(Option<Signal>);

impl Hangups {
    /// Takes SIGHUP over from its default action (ending the process).
    pub fn new() -> Hangups {
        Hangups(
            signal(SignalKind::hangup())
                .map_err(|err| tracing::warn!("cannot handle SIGHUP: {err}"))
                .ok(),
        )
    }

    /// The next SIGHUP; never, if no handler could be installed.
    /// Cancel-safe.
    pub async fn next(&mut self) {
        match &mut self.0 {
            Some(hangups) => {
                if hangups.recv().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }
}

impl Default for Hangups {
    fn default() -> Self {
        Hangups::new()
    }
}
