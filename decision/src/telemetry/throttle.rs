//! Log lines that could otherwise be written once per request: a store call failing through an
//! outage, a flood of malformed requests. Such a call site keeps a [`Throttle`]: its first
//! occurrence is logged at once, then at most one line per [`EVERY`], each carrying `suppressed`,
//! how many occurrences since the last line were not logged (a call site may also report them
//! as its condition ends: [`Throttle::take_suppressed`]). The metrics still count every one.
//! At 50,000 decisions a second an outage would otherwise write 100,000 lines a second, and once
//! the log writer's buffer is full (`LOG_BUFFER_LINES`), logging makes decisions wait.

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
    /// microseconds since the process's first throttle check before which no line is written
    next: AtomicU64,
    /// occurrences not logged since the last line
    suppressed: AtomicU64,
}

impl Throttle {
    /// A call site's throttle: at most one line per `every` (in practice [`EVERY`]).
    pub const fn new(every: Duration) -> Throttle {
        Throttle { every: every.as_micros() as u64, next: AtomicU64::new(0), suppressed: AtomicU64::new(0) }
    }

    /// Whether this occurrence is logged: `Some(suppressed)`, how many occurrences since the last
    /// line were not, the first time and then once per interval; `None` otherwise (counted).
    pub fn allow(&self) -> Option<u64> {
        static BASE: OnceLock<Instant> = OnceLock::new();
        let base = *BASE.get_or_init(crate::clock::instant);
        let now =
            u64::try_from(crate::clock::instant().saturating_duration_since(base).as_micros()).unwrap_or(u64::MAX);
        let next = self.next.load(Ordering::Relaxed);
        if now >= next
            && self
                .next
                .compare_exchange(next, now.saturating_add(self.every).max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// How many occurrences have not been logged since the last line (a relaxed load: cheap
    /// enough to check on every success).
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// Takes the count of occurrences not logged, for a line that reports them otherwise (as the
    /// condition ends); the next line this throttle allows counts from zero.
    pub fn take_suppressed(&self) -> u64 {
        self.suppressed.swap(0, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_occurrence_is_logged_then_one_per_interval_with_the_count_left_out() {
        let t = Throttle::new(Duration::from_secs(1));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..5 {
            assert_eq!(t.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(t.allow(), Some(5), "the five left out are reported with the next line");
        assert_eq!(t.allow(), None);
    }

    #[test]
    fn what_was_left_out_can_be_taken_once_by_another_line() {
        let t = Throttle::new(EVERY);
        assert_eq!(t.allow(), Some(0));
        assert_eq!((t.allow(), t.allow()), (None, None));
        assert_eq!(t.suppressed(), 2);
        assert_eq!(t.take_suppressed(), 2);
        assert_eq!((t.suppressed(), t.take_suppressed()), (0, 0));
    }

    #[test]
    fn a_long_interval_keeps_every_later_occurrence_out() {
        let t = Throttle::new(EVERY);
        assert_eq!(t.allow(), Some(0));
        let logged = (0..10_000).filter(|_| t.allow().is_some()).count();
        assert_eq!(logged, 0);
        assert_eq!(t.suppressed.load(Ordering::Relaxed), 10_000);
    }
}
