//! The control plane's runtime: one thread of its own, apart from the
//! runtime that serves the public listener and its connections.
//!
//! At saturation the public runtime's run queues hold the thousands of
//! connection tasks the last publish woke. Anything queued behind them waits
//! its turn — an admin request waited up to 150–230 ms at 1M deliveries/s
//! before its handler ran, so the publisher fell behind and every late
//! publish reached all its subscribers late. A reply from another runtime
//! fares no better: its wake lands in the public runtime's global queue,
//! behind the same tasks.
//!
//! So the work that must answer promptly whatever the connections are doing
//! runs here, on a single-threaded runtime nothing else is queued on: the
//! admin listener (publishes, drains, status, tickets) and the Redis
//! backplane's connections (command replies and the pub/sub reader). The
//! runtime lives as long as its [`ControlPlane`]; dropping that ends the
//! thread, and with it every task still running there.

use tokio::runtime::Handle;
use tokio::sync::oneshot;

/// A single-threaded tokio runtime on a thread of its own.
pub struct ControlPlane {
    handle: Handle,
    /// Dropped with the control plane: the thread then returns from its
    /// `block_on` and drops the runtime.
    _stop: oneshot::Sender<()>,
}

impl ControlPlane {
    /// Starts the thread and its runtime.
    pub fn start() -> std::io::Result<ControlPlane> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("sy-control".into())
            .spawn(move || {
                // A current-thread runtime runs its tasks only inside
                // `block_on`: this thread drives them until told to stop.
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(ControlPlane {
            handle,
            _stop: stop,
        })
    }

    /// Where to spawn control-plane work.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_control_thread_until_it_is_dropped() {
        let control = ControlPlane::start().expect("start");
        let (tx, rx) = std::sync::mpsc::channel();
        control.handle().spawn(async move {
            let name = std::thread::current().name().map(str::to_owned);
            let _ = tx.send(name);
        });
        let name = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("ran");
        assert_eq!(name.as_deref(), Some("sy-control"));

        // A task still running when the control plane goes is dropped with
        // its runtime: its end of the channel closes.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        control.handle().spawn(async move {
            let _keep = tx;
            std::future::pending::<()>().await;
        });
        drop(control);
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
    }
}
