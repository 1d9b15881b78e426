//! Path normalization, done once before any matching, so that a rule about `/admin` cannot be
//! bypassed with `/api/v1/../../admin`, `//admin`, `/%61dmin` or `/ADMIN`.
//!
//! The rules follow RFC 3986: percent-encoded *unreserved* characters are decoded (section 2.3,
//! they are equivalent), dot segments are removed (section 5.2.4), and repeated slashes are
//! merged as most upstream servers do. What cannot be normalized safely is refused: a `..` that
//! climbs above the root, an encoded `/` (`%2F`) or `\` (`%5C`) that an upstream might decode
//! into a separator, an encoded or raw NUL or other control byte, a raw backslash, and a broken
//! escape. Case is kept here; route matching compares ASCII case-insensitively.
//!
//! Upstreams read more into a path than RFC 3986 does, so a segment is also refused when a
//! later reader could turn it into a separator or a dot segment: Tomcat, Jetty and Spring drop
//! `;` path parameters before resolving dot segments (`..;jsessionid=1` is `..` to them), a
//! second decoder turns `%252e` into `.`, and a reader that applies Unicode compatibility
//! normalization (NFKC) turns `\u{ff0e}` (fullwidth full stop) into `.` and `\u{ff0f}` into
//! `/`. `Normalized::further` is the path such a reader would see, so that the caller can
//! refuse a path whose further decoding would match another rule.

use std::borrow::Cow;
use std::fmt;

/// Why a path was refused (the request gets a 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    Empty,
    NotAbsolute,
    EscapesRoot,
    EncodedSeparator,
    ControlCharacter,
    Backslash,
    BadEscape,
    /// a segment that reads as empty, `.` or `..` once its `;` parameters are dropped, decoded
    /// again or compatibility-normalized (`..;x`, `;x`, `%252e%252e`, `\u{ff0e}\u{ff0e}`), or
    /// that keeps changing under further decoding
    HiddenDotSegment,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::Empty => "empty path",
            PathError::NotAbsolute => "path does not start with /",
            PathError::EscapesRoot => "path climbs above the root",
            PathError::EncodedSeparator => "path carries an encoded / or \\",
            PathError::ControlCharacter => "path carries a NUL or control character",
            PathError::Backslash => "path carries a backslash",
            PathError::BadEscape => "path carries a malformed percent escape",
            PathError::HiddenDotSegment => "path carries a segment an upstream may read as empty, . or ..",
        })
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Splits `:path` into the path and the query (without the `?`); a fragment is dropped.
pub fn split_query(raw: &str) -> (&str, &str) {
    let raw = raw.split_once('#').map_or(raw, |(p, _)| p);
    raw.split_once('?').unwrap_or((raw, ""))
}

/// A normalized path, and the path a later reader that decodes further would see, when that
/// differs (each segment decoded again and NFKC-normalized until nothing changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalized {
    pub path: String,
    pub further: Option<String>,
}

/// Normalizes the path part of a request target (the query is not part of the input).
pub fn normalize(path: &str) -> Result<Normalized, PathError> {
    let bytes = path.as_bytes();
    if bytes.is_empty() {
        return Err(PathError::Empty);
    }
    if bytes[0] != b'/' {
        return Err(PathError::NotAbsolute);
    }
    // Pass 1: decode unreserved escapes, refuse dangerous ones, upper-case the hex of the rest.
    let mut decoded = String::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'%' => {
                let (h, l) = match (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::BadEscape),
                };
                let v = (h << 4) | l;
                if v == b'/' || v == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if v < 0x20 || v == 0x7f {
                    return Err(PathError::ControlCharacter);
                }
                if is_unreserved(v) {
                    decoded.push(v as char);
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[h as usize]));
                    decoded.push(char::from(b"0123456789ABCDEF"[l as usize]));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            _ => {
                // Copy a run of ordinary bytes at once; `path` is a str, so runs end on char
                // boundaries (every special byte above is ASCII).
                let start = i;
                while i < bytes.len() && !matches!(bytes[i], b'%' | b'\\' | 0..=0x1f | 0x7f) {
                    i += 1;
                }
                decoded.push_str(&path[start..i]);
            }
        }
    }
    // Pass 2: remove dot segments and empty segments; each kept segment with what a further
    // decoding makes of it, when that differs.
    let trailing_slash = decoded.len() > 1 && decoded.ends_with('/');
    let mut segments: Vec<(&str, Option<String>)> = Vec::with_capacity(8);
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
            }
            s => {
                let further = check_segment(s)?;
                segments.push((s, further));
            }
        }
    }
    let ends_in_dir = trailing_slash || decoded.ends_with("/.") || decoded.ends_with("/..");
    let join = |further: bool| {
        let mut out = String::with_capacity(decoded.len());
        for (s, f) in &segments {
            out.push('/');
            out.push_str(f.as_deref().filter(|_| further).unwrap_or(s));
        }
        if out.is_empty() || ends_in_dir {
            out.push('/');
        }
        out
    };
    // A segment decodes further without a separator (`check_segment` refuses those), so the
    // segments decoded one by one are the path decoded whole.
    let further = segments.iter().any(|(_, f)| f.is_some()).then(|| join(true));
    Ok(Normalized { path: join(false), further })
}

