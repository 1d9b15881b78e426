//! HTTP field syntax (RFC 9110 section 5): what a header name and value may hold, so that a
//! request whose headers a proxy would have refused (or a direct caller crafted) is refused here
//! too instead of being decided on and passed on.

/// RFC 9110 section 5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
        )
}

/// A field name: a non-empty token (section 5.1), or an HTTP/2 pseudo-header (`:path`, RFC 9113
/// section 8.3) as Envoy reports them.
pub fn valid_name(name: &str) -> bool {
    let token = name.strip_prefix(':').unwrap_or(name);
    !token.is_empty() && token.bytes().all(is_tchar)
}

/// A field value: visible characters, obs-text, spaces and tabs only (section 5.5). CR, LF and
/// NUL (which section 5.5 says a recipient must reject or replace) and every other control
/// character are refused: we refuse rather than replace, since the value is passed on.
pub fn valid_value(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_tokens_and_values_hold_no_control_characters() {
        for n in ["user-agent", "x-api-key", ":path", ":authority", "X_Custom.1~"] {
            assert!(valid_name(n), "{n:?}");
        }
        for n in ["", ":", "bad name", "x-in\njected", "a:b", "caf\u{e9}", "x\0", "(x)"] {
            assert!(!valid_name(n), "{n:?}");
        }
        for v in ["ok", "", "a b\tc", "caf\u{e9}", "!~\"'"] {
            assert!(valid_value(v.as_bytes()), "{v:?}");
        }
        for v in ["ok\r\nx-injected: 1", "ok\nx", "ok\rx", "nul\0", "bell\x07", "del\x7f"] {
            assert!(!valid_value(v.as_bytes()), "{v:?}");
        }
    }
}
