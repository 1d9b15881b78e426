//! Asking portcullis what Envoy asks: the ext_authz v3 CheckRequest built from a request's
//! attributes (source and destination, method, path, host, headers, scheme, protocol, TLS
//! session, the peer certificate), the CheckResponse applied as Envoy's ext_authz filter applies
//! it, the ratelimit v3 call with the example Envoy route's descriptors, and the completion sent
//! to `portcullis.v1.Decision/Complete` in place of Envoy's access log.

use std::collections::HashMap;
use std::net::SocketAddr;

use hyper::HeaderMap;
use hyper::header::{HeaderName, HeaderValue};
use proto::ext_authz::attribute_context::{HttpRequest, Peer, Request as AttrRequest, TlsSession};
use proto::ext_authz::{AttributeContext, CheckRequest};
use proto::pb::google::protobuf::Timestamp;
use proto::ratelimit::{RateLimitDescriptor, RateLimitRequest, rate_limit_descriptor};
use proto::types::{Address, HeaderAppendAction, HeaderValueOption, SocketAddress, Struct, address, value};

/// The lease header portcullis's OK answer adds towards the upstream; its value is what
/// `Complete` releases.
pub const LEASE_HEADER: &str = "x-portcullis-lease";

/// What the shim knows of a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// `None` on the plain listener.
    pub tls: Option<TlsInfo>,
    /// HTTP/1.1 connections: what the head scan found for each request, in order.
    pub h1_verdicts: Option<crate::h1scan::Verdicts>,
}

/// The TLS session of a connection.
#[derive(Debug, Clone, Default)]
pub struct TlsInfo {
    pub sni: Option<String>,
    /// The client certificate's identity (URI SAN, DNS SAN, subject), under mTLS.
    pub peer_principal: Option<String>,
    /// The client certificate, PEM then URL-encoded, as Envoy's `include_peer_certificate` sends it.
    pub peer_certificate: Option<String>,
    /// The served certificate's identity.
    pub local_principal: String,
}

fn socket(a: SocketAddr) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: a.ip().to_string(),
            port_specifier: Some(proto::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(
                u32::from(a.port()),
            )),
            ..Default::default()
        })),
    }
}

/// What a request is, besides its headers.
#[derive(Debug, Clone, Copy)]
pub struct RequestLine<'a> {
    pub method: &'a str,
    /// The path with its query, as Envoy's `:path`.
    pub path_and_query: &'a str,
    /// `:authority`, or Host.
    pub host: &'a str,
    /// `HTTP/1.0`, `HTTP/1.1` or `HTTP/2`, as Envoy names them.
    pub protocol: &'a str,
    pub request_id: &'a str,
}

/// The CheckRequest for a request whose headers are already what the upstream will get (less
/// the X-Forwarded-For the shim appends its peer to): the header map Envoy sends has lower-case
/// names, repeated headers joined with `,`, and the pseudo-headers `:authority`, `:method`,
/// `:path`, `:scheme`.
pub fn check_request(conn: &ConnInfo, line: &RequestLine<'_>, headers: &HeaderMap, now_millis: u64) -> CheckRequest {
    let RequestLine { method, path_and_query, host, protocol, request_id } = *line;
    let scheme = if conn.tls.is_some() { "https" } else { "http" };
    let mut map: HashMap<String, String> = HashMap::with_capacity(headers.keys_len() + 4);
    for (name, value) in headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        map.entry(name.as_str().to_owned())
            .and_modify(|e| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert_with(|| v.into_owned());
    }
    map.insert(":authority".into(), host.to_owned());
    map.insert(":method".into(), method.to_owned());
    map.insert(":path".into(), path_and_query.to_owned());
    map.insert(":scheme".into(), scheme.to_owned());
    let size = headers
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(-1);
    let tls = conn.tls.as_ref();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(Peer {
                address: Some(socket(conn.peer)),
                principal: tls.and_then(|t| t.peer_principal.clone()).unwrap_or_default(),
                certificate: tls.and_then(|t| t.peer_certificate.clone()).unwrap_or_default(),
                ..Default::default()
            }),
            destination: Some(Peer {
                address: Some(socket(conn.local)),
                principal: tls.map(|t| t.local_principal.clone()).unwrap_or_default(),
                ..Default::default()
            }),
            request: Some(AttrRequest {
                time: Some(Timestamp {
                    seconds: i64::try_from(now_millis / 1000).unwrap_or(i64::MAX),
                    nanos: i32::try_from((now_millis % 1000) * 1_000_000).unwrap_or(0),
                }),
                http: Some(HttpRequest {
                    id: request_id.to_owned(),
                    method: method.to_owned(),
                    headers: map,
                    path: path_and_query.to_owned(),
                    host: host.to_owned(),
                    scheme: scheme.to_owned(),
                    protocol: protocol.to_owned(),
                    size,
                    ..Default::default()
                }),
            }),
            tls_session: tls.map(|t| TlsSession { sni: t.sni.clone().unwrap_or_default() }),
            ..Default::default()
        }),
    }
}

