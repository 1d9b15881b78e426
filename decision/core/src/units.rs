//! Human-readable quantities from the policy file: durations (`30s`), sizes (`5MB`),
//! rates (`10/minute`) and shares (`80%`), parsed exactly, with errors that name the value.

use std::fmt;

/// Microseconds: the unit of every duration and instant in the core.
pub type Micros = u64;

pub const MICROS_PER_MILLI: Micros = 1_000;
pub const MICROS_PER_SEC: Micros = 1_000_000;
pub const MICROS_PER_MINUTE: Micros = 60 * MICROS_PER_SEC;
pub const MICROS_PER_HOUR: Micros = 60 * MICROS_PER_MINUTE;
pub const MICROS_PER_DAY: Micros = 24 * MICROS_PER_HOUR;

/// A value that could not be read; the message names the value and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitError(pub String);

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    let n = s[..end].parse().ok()?;
    Some((n, s[end..].trim()))
}

/// `250ms`, `30s`, `15m`, `1h`, `7d`: a whole number and one unit.
pub fn parse_duration(s: &str) -> Result<Micros, UnitError> {
    let bad = || {
        UnitError(format!(
            "invalid duration {s:?}: expected a whole number and a unit (us, ms, s, m, h, d), e.g. \"30s\""
        ))
    };
    let (n, unit) = split_number(s).ok_or_else(bad)?;
    let scale = match unit {
        "us" => 1,
        "ms" => MICROS_PER_MILLI,
        "s" => MICROS_PER_SEC,
        "m" => MICROS_PER_MINUTE,
        "h" => MICROS_PER_HOUR,
        "d" => MICROS_PER_DAY,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(|| UnitError(format!("duration {s:?} is too large")))
}

/// `512B`, `16KB`, `5MB`, `1GB` (powers of 1024, as proxies count buffer sizes).
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let bad =
        || UnitError(format!("invalid size {s:?}: expected a whole number and a unit (B, KB, MB, GB), e.g. \"5MB\""));
    let (n, unit) = split_number(s).ok_or_else(bad)?;
    let scale: u64 = match unit.to_ascii_uppercase().as_str() {
        "B" | "" => 1,
        "KB" | "KIB" => 1 << 10,
        "MB" | "MIB" => 1 << 20,
        "GB" | "GIB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(scale).ok_or_else(|| UnitError(format!("size {s:?} is too large")))
}

/// A count per period: `10/minute`, `5/s`, `100000/day`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub per: Micros,
}

pub fn parse_rate(s: &str) -> Result<Rate, UnitError> {
    let bad = || {
        UnitError(format!(
            "invalid rate {s:?}: expected COUNT/PERIOD with PERIOD one of second, minute, hour, day, e.g. \"10/minute\""
        ))
    };
    let (count, rest) = s.split_once('/').ok_or_else(bad)?;
    let count: u64 = count.trim().parse().map_err(|_| bad())?;
    let per = match rest.trim() {
        "s" | "sec" | "second" => MICROS_PER_SEC,
        "m" | "min" | "minute" => MICROS_PER_MINUTE,
        "h" | "hour" => MICROS_PER_HOUR,
        "d" | "day" => MICROS_PER_DAY,
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(UnitError(format!("invalid rate {s:?}: the count must be at least 1")));
    }
    Ok(Rate { count, per })
}

