//! Thin adapters: they translate wire messages to the core's `Request` and decisions back to
//! wire answers; they do not decide.

pub mod accesslog;
pub mod ext_authz;
pub mod forward_auth;
pub mod http_check;
pub mod native;
pub mod ratelimit;
pub mod respond;

/// When to stop working for the caller: `started` plus the call's `grpc-timeout` (the gRPC over
/// HTTP/2 protocol: at most 8 digits and a unit, `H` `M` `S` `m` `u` `n`), less a tenth of it
/// (at most 5 ms), so that the engine gives up, records the decision and answers
/// DEADLINE_EXCEEDED before tonic's own timer (started when the call arrived) drops the work
/// and answers CANCELLED. None without the header, or with one that does not parse (it is then
/// ignored, as the protocol's other readers do).
pub fn grpc_deadline(
    metadata: &tonic::metadata::MetadataMap,
    started: std::time::Instant,
) -> Option<std::time::Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let timeout = parse_grpc_timeout(value)?;
    let margin = (timeout / 10).min(std::time::Duration::from_millis(5));
    started.checked_add(timeout - margin)
}

/// A `grpc-timeout` value as a duration.
fn parse_grpc_timeout(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::parse_grpc_timeout;

    #[test]
    fn grpc_timeouts_parse_as_the_protocol_writes_them() {
        assert_eq!(parse_grpc_timeout("1n"), Some(Duration::from_nanos(1)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        for bad in ["", "m", "100", "123456789m", "-1m", "1.5S", "10x", "1 m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
