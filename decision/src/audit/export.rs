//! `portcullis audit export`: the events of a `redis_stream` sink, read back as the JSON lines
//! `audit verify` takes, oldest first.

use std::io::Write;
use std::time::Duration;

/// Stream entries read per XRANGE call.
pub const PAGE: usize = 1000;
/// How long connecting to Redis may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an export stopped.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("the Redis URL: {0}")]
    Url(redis::RedisError),
    #[error("connecting to Redis: {0}")]
    Connect(redis::RedisError),
    #[error("XRANGE {key}: {source}")]
    Read { key: String, source: redis::RedisError },
    #[error("writing the events: {0}")]
    Write(#[from] std::io::Error),
}

/// Writes the `event` field of every entry of the stream `key` at `url` to `out`, one line each,
/// in stream order, paging with XRANGE (`PAGE` entries a call, exclusive ranges after the first
/// page). Returns how many events were written.
pub fn redis_stream(url: &str, key: &str, out: &mut impl Write) -> Result<u64, ExportError> {
    let client = redis::Client::open(url).map_err(ExportError::Url)?;
    let mut conn = client.get_connection_with_timeout(CONNECT_TIMEOUT).map_err(ExportError::Connect)?;
    let mut from = "-".to_owned();
    let mut written = 0;
    loop {
        let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE)
            .query(&mut conn)
            .map_err(|source| ExportError::Read { key: key.to_owned(), source })?;
        let Some((last, _)) = page.last() else { break };
        from = format!("({last}");
        for (_, fields) in &page {
            for (name, value) in fields {
                if name == "event" {
                    out.write_all(value.as_bytes())?;
                    out.write_all(b"\n")?;
                    written += 1;
                }
            }
        }
    }
    out.flush()?;
    Ok(written)
}