/// `80%` as basis points (8000), so `12.5%` is exact too.
pub fn parse_percent(s: &str) -> Result<u32, UnitError> {
    let bad = || UnitError(format!("invalid percentage {s:?}: expected e.g. \"80%\" (0% to 100%)"));
    let num = s.trim().strip_suffix('%').ok_or_else(bad)?.trim();
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if whole.is_empty()
        || frac.len() > 2
        || !whole.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    let whole: u32 = whole.parse().map_err(|_| bad())?;
    let frac: u32 = if frac.is_empty() { 0 } else { format!("{frac:0<2}").parse().map_err(|_| bad())? };
    let bp = whole.checked_mul(100).and_then(|w| w.checked_add(frac)).ok_or_else(bad)?;
    if bp > 10_000 {
        return Err(bad());
    }
    Ok(bp)
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's days_from_civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// An RFC 3339 timestamp (`2026-01-31T12:00:00Z`, `...12:00:00.5+02:00`) in microseconds since
/// the epoch; instants before 1970 are refused.
pub fn parse_rfc3339(s: &str) -> Result<Micros, UnitError> {
    let bad = || UnitError(format!("invalid timestamp {s:?}: expected RFC 3339, e.g. \"2026-01-31T12:00:00Z\""));
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't') || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| {
        s.get(r).filter(|x| x.bytes().all(|c| c.is_ascii_digit())).and_then(|x| x.parse::<i64>().ok()).ok_or_else(bad)
    };
    let (y, mo, d, h, mi, se) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    let mut micros = 0i64;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        let f = &frac[..digits.min(6)];
        micros = f.parse::<i64>().map_err(|_| bad())? * 10i64.pow(6 - f.len() as u32);
        rest = &frac[digits..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let oh: i64 = o[1..3].parse().map_err(|_| bad())?;
            let om: i64 = o[4..6].parse().map_err(|_| bad())?;
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return Err(bad()),
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se - offset;
    u64::try_from(secs * 1_000_000 + micros).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_timestamps_parse_with_offsets_and_fractions() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2025-03-23T19:00:00Z"), Ok(1_742_756_400 * MICROS_PER_SEC));
        assert_eq!(parse_rfc3339("2025-03-23T15:00:00-04:00"), Ok(1_742_756_400 * MICROS_PER_SEC));
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00.25Z"), Ok(951_782_400 * MICROS_PER_SEC + 250_000));
        for s in [
            "2025-03-23",
            "2025-13-01T00:00:00Z",
            "2025-03-23T19:00:00",
            "1969-12-31T23:59:59Z",
            "2025-03-23T19:00:00+0400",
            "yesterday",
        ] {
            assert!(parse_rfc3339(s).is_err(), "{s}");
        }
    }

    #[test]
    fn durations_parse_with_every_unit_and_refuse_the_rest() {
        let ok = [
            ("25ms", 25_000),
            ("30s", 30_000_000),
            ("15m", 900_000_000),
            ("1h", 3_600_000_000),
            ("0s", 0),
            ("2d", 2 * MICROS_PER_DAY),
        ];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(want), "{s}");
        }
        for s in ["", "s", "30", "30 sec", "-1s", "1.5s", "30S", "99999999999999999999s"] {
            assert!(parse_duration(s).is_err(), "{s} should be refused");
        }
    }

    #[test]
    fn sizes_are_binary_multiples() {
        assert_eq!(parse_size("5MB"), Ok(5 * 1024 * 1024));
        assert_eq!(parse_size("16KB"), Ok(16 * 1024));
        assert_eq!(parse_size("100"), Ok(100));
        for s in ["MB", "5XB", "-5MB", "5.5MB"] {
            assert!(parse_size(s).is_err(), "{s}");
        }
    }

    #[test]
    fn rates_name_their_period() {
        assert_eq!(parse_rate("10/minute"), Ok(Rate { count: 10, per: MICROS_PER_MINUTE }));
        assert_eq!(parse_rate("1000/minute"), Ok(Rate { count: 1000, per: MICROS_PER_MINUTE }));
        assert_eq!(parse_rate("5/second"), Ok(Rate { count: 5, per: MICROS_PER_SEC }));
        for s in ["10", "10/fortnight", "0/minute", "x/minute", "/minute"] {
            assert!(parse_rate(s).is_err(), "{s}");
        }
    }

    #[test]
    fn percentages_become_basis_points() {
        assert_eq!(parse_percent("80%"), Ok(8000));
        assert_eq!(parse_percent("12.5%"), Ok(1250));
        assert_eq!(parse_percent("100%"), Ok(10000));
        for s in ["80", "101%", "%", "1.234%", "-5%"] {
            assert!(parse_percent(s).is_err(), "{s}");
        }
    }
}
