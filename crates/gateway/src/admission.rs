//! Admission control: at most `max_concurrency` invocations of a function run
//! at once; a short bounded queue absorbs bursts; past it, or after waiting
//! too long, the caller is told to come back later (429 + Retry-After).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Longest time a request waits for a free slot before it is refused.
pub const MAX_QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Seconds a refused caller is asked to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 1;

/// The request could not be admitted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Throttled {
    #[error("{0} invocations are running and {1} are queued; retry later")]
    QueueFull(u32, usize),
    #[error("no slot freed within {0:?}; retry later")]
    WaitedTooLong(Duration),
}

/// Admission of one function.
pub struct Admission {
    slots: Arc<Semaphore>,
    limit: u32,
    queue: usize,
    waiting: AtomicUsize,
}

/// A running invocation's slot; freed when dropped.
pub type Permit = OwnedSemaphorePermit;

struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Admission {
    /// `limit` concurrent invocations, and as many waiting.
    pub fn new(limit: u32) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit as usize)),
            limit,
            queue: limit as usize,
            waiting: AtomicUsize::new(0),
        }
    }

    /// The concurrency limit.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// Invocations running now.
    pub fn in_flight(&self) -> u64 {
        (self.limit as usize).saturating_sub(self.slots.available_permits()) as u64
    }

    /// Requests waiting for a slot now.
    pub fn queued(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Takes a slot, waiting in the bounded queue if none is free.
    pub async fn acquire(&self) -> Result<Permit, Throttled> {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(Throttled::QueueFull(self.limit, self.queue));
        }
        let _waiting = Waiting(&self.waiting);
        match tokio::time::timeout(MAX_QUEUE_WAIT, self.slots.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Throttled::WaitedTooLong(MAX_QUEUE_WAIT)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn queue_is_bounded_and_waits_are_limited() {
        let a = Admission::new(2);
        let p1 = a.acquire().await.unwrap();
        let _p2 = a.acquire().await.unwrap();
        assert_eq!(a.in_flight(), 2);
        // Two may wait; the third is refused at once.
        let w1 = a.acquire();
        let w2 = a.acquire();
        tokio::pin!(w1, w2);
        assert!(futures_poll(&mut w1).await.is_none());
        assert!(futures_poll(&mut w2).await.is_none());
        assert_eq!(a.queued(), 2);
        assert_eq!(a.acquire().await.unwrap_err(), Throttled::QueueFull(2, 2));
        // A freed slot goes to a waiter.
        drop(p1);
        let _p3 = w1.await.unwrap();
        // The other waiter gives up after the maximum wait.
        assert_eq!(
            w2.await.unwrap_err(),
            Throttled::WaitedTooLong(MAX_QUEUE_WAIT)
        );
        assert_eq!(a.queued(), 0);
    }

    async fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        use std::task::Poll;
        std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *f).poll(cx) {
            Poll::Ready(v) => Poll::Ready(Some(v)),
            Poll::Pending => Poll::Ready(None),
        })
        .await
    }
}
