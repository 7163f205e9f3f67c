//! Polling a future again at once when it wakes itself.
//!
//! hyper's HTTP/1 connection wakes its own task while it is being polled:
//! a request body goes from the connection to the handler through a channel
//! whose ends wake each other (hyper's `body::chan`: the receiver wakes the
//! sender when it asks for or takes a chunk, the sender wakes the receiver
//! when it puts one), and both ends live in the same task. tokio treats a task woken during its
//! own poll as a task that yields: it goes to the *back* of the run queue.
//! Normally that costs a wasted poll. During a fan-out it is the whole
//! delay: the publish handler has just woken 10,000 connection tasks, the
//! admin connection lands behind them, and the publisher's next request
//! waits there (measured in docs/benchmarks.md, "The publisher's wait: a
//! self-wake"; `bench/ab.sh WORKLOAD=fanout`), where a task woken by its
//! socket would have run next.
//!
//! [`Repoll`] gives the inner future a waker of its own. A wake that arrives
//! while the inner future is being polled (from itself, or from another
//! thread at that moment) is answered by polling it again before returning,
//! up to [`MAX_REPOLLS`] times, instead of by a trip through the run queue. A
//! wake that arrives after the poll returned wakes the task as usual.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Polls in a row before a future that keeps waking itself is left to the
/// scheduler (a genuine yield), so it cannot hold a worker thread forever.
pub const MAX_REPOLLS: usize = 32;

/// Not being polled: a wake goes to the task.
const IDLE: u8 = 0;
/// Being polled, not woken since the poll began.
const POLLING: u8 = 1;
/// Being polled and woken meanwhile: poll again before returning.
const WOKEN: u8 = 2;

/// A future that polls its inner future again at once when it was woken
/// during its own poll. See the module documentation for why.
pub struct Repoll<F> {
    inner: F,
    state: Arc<WakeState>,
    waker: Waker,
}

impl<F> Repoll<F> {
    /// Wraps `inner`.
    pub fn new(inner: F) -> Self {
        let state = Arc::new(WakeState {
            phase: AtomicU8::new(IDLE),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(state.clone());
        Repoll {
            inner,
            state,
            waker,
        }
    }
}

/// The waker handed to the inner future.
struct WakeState {
    phase: AtomicU8,
    task: AtomicWaker,
}

impl Wake for WakeState {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // POLLING becomes WOKEN (the poll loop sees it); WOKEN stays; IDLE
        // wakes the task. One atomic step, so a wake racing with the end of a
        // poll is seen by one side or the other, never lost.
        let seen = self
            .phase
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |phase| {
                (phase == POLLING).then_some(WOKEN)
            });
        if seen == Err(IDLE) {
            self.task.wake();
        }
    }
}

impl<F: Future + Unpin> Future for Repoll<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.state.task.register(cx.waker());
        let mut inner_cx = Context::from_waker(&this.waker);
        for _ in 0..MAX_REPOLLS {
            this.state.phase.store(POLLING, Ordering::Release);
            if let Poll::Ready(output) = Pin::new(&mut this.inner).poll(&mut inner_cx) {
                this.state.phase.store(IDLE, Ordering::Release);
                return Poll::Ready(output);
            }
            let settled = this.state.phase.compare_exchange(
                POLLING,
                IDLE,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            if settled.is_ok() {
                return Poll::Pending;
            }
        }
        // Still waking itself: let the scheduler decide when it runs again.
        this.state.phase.store(IDLE, Ordering::Release);
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Pending `wakes_itself` times, waking itself each time, then ready.
    struct WakesItself {
        wakes_itself: usize,
        polls: Arc<AtomicUsize>,
    }

    impl Future for WakesItself {
        type Output = ();

        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.wakes_itself == 0 {
                return Poll::Ready(());
            }
            self.wakes_itself -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    /// Counts the wakes the task receives.
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn task() -> (Arc<CountingWaker>, Waker) {
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        (counter.clone(), Waker::from(counter))
    }

    #[test]
    fn a_self_wake_is_a_second_poll_not_a_task_wake() {
        let (wakes, waker) = task();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut future = Repoll::new(WakesItself {
            wakes_itself: 3,
            polls: polls.clone(),
        });
        let result = Pin::new(&mut future).poll(&mut Context::from_waker(&waker));
        assert_eq!(result, Poll::Ready(()));
        assert_eq!(polls.load(Ordering::Relaxed), 4);
        assert_eq!(
            wakes.0.load(Ordering::Relaxed),
            0,
            "the task was never woken"
        );
    }

    #[test]
    fn a_future_that_keeps_waking_itself_yields_after_the_cap() {
        let (wakes, waker) = task();
        let polls = Arc::new(AtomicUsize::new(0));
        let mut future = Repoll::new(WakesItself {
            wakes_itself: usize::MAX,
            polls: polls.clone(),
        });
        let result = Pin::new(&mut future).poll(&mut Context::from_waker(&waker));
        assert_eq!(result, Poll::Pending);
        assert_eq!(polls.load(Ordering::Relaxed), MAX_REPOLLS);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "one genuine yield");
    }

    #[tokio::test]
    async fn a_wake_after_the_poll_reaches_the_task() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let (wakes, waker) = task();
        let mut future = Repoll::new(rx);
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut future).poll(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 0);
        tx.send(7).expect("receiver alive");
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1, "woken from outside");
        assert!(matches!(
            Pin::new(&mut future).poll(&mut cx),
            Poll::Ready(Ok(7))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn wakes_racing_with_the_end_of_a_poll_are_never_lost() {
        // Two threads keep a small channel full while the receiver drains it,
        // so their wakes keep landing while the receiver is being polled. A
        // wake lost at the end of a poll leaves the receiver asleep with the
        // channel full and both senders blocked: the timeout below.
        const PER_SENDER: u32 = 100_000;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(usize, u32)>(64);
        let senders: Vec<_> = (0..2)
            .map(|id| {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for n in 0..PER_SENDER {
                        tx.blocking_send((id, n)).expect("receiver alive");
                    }
                })
            })
            .collect();
        drop(tx);
        let received = tokio::spawn(Repoll::new(Box::pin(async move {
            let mut next = [0u32; 2];
            while let Some((id, n)) = rx.recv().await {
                assert_eq!(n, next[id], "in order per sender");
                next[id] += 1;
            }
            next
        })));
        let next = tokio::time::timeout(std::time::Duration::from_secs(60), received)
            .await
            .expect("a lost wake would hang here")
            .expect("task");
        assert_eq!(next, [PER_SENDER; 2]);
        for sender in senders {
            sender.join().expect("sender");
        }
    }
}
