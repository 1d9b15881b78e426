//! Open-loop schedules: requests are due at fixed intervals from the start, whatever the server
//! does, and latency is measured from the time a request was due, not from when it could be sent
//! (so a stalled server shows up in the percentiles instead of hiding: no coordinated omission).

use std::time::Duration;

/// The instant (offset from the start) request `i` is due at `rate` requests a second.
pub fn due(i: u64, rate: u64) -> Duration {
    let rate = rate.max(1);
    Duration::from_nanos(i.saturating_mul(1_000_000_000) / rate)
}

/// How many requests are due in `duration` at `rate`.
pub fn count(duration: Duration, rate: u64) -> u64 {
    u64::try_from(duration.as_nanos().saturating_mul(u128::from(rate)) / 1_000_000_000).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_due_at_even_intervals_from_the_start() {
        assert_eq!(due(0, 1000), Duration::ZERO);
        assert_eq!(due(1, 1000), Duration::from_millis(1));
        assert_eq!(due(1500, 1000), Duration::from_millis(1500));
        assert_eq!(due(1, 3), Duration::from_nanos(333_333_333));
        assert_eq!(due(3, 3), Duration::from_secs(1));
        assert_eq!(count(Duration::from_secs(10), 2500), 25_000);
        assert_eq!(count(Duration::from_millis(500), 3), 1);
    }
}
