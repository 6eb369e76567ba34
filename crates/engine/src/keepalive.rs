//! Adaptive keep-alive: when a function's code should be in memory, learnt
//! from the idle times between its invocations.
//!
//! This is the hybrid histogram policy of Shahrad et al., "Serverless in
//! the Wild" (USENIX ATC 2020). Each function counts the time between the
//! starts of consecutive invocations (of any of its versions, so a
//! redeploy keeps what was learnt) in a histogram of [`IDLE_BINS`] bins,
//! each one resolution wide (a minute by default). Once the histogram is
//! representative, the code is unloaded right after an invocation when
//! nearly every idle time is long (the 5th percentile, less a margin), loaded
//! again ahead of the next expected request, and unloaded for good past
//! nearly every idle time seen (the 99th percentile, plus a margin). A
//! function called every half hour then spends most of the half hour out of
//! memory and still finds its code loaded when the call comes. Until the
//! histogram says something (too few idle times, idle times spread evenly,
//! many beyond its range, or all shorter than one bin), the node's fixed
//! `--scale-to-zero-after` applies.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Bins of the idle-time histogram: four hours at the default resolution
/// of one minute, the range the policy's authors found to cover nearly all
/// functions' idle times.
pub const IDLE_BINS: usize = 240;

/// Idle times a histogram needs before it is trusted.
pub const MIN_IDLE_SAMPLES: u32 = 8;

/// Below this coefficient of variation of the bin counts, idle times are
/// spread too evenly to predict the next one.
const MIN_CV: f64 = 2.0;

/// Idle times beyond the histogram's range (in tenths of all) past which it
/// does not describe the function.
const MAX_BEYOND_TENTHS: u32 = 1;

/// The percentiles of idle time that open and close the window.
const HEAD_PERCENT: u64 = 5;
const TAIL_PERCENT: u64 = 99;

/// Widens the window on both sides, in percent of its edges, so idle times
/// near the edges of a bin still find the code loaded.
const MARGIN_PERCENT: u64 = 10;

/// Counts are halved once this many idle times are counted, so a function
/// whose pattern changes is judged by its recent calls.
const AGE_AT: u32 = 1_000;
/// [`IdleHistory::last_call_ms`] before the first call.
const NEVER: u64 = u64::MAX;

/// When a version's code should be in memory, in milliseconds after the
/// start of its last invocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Loaded from here (0: kept loaded after each invocation).
    pub load_at_ms: u64,
    /// Unloaded from here.
    pub unload_at_ms: u64,
}

/// What to do with a version's code now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Leave it as it is: loaded stays loaded, unloaded waits for a request.
    Keep,
    /// Unload it (if loaded).
    Unload,
    /// Have it loaded (if not), ahead of the next expected request.
    Load,
}

/// What the histogram predicts: `None` when it is not representative.
/// `counts[0]` holds the idle times shorter than one bin, `beyond` those
/// past the last.
pub fn window(counts: &[u32; IDLE_BINS], beyond: u32, resolution_ms: u64) -> Option<Window> {
    let within: u64 = counts.iter().map(|&c| u64::from(c)).sum();
    let total = within + u64::from(beyond);
    if total < u64::from(MIN_IDLE_SAMPLES)
        || u64::from(beyond) * 10 > total * u64::from(MAX_BEYOND_TENTHS)
    {
        return None;
    }
    let mean = within as f64 / IDLE_BINS as f64;
    let variance = counts
        .iter()
        .map(|&c| (f64::from(c) - mean).powi(2))
        .sum::<f64>()
        / IDLE_BINS as f64;
    if variance.sqrt() < MIN_CV * mean {
        return None;
    }
    let percentile = |percent: u64| {
        // The first bin holding the percent-th idle time.
        let rank = (within * percent).div_ceil(100).max(1);
        let mut seen = 0;
        counts
            .iter()
            .position(|&c| {
                seen += u64::from(c);
                seen >= rank
            })
            .unwrap_or(IDLE_BINS - 1) as u64
    };
    let (head, tail) = (percentile(HEAD_PERCENT), percentile(TAIL_PERCENT));
    if tail == 0 {
        // Every idle time is shorter than one bin: nothing finer to say
        // than the fixed window.
        return None;
    }
    Some(Window {
        load_at_ms: head * resolution_ms * (100 - MARGIN_PERCENT) / 100,
        unload_at_ms: (tail + 1) * resolution_ms * (100 + MARGIN_PERCENT) / 100,
    })
}