/// Applies a list of HeaderValueOptions to `headers` as Envoy does: `append` (deprecated) when
/// set, else `append_action`. Invalid names or values are skipped (Envoy drops them too).
pub fn apply_options(headers: &mut HeaderMap, options: &[HeaderValueOption]) {
    for o in options {
        let Some(h) = &o.header else { continue };
        let Ok(name) = HeaderName::from_bytes(h.key.as_bytes()) else { continue };
        let raw = if h.raw_value.is_empty() { h.value.as_bytes() } else { &h.raw_value };
        let Ok(value) = HeaderValue::from_bytes(raw) else { continue };
        // `append` is deprecated in favour of append_action, but Envoy still honours it when set
        #[allow(deprecated)]
        let append = o.append;
        let action = match append {
            Some(b) if b.value => HeaderAppendAction::AppendIfExistsOrAdd,
            Some(_) => HeaderAppendAction::OverwriteIfExistsOrAdd,
            None => HeaderAppendAction::try_from(o.append_action).unwrap_or(HeaderAppendAction::AppendIfExistsOrAdd),
        };
        match action {
            HeaderAppendAction::AppendIfExistsOrAdd => {
                headers.append(name, value);
            }
            HeaderAppendAction::AddIfAbsent => {
                if !headers.contains_key(&name) {
                    headers.insert(name, value);
                }
            }
            HeaderAppendAction::OverwriteIfExistsOrAdd => {
                headers.insert(name, value);
            }
            HeaderAppendAction::OverwriteIfExists => {
                if headers.contains_key(&name) {
                    headers.insert(name, value);
                }
            }
        }
    }
}

/// A string field of the ext_authz answer's dynamic metadata.
pub fn metadata_string<'a>(md: Option<&'a Struct>, key: &str) -> Option<&'a str> {
    match md?.fields.get(key)?.kind.as_ref()? {
        value::Kind::StringValue(s) => Some(s.as_str()),
        _ => None,
    }
}

fn descriptor(entries: Vec<rate_limit_descriptor::Entry>) -> RateLimitDescriptor {
    RateLimitDescriptor { entries, ..Default::default() }
}

fn entry(key: &str, value: &str) -> rate_limit_descriptor::Entry {
    rate_limit_descriptor::Entry { key: key.to_owned(), value: value.to_owned() }
}

/// The ratelimit request the example Envoy route makes (`deploy/examples/envoy.yaml`): one
/// descriptor with the client address (`remote_address`), one with the ext_authz metadata's
/// `tier` and `subject` (each skipped when absent, the descriptor when both are), one with the
/// `:path`.
pub fn ratelimit_request(domain: &str, peer: SocketAddr, metadata: Option<&Struct>, path: &str) -> RateLimitRequest {
    let mut descriptors = vec![descriptor(vec![entry("remote_address", &peer.ip().to_string())])];
    let identity: Vec<_> =
        [("tier", metadata_string(metadata, "tier")), ("subject", metadata_string(metadata, "subject"))]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| entry(k, v)))
            .collect();
    if !identity.is_empty() {
        descriptors.push(descriptor(identity));
    }
    descriptors.push(descriptor(vec![entry("path", path)]));
    RateLimitRequest { domain: domain.to_owned(), descriptors, hits_addend: 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::types::HeaderValue as PbHeader;

    fn opt(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
        HeaderValueOption {
            header: Some(PbHeader { key: key.into(), value: value.into(), raw_value: Vec::new() }),
            append_action: action as i32,
            ..Default::default()
        }
    }

    #[test]
    fn header_options_follow_envoys_append_actions() {
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("1"));
        h.insert("b", HeaderValue::from_static("1"));
        apply_options(
            &mut h,
            &[
                opt("a", "2", HeaderAppendAction::AppendIfExistsOrAdd),
                opt("b", "2", HeaderAppendAction::OverwriteIfExistsOrAdd),
                opt("b", "3", HeaderAppendAction::AddIfAbsent),
                opt("c", "1", HeaderAppendAction::OverwriteIfExists),
                opt("d", "1", HeaderAppendAction::AddIfAbsent),
                opt("bad name", "1", HeaderAppendAction::AddIfAbsent),
                opt("e", "line\nbreak", HeaderAppendAction::AddIfAbsent),
            ],
        );
        assert_eq!(h.get_all("a").iter().count(), 2);
        assert_eq!(h["b"], "2");
        assert!(!h.contains_key("c"));
        assert_eq!(h["d"], "1");
        assert!(!h.contains_key("e"));
    }

    #[test]
    fn descriptors_are_the_example_routes() {
        let peer: SocketAddr = "198.51.100.7:5000".parse().unwrap();
        let r = ratelimit_request("edge", peer, None, "/a?b");
        let keys: Vec<Vec<&str>> =
            r.descriptors.iter().map(|d| d.entries.iter().map(|e| e.key.as_str()).collect()).collect();
        assert_eq!(keys, [vec!["remote_address"], vec!["path"]]);
        assert_eq!(r.descriptors[0].entries[0].value, "198.51.100.7");
        let mut md = Struct::default();
        md.fields.insert("subject".into(), proto::types::Value { kind: Some(value::Kind::StringValue("s".into())) });
        let r = ratelimit_request("edge", peer, Some(&md), "/");
        assert_eq!(r.descriptors[1].entries.len(), 1);
        assert_eq!(r.descriptors[1].entries[0].key, "subject");
    }
}
