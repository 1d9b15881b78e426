//! The one place that reads the clock. Everything else takes time as an argument.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use decision_core::units::Micros;

/// A shift applied to this instance's clock (tests of clock skew only; zero otherwise).
static OFFSET_MICROS: AtomicI64 = AtomicI64::new(0);

/// Shifts this instance's clock by `micros` (the hidden `--clock-offset-secs`, for skew tests).
pub fn set_offset(micros: i64) {
    OFFSET_MICROS.store(micros, Ordering::Relaxed);
}

/// Microseconds since the Unix epoch.
#[allow(clippy::disallowed_methods)]
pub fn now_micros() -> Micros {
    let now =
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    now.saturating_add_signed(OFFSET_MICROS.load(Ordering::Relaxed))
}

/// A monotonic instant, for measuring how long something took.
#[allow(clippy::disallowed_methods)]
pub fn instant() -> Instant {
    Instant::now()
}

/// RFC 3339 in UTC with second precision, e.g. `2025-03-23T19:00:00Z`.
pub fn rfc3339(micros: Micros) -> String {
    let secs = micros / 1_000_000;
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_742_756_400 * 1_000_000), "2025-03-23T19:00:00Z");
        assert_eq!(rfc3339(951_782_400 * 1_000_000 + 1), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(4_102_444_799 * 1_000_000), "2099-12-31T23:59:59Z");
    }
}