/// What to do with code idle for `idle_ms`, under `window` (else unloaded
/// after `fixed_ms`; `None` never).
pub fn verdict(window: Option<Window>, idle_ms: u64, fixed_ms: Option<u64>) -> Verdict {
    match window {
        Some(w) if idle_ms < w.load_at_ms || idle_ms >= w.unload_at_ms => Verdict::Unload,
        Some(_) => Verdict::Load,
        None if fixed_ms.is_some_and(|f| idle_ms >= f) => Verdict::Unload,
        None => Verdict::Keep,
    }
}

/// What a function's [`IdleHistory`] has learnt, to keep across a restart
/// of the node: the count of each bin (bin 0 the idle times shorter than
/// one bin) and of those beyond the range, at a resolution.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct IdleSnapshot {
    pub resolution_ms: u64,
    pub counts: Vec<u32>,
    pub beyond: u32,
}

/// A function's idle times, recorded as invocations start, across its
/// versions: a new version goes on from what the one it replaces learnt.
/// Idle times shorter than one bin (every gap of a busy function) cost one
/// atomic increment; a longer one takes a lock, at most once per
/// resolution.
pub(crate) struct IdleHistory {
    resolution_ms: u64,
    /// When an invocation of any version last started, on the engine's
    /// clock ([`NEVER`] before the first).
    last_call_ms: AtomicU64,
    short: AtomicU32,
    /// Allocated on the first idle time longer than one bin, so functions
    /// that are always busy, or never called, hold no histogram.
    long: Mutex<Option<Box<Histogram>>>,
}

struct Histogram {
    /// Bin 0 is kept in [`IdleHistory::short`]; it stays 0 here.
    counts: [u32; IDLE_BINS],
    beyond: u32,
    /// The last prediction and the short count it saw.
    cached: Option<(u32, Option<Window>)>,
}

impl IdleHistory {
    pub(crate) fn new(resolution_ms: u64) -> Self {
        Self {
            resolution_ms: resolution_ms.max(1),
            last_call_ms: AtomicU64::new(NEVER),
            short: AtomicU32::new(0),
            long: Mutex::new(None),
        }
    }

    /// Notes an invocation starting at `now_ms`, counting the idle time
    /// since the one before it (of whichever version).
    pub(crate) fn called(&self, now_ms: u64) {
        let previous = self.last_call_ms.swap(now_ms, Ordering::Relaxed);
        if previous != NEVER {
            self.record(now_ms.saturating_sub(previous));
        }
    }

    /// When an invocation last started, if one has.
    pub(crate) fn last_call_ms(&self) -> Option<u64> {
        let at = self.last_call_ms.load(Ordering::Relaxed);
        (at != NEVER).then_some(at)
    }

    /// What has been learnt, if anything beyond idle times shorter than
    /// one bin (which alone predict nothing).
    pub(crate) fn snapshot(&self) -> Option<IdleSnapshot> {
        let long = self.long.lock().ok()?;
        let h = long.as_ref()?;
        let mut counts = h.counts.to_vec();
        counts[0] = self.short.load(Ordering::Relaxed);
        Some(IdleSnapshot {
            resolution_ms: self.resolution_ms,
            counts,
            beyond: h.beyond,
        })
    }

