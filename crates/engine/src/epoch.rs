//! The epoch ticker: advances the engines' epochs every [`EPOCH_TICK`]
//! while guest code can run (an instantiation or a call is under way), and
//! sleeps once none has for [`EPOCH_LINGER`].
//!
//! Guests are interrupted by epoch deadlines: each tick makes a running
//! guest yield to the executor and check its wall-clock deadline. Idle
//! instances (reusable, prepared or kept warm) run no code, so a node that
//! serves nothing needs no ticks; without this gate the ticker alone would
//! wake the idle process a hundred times a second.

use crate::limits::{EPOCH_LINGER, EPOCH_TICK};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// A thread incrementing the engines' epochs while guests run.
pub(crate) struct EpochTicker {
    /// Instantiations and calls under way: each holds a [`Ticking`].
    live: AtomicUsize,
    stop: AtomicBool,
    /// Epoch increments so far.
    ticks: AtomicU64,
    /// The ticker's thread, unparked when the first store appears.
    thread: OnceLock<std::thread::Thread>,
}

/// Held while guest code may run: the epochs advance while one exists.
pub(crate) struct Ticking(Arc<EpochTicker>);

impl Drop for Ticking {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EpochTicker {
    /// Starts the ticker for `engines`; it ends when [`EpochTicker::stop`]
    /// is called or every engine is dropped.
    pub(crate) fn spawn(engines: Vec<wasmtime::EngineWeak>) -> std::io::Result<Arc<Self>> {
        let ticker = Arc::new(Self {
            live: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            thread: OnceLock::new(),
        });
        let this = ticker.clone();
        let handle = std::thread::Builder::new()
            .name("nimbus-epoch".into())
            .spawn(move || this.run(&engines))?;
        // No store exists before the ticker is returned, so no wake-up can
        // be missed before the thread is known.
        let _ = ticker.thread.set(handle.thread().clone());
        Ok(ticker)
    }

    fn run(&self, engines: &[wasmtime::EngineWeak]) {
        // When a guest was last seen running; none since the last sleep.
        let mut busy_at: Option<std::time::Instant> = None;
        while !self.stop.load(Ordering::SeqCst) {
            if self.live.load(Ordering::SeqCst) > 0 {
                busy_at = Some(std::time::Instant::now());
            } else if busy_at.is_none_or(|at| at.elapsed() >= EPOCH_LINGER) {
                // A guest starting after the check unparks the thread, and
                // an unpark before `park` makes it return at once.
                std::thread::park();
                busy_at = None;
                continue;
            }
            std::thread::sleep(EPOCH_TICK);
            let mut alive = false;
            for engine in engines {
                if let Some(engine) = engine.upgrade() {
                    engine.increment_epoch();
                    alive = true;
                }
            }
            if !alive {
                break;
            }
            self.ticks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Keeps the epochs advancing until the returned value is dropped.
    pub(crate) fn ticking(self: &Arc<Self>) -> Ticking {
        if self.live.fetch_add(1, Ordering::SeqCst) == 0 {
            self.wake();
        }
        Ticking(self.clone())
    }

    /// Ends the thread.
    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }

    /// Epoch increments so far.
    #[cfg(test)]
    pub(crate) fn ticks(&self) -> u64 {
        self.ticks.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn ticks_after(ticker: &EpochTicker, wait: Duration) -> u64 {
        let before = ticker.ticks();
        std::thread::sleep(wait);
        ticker.ticks() - before
    }

    #[test]
    fn ticks_while_guests_run_and_a_second_after() {
        let engine = wasmtime::Engine::default();
        let ticker = EpochTicker::spawn(vec![engine.weak()]).unwrap();
        // Ten ticks' worth of time with no guest: none.
        assert_eq!(ticks_after(&ticker, EPOCH_TICK * 10), 0);

        let ticking = ticker.ticking();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ticker.ticks() < 3 {
            assert!(Instant::now() < deadline, "the ticker did not wake");
            std::thread::sleep(EPOCH_TICK);
        }
        // Two guests, one done: still ticking.
        let second = ticker.ticking();
        drop(ticking);
        let at = ticker.ticks();
        while ticker.ticks() < at + 2 {
            assert!(Instant::now() < deadline, "the ticker stopped early");
            std::thread::sleep(EPOCH_TICK);
        }
        drop(second);
        // Ticking a while longer, so the next request of a burst wakes
        // nothing...
        let at = ticker.ticks();
        while ticker.ticks() < at + 3 {
            assert!(Instant::now() < deadline, "the ticker stopped at once");
            std::thread::sleep(EPOCH_TICK);
        }
        // ...then asleep.
        let asleep_by = Instant::now() + EPOCH_LINGER + Duration::from_secs(5);
        while ticks_after(&ticker, EPOCH_TICK * 10) > 0 {
            assert!(Instant::now() < asleep_by, "the ticker never slept");
        }
        ticker.stop();
    }
}
