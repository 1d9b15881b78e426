//! Route path patterns: segments separated by `/`; `*` matches within one segment, a `**`
//! segment matches zero or more whole segments. Matching is ASCII case-insensitive, so a rule
//! written for `/admin/**` also holds `/ADMIN/x` (many upstreams fold case).

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// literal text, stored lower-case
    Literal(String),
    /// a segment with `*` wildcards, split at the stars (lower-case parts)
    Wild(Vec<String>),
    /// `**`
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    segments: Vec<Segment>,
    /// the pattern ends with `/` (a literal directory), e.g. `/docs/`
    trailing_slash: bool,
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl PathPattern {
    pub fn parse(src: &str) -> Result<Self, String> {
        if !src.starts_with('/') {
            return Err(format!("invalid path pattern {src:?}: it must start with /"));
        }
        let mut segments = Vec::new();
        let body = &src[1..];
        let trailing_slash = body.ends_with('/') && !body.is_empty();
        for seg in body.split('/').filter(|s| !s.is_empty()) {
            if seg == "**" {
                segments.push(Segment::Any);
            } else if seg.contains("**") {
                return Err(format!("invalid path pattern {src:?}: `**` must be a whole segment"));
            } else if seg == "." || seg == ".." {
                return Err(format!("invalid path pattern {src:?}: dot segments never match a normalized path"));
            } else if seg.contains('*') {
                segments.push(Segment::Wild(seg.split('*').map(str::to_ascii_lowercase).collect()));
            } else {
                segments.push(Segment::Literal(seg.to_ascii_lowercase()));
            }
        }
        Ok(PathPattern { source: src.to_owned(), segments, trailing_slash })
    }

    /// Matches a normalized path (no query, no dot segments, no empty segments).
    pub fn matches(&self, path: &str) -> bool {
        let body = path.strip_prefix('/').unwrap_or(path);
        if self.trailing_slash && !path.ends_with('/') {
            return false;
        }
        // Segments on the stack for ordinary paths: a route is tried per request.
        let mut buf: [&str; 32] = [""; 32];
        let mut n = 0;
        for seg in body.split('/').filter(|s| !s.is_empty()) {
            if n == buf.len() {
                let segs: Vec<&str> = body.split('/').filter(|s| !s.is_empty()).collect();
                return match_from(&self.segments, &segs);
            }
            buf[n] = seg;
            n += 1;
        }
        match_from(&self.segments, &buf[..n])
    }
}

fn match_from(pat: &[Segment], segs: &[&str]) -> bool {
    match pat.split_first() {
        None => segs.is_empty(),
        Some((Segment::Any, rest)) => (0..=segs.len()).any(|skip| match_from(rest, &segs[skip..])),
        Some((p, rest)) => match segs.split_first() {
            Some((s, srest)) => segment_matches(p, s) && match_from(rest, srest),
            None => false,
        },
    }
}

fn segment_matches(p: &Segment, s: &str) -> bool {
    match p {
        Segment::Literal(l) => l.eq_ignore_ascii_case(s),
        Segment::Wild(parts) => wild_matches(parts, s),
        Segment::Any => true,
    }
}

/// `parts` are the pieces between stars: the first must be a prefix, the last a suffix, the
/// middle ones found in order.
fn wild_matches(parts: &[String], s: &str) -> bool {
    let (Some(first), Some(last)) = (parts.first(), parts.last()) else {
        return true;
    };
    let s = s.as_bytes();
    if parts.len() == 1 {
        return s.eq_ignore_ascii_case(first.as_bytes());
    }
    if s.len() < first.len() + last.len()
        || !s[..first.len()].eq_ignore_ascii_case(first.as_bytes())
        || !s[s.len() - last.len()..].eq_ignore_ascii_case(last.as_bytes())
    {
        return false;
    }
    let mut rest = &s[first.len()..s.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        let m = mid.as_bytes();
        match rest.windows(m.len().max(1)).position(|w| m.is_empty() || w.eq_ignore_ascii_case(m)) {
            Some(i) => rest = &rest[i + m.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(pattern: &str, path: &str, expected: bool) {
        let p = PathPattern::parse(pattern).expect("test pattern");
        assert_eq!(p.matches(path), expected, "{pattern} against {path}");
    }

    #[test]
    fn route_patterns_match_as_documented() {
        let table = [
            ("/health", "/health", true),
            ("/health", "/health/", true),
            ("/health", "/healthz", false),
            ("/health", "/HEALTH", true),
            ("/api/v1/**", "/api/v1", true),
            ("/api/v1/**", "/api/v1/", true),
            ("/api/v1/**", "/api/v1/users/42/orders", true),
            ("/api/v1/**", "/api/v2/users", false),
            ("/api/v1/**", "/API/V1/users", true),
            ("/admin/**", "/ADMIN/users", true),
            ("/admin/**", "/administrator", false),
            ("/api/*/users", "/api/v1/users", true),
            ("/api/*/users", "/api/v1/v2/users", false),
            ("/files/*.json", "/files/a.json", true),
            ("/files/*.json", "/files/a.JSON", true),
            ("/files/*.json", "/files/a.xml", false),
            ("/files/a*b*c", "/files/aXXbYYc", true),
            ("/files/a*b*c", "/files/acb", false),
            ("/**/secret", "/x/y/secret", true),
            ("/**/secret", "/secret", true),
            ("/**", "/", true),
            ("/docs/", "/docs", false),
            ("/docs/", "/docs/", true),
        ];
        for (p, path, want) in table {
            check(p, path, want);
        }
    }

    #[test]
    fn malformed_patterns_are_refused() {
        for p in ["api/v1", "/api/**x", "/a/../b"] {
            assert!(PathPattern::parse(p).is_err(), "{p}");
        }
    }
}
