//! Path normalization, done once before any matching, so that a rule about `/admin` cannot be
//! bypassed with `/api/v1/../../admin`, `//admin`, `/%61dmin` or `/ADMIN`.
//!
//! The rules follow RFC 3986: percent-encoded *unreserved* characters are decoded (section 2.3,
//! they are equivalent), dot segments are removed (section 5.2.4), and repeated slashes are
//! merged as most upstream servers do. What cannot be normalized safely is refused: a `..` that
//! climbs above the root, an encoded `/` (`%2F`) or `\` (`%5C`) that an upstream might decode
//! into a separator, an encoded or raw NUL or other control byte, a raw backslash, and a broken
//! escape. Case is kept here; route matching compares ASCII case-insensitively.

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

/// Normalizes the path part of a request target (the query is not part of the input).
pub fn normalize(path: &str) -> Result<String, PathError> {
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
    // Pass 2: remove dot segments and empty segments.
    let trailing_slash = decoded.len() > 1 && decoded.ends_with('/');
    let mut segments: Vec<&str> = Vec::with_capacity(8);
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(PathError::EscapesRoot);
                }
            }
            s => segments.push(s),
        }
    }
    let ends_in_dir = trailing_slash || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if out.is_empty() || ends_in_dir {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: Result<&str, PathError>) {
        assert_eq!(normalize(input).as_deref().map_err(|e| *e), expected, "input {input:?}");
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