    /// Adds what an earlier run of the node learnt. Returns false, adding
    /// nothing, when it was learnt at another resolution or is malformed.
    pub(crate) fn restore(&self, snapshot: &IdleSnapshot) -> bool {
        if snapshot.resolution_ms != self.resolution_ms || snapshot.counts.len() != IDLE_BINS {
            return false;
        }
        let Ok(mut long) = self.long.lock() else {
            return false;
        };
        let h = long.get_or_insert_with(|| {
            Box::new(Histogram {
                counts: [0; IDLE_BINS],
                beyond: 0,
                cached: None,
            })
        });
        for (count, &saved) in h.counts.iter_mut().zip(&snapshot.counts).skip(1) {
            *count = count.saturating_add(saved);
        }
        h.beyond = h.beyond.saturating_add(snapshot.beyond);
        let _ = self
            .short
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(snapshot.counts[0]))
            });
        h.cached = None;
        self.age(h);
        true
    }

    /// Counts one idle time.
    pub(crate) fn record(&self, idle_ms: u64) {
        let bin = idle_ms / self.resolution_ms;
        if bin == 0 {
            // Saturates: aging (under the lock) brings it back down.
            let _ = self
                .short
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
            return;
        }
        let Ok(mut long) = self.long.lock() else {
            return;
        };
        let h = long.get_or_insert_with(|| {
            Box::new(Histogram {
                counts: [0; IDLE_BINS],
                beyond: 0,
                cached: None,
            })
        });
        match usize::try_from(bin).ok().and_then(|b| h.counts.get_mut(b)) {
            Some(count) => *count = count.saturating_add(1),
            None => h.beyond = h.beyond.saturating_add(1),
        }
        h.cached = None;
        self.age(h);
    }

    /// The current prediction (`None`: use the fixed window).
    pub(crate) fn window(&self) -> Option<Window> {
        let mut long = self.long.lock().ok()?;
        let h = long.as_mut()?;
        self.age(h);
        let short = self.short.load(Ordering::Relaxed);
        if let Some((seen, window)) = h.cached
            && seen == short
        {
            return window;
        }
        let mut counts = h.counts;
        counts[0] = short;
        let window = window(&counts, h.beyond, self.resolution_ms);
        h.cached = Some((short, window));
        window
    }

    /// Halves every count once [`AGE_AT`] idle times are counted.
    fn age(&self, h: &mut Histogram) {
        let short = self.short.load(Ordering::Relaxed);
        let total = h
            .counts
            .iter()
            .fold(u64::from(short) + u64::from(h.beyond), |sum, &c| {
                sum + u64::from(c)
            });
        if total < u64::from(AGE_AT) {
            return;
        }
        for c in &mut h.counts {
            *c /= 2;
        }
        h.beyond /= 2;
        // Increments racing with this one are lost: the counts are
        // estimates either way.
        self.short.store(short / 2, Ordering::Relaxed);
        h.cached = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000;

    fn history(idle_ms: &[u64]) -> IdleHistory {
        let h = IdleHistory::new(MINUTE);
        for &ms in idle_ms {
            h.record(ms);
        }
        h
    }

    #[test]
    fn idle_times_run_from_one_call_start_to_the_next() {
        let h = IdleHistory::new(MINUTE);
        assert_eq!(h.last_call_ms(), None);
        // The first call has no idle time before it.
        h.called(5 * MINUTE);
        assert_eq!(h.last_call_ms(), Some(5 * MINUTE));
        assert!(h.long.lock().unwrap().is_none());
        for i in 1..=9 {
            h.called(5 * MINUTE + i * 30 * MINUTE);
        }
        assert_eq!(h.last_call_ms(), Some(275 * MINUTE));
        let w = h.window().expect("nine half-hour idle times");
        assert_eq!(w.load_at_ms, 27 * MINUTE);
    }

    #[test]
    fn a_snapshot_restores_the_window_it_was_taken_with() {
        let learnt = history(&[30 * MINUTE + 5_000; 12]);
        let snapshot = learnt.snapshot().expect("long idle times");
        let text = serde_json::to_string(&snapshot).unwrap();
        let restored = IdleHistory::new(MINUTE);
        assert!(restored.restore(&serde_json::from_str(&text).unwrap()));
        assert_eq!(restored.window(), learnt.window());
        // Learnt at another resolution: ignored.
        let other = IdleHistory::new(2 * MINUTE);
        assert!(!other.restore(&snapshot));
        assert_eq!(other.snapshot(), None);
        // Only short idle times: nothing worth keeping.
        assert_eq!(history(&[10; 20]).snapshot(), None);
    }

    #[test]
    fn a_function_called_every_half_hour_is_loaded_around_each_call() {
        let h = history(&[30 * MINUTE + 5_000; 12]);
        let w = h.window().unwrap();
        // Bin 30: loaded from 27 minutes (30, less 10%), unloaded from 34.1
        // (31, plus 10%).
        assert_eq!(
            w,
            Window {
                load_at_ms: 27 * MINUTE,
                unload_at_ms: 31 * MINUTE * 11 / 10,
            }
        );
        let fixed = Some(10 * MINUTE);
        assert_eq!(verdict(Some(w), 1_000, fixed), Verdict::Unload);
        assert_eq!(verdict(Some(w), 26 * MINUTE, fixed), Verdict::Unload);
        assert_eq!(verdict(Some(w), 28 * MINUTE, fixed), Verdict::Load);
        assert_eq!(verdict(Some(w), 35 * MINUTE, fixed), Verdict::Unload);
    }

    #[test]
    fn too_few_idle_times_leave_the_fixed_window() {
        let h = history(&[30 * MINUTE; (MIN_IDLE_SAMPLES - 1) as usize]);
        assert_eq!(h.window(), None);
        h.record(30 * MINUTE);
        assert!(h.window().is_some());
    }

    #[test]
    fn idle_times_spread_evenly_leave_the_fixed_window() {
        let spread: Vec<u64> = (1..IDLE_BINS as u64).map(|b| b * MINUTE).collect();
        assert_eq!(history(&spread).window(), None);
    }

    #[test]
    fn a_busy_function_keeps_the_fixed_window() {
        // Every idle time below one bin: no histogram is even allocated.
        let h = history(&[10; 500]);
        assert_eq!(h.window(), None);
        assert!(h.long.lock().unwrap().is_none());
        assert_eq!(verdict(None, 5 * MINUTE, Some(10 * MINUTE)), Verdict::Keep);
        assert_eq!(
            verdict(None, 10 * MINUTE, Some(10 * MINUTE)),
            Verdict::Unload
        );
        assert_eq!(verdict(None, 1_000 * MINUTE, None), Verdict::Keep);
    }

    #[test]
    fn a_function_called_in_bursts_stays_loaded_until_its_longest_pauses() {
        // Mostly back to back, with pauses of about an hour between bursts.
        let mut idle = vec![100; 90];
        idle.extend([60 * MINUTE + 1_000; 10]);
        let w = history(&idle).window().unwrap();
        assert_eq!(w.load_at_ms, 0);
        assert_eq!(w.unload_at_ms, 61 * MINUTE * 11 / 10);
        assert_eq!(verdict(Some(w), 1_000, Some(10 * MINUTE)), Verdict::Load);
        assert_eq!(
            verdict(Some(w), 40 * MINUTE, Some(10 * MINUTE)),
            Verdict::Load
        );
    }

    #[test]
    fn many_idle_times_beyond_the_range_leave_the_fixed_window() {
        let mut idle = vec![30 * MINUTE; 8];
        idle.extend([(IDLE_BINS as u64 + 5) * MINUTE; 2]);
        assert_eq!(history(&idle).window(), None);
        // One in ten is tolerated.
        let mut idle = vec![30 * MINUTE; 9];
        idle.push((IDLE_BINS as u64 + 5) * MINUTE);
        assert!(history(&idle).window().is_some());
    }

    #[test]
    fn the_window_follows_a_changed_pattern() {
        let h = history(&[30 * MINUTE; 600]);
        assert_eq!(h.window().unwrap().load_at_ms, 27 * MINUTE);
        // Aging halves the old counts: the new period soon dominates.
        for _ in 0..700 {
            h.record(10 * MINUTE);
        }
        assert_eq!(h.window().unwrap().load_at_ms, 9 * MINUTE);
    }

    #[test]
    fn a_changed_short_count_is_seen_by_the_next_prediction() {
        let h = history(&[30 * MINUTE; 10]);
        assert_eq!(h.window().unwrap().load_at_ms, 27 * MINUTE);
        // Now mostly called back to back: keep the code loaded after calls.
        for _ in 0..200 {
            h.record(5);
        }
        assert_eq!(h.window().unwrap().load_at_ms, 0);
    }
}
