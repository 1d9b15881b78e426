//! A log line that could otherwise be written once per request (a store call failing through an
//! outage, a flood of malformed requests, an unreachable upstream): the call site keeps a
//! [`Throttle`], whose first occurrence is written at once and then at most one line per
//! interval ([`EVERY`] in practice), each carrying `suppressed`, how many occurrences since the
//! last line were left out (and those left out at the end of an outage are reported as its
//! condition ends: [`Throttle::recovered`]). Metrics still count every occurrence. Used by the decision
//! service and by portcullis-shim; time is an argument, as everywhere in this crate.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often a throttled line may be written again: once every 10 s.
pub const EVERY: Duration = Duration::from_secs(10);

/// One call site's allowance: lock-free, shared by every thread (a `static` beside the call).
#[derive(Debug)]
pub struct Throttle {
    /// the interval, in microseconds
    every: u64,
    /// the instant of the first occurrence: the origin of `next`
    origin: OnceLock<Instant>,
    /// microseconds after `origin` before which no line is written (0: any time)
    next: AtomicU64,
    /// the same for the line [`Throttle::recovered`] allows
    next_recovered: AtomicU64,
    /// occurrences left out since the last line
    suppressed: AtomicU64,
}

impl Throttle {
    /// A call site's throttle: at most one line per `every` (in practice [`EVERY`]).
    pub const fn new(every: Duration) -> Throttle {
        Throttle {
            every: every.as_micros() as u64,
            origin: OnceLock::new(),
            next: AtomicU64::new(0),
            next_recovered: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether `slot`'s interval has passed at `now`, starting the next one if so (one caller
    /// wins when several race).
    fn turn(&self, slot: &AtomicU64, now: Instant) -> bool {
        let origin = *self.origin.get_or_init(|| now);
        let at = u64::try_from(now.saturating_duration_since(origin).as_micros()).unwrap_or(u64::MAX);
        let next = slot.load(Ordering::Relaxed);
        at >= next
            && slot
                .compare_exchange(next, at.saturating_add(self.every).max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether the occurrence at `now` is written: `Some(suppressed)`, how many occurrences since
    /// the last line were left out, for the first one and then once per interval; `None`
    /// otherwise (and it is counted as left out). `now` comes from the caller's clock.
    pub fn allow(&self, now: Instant) -> Option<u64> {
        if self.turn(&self.next, now) {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// On a success: `Some(n)` when `n > 0` occurrences were left out of the log since its last
    /// line, so the line that says the condition ended can report them (taken: the next line
    /// counts from zero); at most once per interval, should successes and failures interleave.
    /// `None` otherwise. When nothing was left out this is one relaxed load, and `now` (the
    /// caller's clock) is not read: cheap enough for every success on a hot path.
    pub fn recovered(&self, now: impl FnOnce() -> Instant) -> Option<u64> {
        if self.suppressed() == 0 || !self.turn(&self.next_recovered, now()) {
            return None;
        }
        Some(self.take_suppressed()).filter(|&n| n > 0)
    }

    /// How many occurrences have been left out since the last line (a relaxed load: cheap
    /// enough to check on every success).
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// Takes the count of occurrences left out, for a line that reports them otherwise (as the
    /// condition ends); the next line this throttle allows counts from zero.
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An arbitrary instant to count from: tests step time forward from it, never sleep.
    #[allow(clippy::disallowed_methods)]
    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn the_first_occurrence_is_written_then_one_per_interval_with_the_count_left_out() {
        let t = Throttle::new(Duration::from_secs(1));
        let t0 = t0();
        assert_eq!(t.allow(t0), Some(0));
        for ms in [1, 10, 500, 999] {
            assert_eq!(t.allow(t0 + Duration::from_millis(ms)), None);
        }
        assert_eq!(t.allow(t0 + Duration::from_millis(1000)), Some(4), "the four left out come with the next line");
        assert_eq!(t.allow(t0 + Duration::from_millis(1500)), None);
        assert_eq!(t.allow(t0 + Duration::from_secs(60)), Some(1));
    }

    #[test]
    fn what_was_left_out_can_be_taken_once_by_another_line() {
        let t = Throttle::new(EVERY);
        let t0 = t0();
        assert_eq!(t.allow(t0), Some(0));
        assert_eq!((t.allow(t0), t.allow(t0)), (None, None));
        assert_eq!(t.suppressed(), 2);
        assert_eq!(t.take_suppressed(), 2);
        assert_eq!((t.suppressed(), t.take_suppressed()), (0, 0));
        assert_eq!(t.allow(t0 + EVERY), Some(0), "taken counts are not reported twice");
    }

    #[test]
    fn what_was_left_out_is_reported_once_on_recovery_and_at_most_once_an_interval() {
        let t = Throttle::new(EVERY);
        let t0 = t0();
        assert_eq!(t.recovered(|| t0), None, "nothing failed");
        assert_eq!(t.allow(t0), Some(0));
        assert_eq!(t.recovered(|| t0), None, "the one failure was written");
        assert_eq!((t.allow(t0), t.allow(t0)), (None, None));
        assert_eq!(t.recovered(|| t0), Some(2));
        assert_eq!(t.recovered(|| t0), None, "taken");
        assert_eq!(t.allow(t0), None);
        assert_eq!(t.recovered(|| t0 + Duration::from_secs(1)), None, "within the recovery line's interval");
        assert_eq!(t.recovered(|| t0 + EVERY), Some(1));
    }

    #[test]
    fn many_threads_at_once_write_one_line_and_count_every_other_occurrence() {
        let t = Throttle::new(EVERY);
        let t0 = t0();
        let written: usize = std::thread::scope(|s| {
            let handles: Vec<_> =
                (0..8).map(|_| s.spawn(|| (0..10_000).filter(|_| t.allow(t0).is_some()).count())).collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(written, 1);
        assert_eq!(t.suppressed(), 79_999);
    }

    #[test]
    fn an_instant_before_the_first_one_counts_as_the_first() {
        let t = Throttle::new(EVERY);
        let t0 = t0();
        assert_eq!(t.allow(t0 + Duration::from_secs(5)), Some(0));
        assert_eq!(t.allow(t0), None, "earlier than the origin: within the interval");
    }
}
