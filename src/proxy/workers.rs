//! The proxy's event loops: threads of their own (one by default,
//! `proxy.workers`), each running a single-threaded tokio runtime; with
//! several, each service listens once per thread (SO_REUSEPORT) and the
//! kernel spreads new connections across them.
//!
//! Why not the agent's multi-thread runtime: there a task woken on one
//! worker makes it wake an idle sibling to steal work, and at 60k requests/s
//! that was ~3000 futex wake-ups a second between two workers and 6-7% more
//! CPU per request than HAProxy's single event loop. Here a connection, its
//! two sockets and its task stay on the thread that accepted it: no wake-up
//! crosses threads on the data path (the model of HAProxy's and nginx's
//! per-thread loops and Envoy's workers). The rest of the agent (store
//! watch, rendering, DNS, admin) keeps the main runtime.

use super::Error;
use std::future::Future;
use std::io;
use tokio::runtime::{EnterGuard, Handle};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Running event loops; dropping this stops them (their tasks are dropped).
pub struct Workers {
    handles: Vec<Handle>,
    /// Dropped with `Workers`, which tells every thread to end.
    _stop: watch::Sender<()>,
}

impl Workers {
    /// Starts `count` threads (at least one), each with its own runtime.
    pub fn start(count: usize) -> Result<Workers, Error> {
        let count = count.max(1);
        let (stop, _) = watch::channel(());
        let mut handles = Vec::with_capacity(count);
        for index in 0..count {
            let mut stopped = stop.subscribe();
            let (started, handle) = std::sync::mpsc::sync_channel(1);
            // The runtime is built, run and dropped on its own thread (a
            // runtime may not be dropped from async code). Named within
            // Linux's 15 characters, as `top -H` and /proc show it.
            std::thread::Builder::new()
                .name(format!("proxy-{index}"))
                .spawn(move || {
                    // Sockets and timers only: no signal or child-process
                    // driver to run at every park (perf showed its orphan
                    // reaping on the proxy's loop).
                    let runtime = match tokio::runtime::Builder::new_current_thread()
                        .enable_io()
                        .enable_time()
                        .build()
                    {
                        Ok(runtime) => runtime,
                        Err(err) => return drop(started.send(Err(err))),
                    };
                    let _ = started.send(Ok(runtime.handle().clone()));
                    // Drives every task spawned onto this runtime until the
                    // sender goes away; dropping the runtime then drops them.
                    runtime.block_on(async move { while stopped.changed().await.is_ok() {} });
                })
                .map_err(|source| Error::Worker { index, source })?;
            let handle = handle
                .recv()
                .unwrap_or_else(|_| Err(io::Error::other("the thread ended before its runtime started")))
                .map_err(|source| Error::Worker { index, source })?;
            handles.push(handle);
        }
        Ok(Workers { handles, _stop: stop })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Makes worker `index` the current runtime until the guard drops, so
    /// sockets created meanwhile register with its event loop.
    pub fn enter(&self, index: usize) -> EnterGuard<'_> {
        self.handles[index].enter()
    }

    /// Runs `task` on worker `index`.
    pub fn spawn<F>(&self, index: usize, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handles[index].spawn(task)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tasks_run_on_their_own_worker_thread() {
        let workers = Workers::start(2).unwrap();
        assert_eq!(workers.count(), 2);
        for index in 0..2 {
            let name = workers
                .spawn(index, async { std::thread::current().name().map(str::to_string) })
                .await
                .unwrap();
            assert_eq!(name.as_deref(), Some(format!("proxy-{index}").as_str()));
        }
    }

    #[tokio::test]
    async fn dropping_the_workers_ends_their_tasks() {
        let workers = Workers::start(1).unwrap();
        let task = workers.spawn(0, std::future::pending::<()>());
        drop(workers);
        let ended = task.await.unwrap_err();
        assert!(ended.is_cancelled(), "{ended}");
    }

    #[test]
    fn zero_workers_means_one() {
        assert_eq!(Workers::start(0).unwrap().count(), 1);
    }
}
