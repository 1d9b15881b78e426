//! The request path as the example Envoy config forwards it (`normalize_path`, `merge_slashes`,
//! `path_with_escaped_slashes_action: REJECT_REQUEST`): RFC 3986 section 6.2.2 normalization
//! (percent-encodings of unreserved characters decoded, the others upper-cased, dot segments
//! removed per section 5.2.4), runs of slashes merged, and an encoded slash or backslash
//! refused. The upstream gets the path that was decided, never the raw one.
//!
//! Not `decision_core::path::normalize`: that one is the decision's, stricter than Envoy (it
//! refuses a `..` above the root, which Envoy clamps, and the segments a later decoder could
//! read as dots). The shim forwards what Envoy would, and portcullis then normalizes the Check's
//! path with its own rules and refuses what they refuse, exactly as behind Envoy.

/// Why a path was refused (400).
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// `%2F` or `%5C`: a slash the upstream might decode into a different path.
    EscapedSlash,
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// Not starting with `/` (origin-form, RFC 9112 section 3.2.1).
    NotOriginForm,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalizes `path_and_query`; the query is kept as it is.
pub fn normalize(path_and_query: &str) -> Result<String, PathError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    // percent-encodings: unreserved decoded, the rest upper-cased; escaped slashes refused
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let (Some(h), Some(l)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
            else {
                return Err(PathError::BadEscape);
            };
            let c = h * 16 + l;
            if c == b'/' || c == b'\\' {
                return Err(PathError::EscapedSlash);
            }
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                decoded.push(char::from(c));
            } else {
                decoded.push_str(&format!("%{c:02X}"));
            }
            i += 3;
        } else {
            decoded.push(char::from(bytes[i]));
            i += 1;
        }
    }
    // dot segments (RFC 3986 5.2.4) over merged slashes
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut trailing_slash = false;
    for (n, seg) in segments.iter().enumerate() {
        match *seg {
            "" => trailing_slash = n == last,
            "." => trailing_slash = n == last,
            ".." => {
                out.pop();
                trailing_slash = n == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut result = String::with_capacity(decoded.len() + query.map_or(0, |q| q.len() + 1));
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if out.is_empty() || trailing_slash {
        result.push('/');
    }
    if let Some(q) = query {
        result.push('?');
        result.push_str(q);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_as_envoy_forwards_them() {
        for (raw, want) in [
            ("/", "/"),
            ("/api/v1/items", "/api/v1/items"),
            ("/api/v1/items/", "/api/v1/items/"),
            ("//api///v1//items", "/api/v1/items"),
            ("/api/v1/./items", "/api/v1/items"),
            ("/admin/../api/v1/items", "/api/v1/items"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/%61pi/v1", "/api/v1"),
            ("/a%2e%2e/x", "/a../x"),
            ("/a/%2e%2e/x", "/x"),
            ("/a%20b%3f", "/a%20b%3F"),
            ("/a/../b?x=/../y&z=%2F", "/b?x=/../y&z=%2F"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(want), "{raw}");
        }
        assert_eq!(normalize("/a%2Fb"), Err(PathError::EscapedSlash));
        assert_eq!(normalize("/a%5cb"), Err(PathError::EscapedSlash));
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape));
        assert_eq!(normalize("*"), Err(PathError::NotOriginForm));
    }
}