/// Most rounds of percent-decoding and NFKC tried when looking for what a later hop could see; a
/// path still changing after them is refused.
pub const MAX_DECODE_ROUNDS: usize = 8;

/// `s` with every valid percent escape decoded, once; `None` when there is none.
fn decode_once(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut changed = false;
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && let (Some(h), Some(l)) = (s.get(i + 1).copied().and_then(hex), s.get(i + 2).copied().and_then(hex))
        {
            out.push((h << 4) | l);
            changed = true;
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    changed.then_some(out)
}

/// `s` as a reader that decodes every escape and applies Unicode compatibility normalization
/// (NFKC, as Java's `Normalizer`, IIS and Python's `unicodedata` apply it), in any order and as
/// often as it likes, would see it: both are repeated until nothing changes. `None` when that
/// takes more than `MAX_DECODE_ROUNDS`, or when the decoded bytes hold an overlong UTF-8 lead
/// byte (0xC0, 0xC1: never valid, read as `.` or `/` by old lenient decoders). Other bytes that
/// are not UTF-8 are replaced (U+FFFD), which never creates a dot or a separator. ASCII without
/// a `%` is returned as it is, without allocating.
fn decoded_further(s: &str) -> Option<Cow<'_, str>> {
    use unicode_normalization::UnicodeNormalization;
    if s.is_ascii() && !s.contains('%') {
        return Some(Cow::Borrowed(s));
    }
    let mut text = Cow::Borrowed(s);
    for _ in 0..MAX_DECODE_ROUNDS {
        let mut next = match decode_once(text.as_bytes()) {
            Some(bytes) if bytes.iter().any(|&b| b == 0xC0 || b == 0xC1) => return None,
            Some(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
            None => text.clone(),
        };
        if !next.is_ascii() {
            next = Cow::Owned(next.nfkc().collect());
        }
        if next == text {
            return Some(text);
        }
        text = next;
    }
    None
}

/// Refuses a segment (neither empty, `.` nor `..` itself) that a later reader could take for an
/// empty or dot segment or split in two: its part before a `;` (or an encoded `;`), decoded
/// further, is empty, `.` or `..`; or the whole segment, decoded further, holds a separator or a
/// control byte. Otherwise, the segment decoded further when that differs from it.
fn check_segment(seg: &str) -> Result<Option<String>, PathError> {
    // only a `%`, a `;` or a non-ASCII character can hide anything (a plain `.` or `..` never
    // reaches here)
    if !seg.bytes().any(|b| b == b'%' || b == b';' || !b.is_ascii()) {
        return Ok(None);
    }
    let full = decoded_further(seg).ok_or(PathError::HiddenDotSegment)?;
    // `..;x` is `..` and `;x` an empty segment (which the upstream merges away) once the
    // parameters are dropped
    let head = full.split(';').next().unwrap_or("");
    if head.is_empty() || head == "." || head == ".." {
        return Err(PathError::HiddenDotSegment);
    }
    if full.contains(['/', '\\']) {
        return Err(PathError::EncodedSeparator);
    }
    if full.chars().any(|c| c.is_control()) {
        return Err(PathError::ControlCharacter);
    }
    Ok(match full {
        Cow::Owned(f) if f != seg => Some(f),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, PathError>) {
        assert_eq!(normalize(input).as_ref().map(|n| n.path.as_str()).map_err(|e| *e), expected, "input {input:?}");
    }

    #[test]
    fn ordinary_paths_are_unchanged() {
        check("/", Ok("/"));
        check("/api/v1/users", Ok("/api/v1/users"));
        check("/api/v1/users/", Ok("/api/v1/users/"));
        check("/files/a%20b", Ok("/files/a%20b"));
        check("/caf\u{e9}", Ok("/caf\u{e9}"));
    }

    #[test]
    fn bypass_attempts_normalize_to_what_the_upstream_would_serve() {
        check("/api/v1/../../admin", Ok("/admin"));
        check("/api/v1/../../../admin", Err(PathError::EscapesRoot));
        check("/api/v1/../admin/x", Ok("/api/admin/x"));
        check("/api/v1/%2e%2e/admin", Ok("/api/admin"));
        check("/api/v1/%2E%2E/%2e%2e/admin/users", Ok("/admin/users"));
        check("/api/./v1/./x", Ok("/api/v1/x"));
        check("//admin//users", Ok("/admin/users"));
        check("/%61dmin", Ok("/admin"));
        check("/ADMIN", Ok("/ADMIN"));
        check("/a/b/..", Ok("/a/"));
        check("/a/.", Ok("/a/"));
        check("/..", Err(PathError::EscapesRoot));
        check("/%2e%2e/etc/passwd", Err(PathError::EscapesRoot));
    }

    #[test]
    fn dangerous_encodings_are_refused() {
        check("/api/v1%2f..%2fadmin", Err(PathError::EncodedSeparator));
        check("/api/v1%2F", Err(PathError::EncodedSeparator));
        check("/api%5cadmin", Err(PathError::EncodedSeparator));
        check("/api\\admin", Err(PathError::Backslash));
        check("/api%00.json", Err(PathError::ControlCharacter));
        check("/api\0", Err(PathError::ControlCharacter));
        check("/api\n", Err(PathError::ControlCharacter));
        check("/api%0a", Err(PathError::ControlCharacter));
        check("/api%zz", Err(PathError::BadEscape));
        check("/api%2", Err(PathError::BadEscape));
        check("api/v1", Err(PathError::NotAbsolute));
        check("", Err(PathError::Empty));
        check("*", Err(PathError::NotAbsolute));
    }

    #[test]
    fn segments_an_upstream_may_read_as_dot_segments_are_refused() {
        // `;` path parameters, dropped by Tomcat, Jetty and Spring before dot segments resolve
        check("/api/v1/..;/admin/users", Err(PathError::HiddenDotSegment));
        check("/api/v1/%2e%2e;/admin/users", Err(PathError::HiddenDotSegment));
        check("/api/v1/%2E.;jsessionid=1/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1/.;x/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1/..%3b/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1/..%3B/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1/x/y/;/;/../../../../admin/users", Err(PathError::HiddenDotSegment));
        check("/api/v1/;jsessionid=1/x", Err(PathError::HiddenDotSegment));
        check("/api/v1/%3B/x", Err(PathError::HiddenDotSegment));
        // five layers of encoding, a fullwidth `%`, an overlong UTF-8 dot
        check("/api/v1/%25252525252e%25252525252e/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1/\u{ff05}2e\u{ff05}2e/admin/x", Err(PathError::HiddenDotSegment));
        check("/api/v1/%c0%ae%c0%ae/admin", Err(PathError::HiddenDotSegment));
        // a second decoder
        check("/api/v1/%252e%252e/%252e%252e/admin/x", Err(PathError::HiddenDotSegment));
        check("/api/v1/%25252e%25252e/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1/.%252e/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1%252f..%252fadmin", Err(PathError::EncodedSeparator));
        check("/api/v1/a%255cb", Err(PathError::EncodedSeparator));
        check("/api/v1/a%2500b", Err(PathError::ControlCharacter));
        // compatibility normalization (fullwidth and leader dots, fullwidth solidus), raw or encoded
        check("/api/v1/\u{ff0e}\u{ff0e}/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1/\u{2025}/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1/%EF%BC%8E%EF%BC%8E/admin", Err(PathError::HiddenDotSegment));
        check("/api/v1\u{ff0f}..\u{ff0f}admin", Err(PathError::EncodedSeparator));
        // ordinary dots, semicolons and escapes still pass
        check("/files/report.v2.pdf", Ok("/files/report.v2.pdf"));
        check("/files/...", Ok("/files/..."));
        check("/files/a;v=1", Ok("/files/a;v=1"));
        check("/files/100%25", Ok("/files/100%25"));
        check("/files/a%20b.txt", Ok("/files/a%20b.txt"));
    }

    #[test]
    fn decoding_further_shows_what_a_later_hop_sees() {
        assert_eq!(decoded_further("/api/v1/%252e%252e/admin").as_deref(), Some("/api/v1/../admin"));
        assert_eq!(decoded_further("/%2561dmin").as_deref(), Some("/admin"));
        assert_eq!(decoded_further("/\u{ff41}dmin").as_deref(), Some("/admin"));
        assert_eq!(decoded_further("/100%").as_deref(), Some("/100%"));
        assert_eq!(decoded_further("/a%FFb").as_deref(), Some("/a\u{fffd}b"));
        assert_eq!(decoded_further("/\u{ff05}61dmin").as_deref(), Some("/admin"), "NFKC, then decoding");
        let mut deep = String::from("/%61dmin");
        for _ in 0..MAX_DECODE_ROUNDS {
            deep = deep.replace('%', "%25");
        }
        assert_eq!(decoded_further(&deep), None, "still changing after every round");
        // the whole path, as `normalize` reports it: only when it differs
        let further = |p: &str| normalize(p).expect("normalizes").further;
        assert_eq!(further("/%2561dmin/x/").as_deref(), Some("/admin/x/"));
        assert_eq!(further("/a/b/../\u{ff41}%2520c").as_deref(), Some("/a/a c"));
        assert_eq!(further("/files/report.v2.pdf;v=1"), None);
        assert_eq!(further("/api/v1/users"), None);
    }

    #[test]
    fn reserved_escapes_stay_encoded_with_upper_case_hex() {
        check("/a%3fb", Ok("/a%3Fb"));
        check("/q%25", Ok("/q%25"));
    }

    #[test]
    fn query_and_fragment_are_split_off() {
        assert_eq!(split_query("/a/b?x=1&y=2"), ("/a/b", "x=1&y=2"));
        assert_eq!(split_query("/a#frag?x"), ("/a", ""));
        assert_eq!(split_query("/a"), ("/a", ""));
    }
}
