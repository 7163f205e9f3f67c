//! Tasks tied to the scope that spawned them.

/// Aborts its task when dropped: a task whose work is only wanted while its
/// owner lives (a pub/sub reader with its link, an HTTP connection with its
/// request) ends with the owner, also when the owner's future is cancelled.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
