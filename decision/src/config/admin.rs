//! `listen.admin` and `admin`: the admin API's listener and its tokens.

use std::collections::HashSet;
use std::net::SocketAddr;

use crate::admin::{AdminSettings, AdminToken, Scope};

use super::{Validator, raw};

/// The admin listener's address when `listen.admin` names no port of its own (documentation).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:8083";
/// Longest admin token id.
pub const MAX_ADMIN_TOKEN_ID: usize = 64;

impl Validator<'_> {
    /// The admin API's settings: None when `listen.admin` is absent (the API is off). It needs
    /// at least one token, and its own address (never the gRPC, HTTP or forward-auth port).
    pub(super) fn admin(
        &mut self,
        listen: Option<&str>,
        admin: Option<&raw::RawAdmin>,
        taken: &[(&str, SocketAddr)],
    ) -> Option<AdminSettings> {
        let addr = self.addr("listen.admin", Some(listen?), DEFAULT_ADMIN_ADDR);
        for (what, other) in taken {
            if addr.port() != 0 && *other == addr {
                self.err("listen.admin", format!("the admin API needs a listener of its own, not {what}'s ({addr})"));
            }
        }
        let mut tokens = Vec::new();
        let mut ids = HashSet::new();
        let mut digests = HashSet::new();
        for (i, t) in admin.map(|a| a.tokens.as_slice()).unwrap_or_default().iter().enumerate() {
            let path = format!("admin.tokens[{i}]");
            let id_ok = !t.id.is_empty()
                && t.id.len() <= MAX_ADMIN_TOKEN_ID
                && t.id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if !id_ok {
                self.err(format!("{path}.id"), "1 to 64 letters, digits, '-', '_' or '.'");
            } else if !ids.insert(t.id.clone()) {
                self.err(format!("{path}.id"), format!("duplicate admin token id {:?}", t.id));
            }
            let digest = self.parse(&format!("{path}.sha256"), decision_core::apikey::parse_digest(&t.sha256));
            if let Some(d) = digest
                && !digests.insert(d)
            {
                self.err(format!("{path}.sha256"), "the same token twice");
            }
            if t.scopes.is_empty() {
                self.err(format!("{path}.scopes"), "at least one of read, keys:write, usage:write, blocks:write");
            }
            let mut scopes = Vec::new();
            for (j, s) in t.scopes.iter().enumerate() {
                match Scope::parse(s) {
                    Some(scope) if !scopes.contains(&scope) => scopes.push(scope),
                    Some(_) => self.err(format!("{path}.scopes[{j}]"), format!("{s:?} twice")),
                    None => self.err(
                        format!("{path}.scopes[{j}]"),
                        format!("unknown scope {s:?} (read, keys:write, usage:write, blocks:write)"),
                    ),
                }
            }
            if let Some(digest) = digest {
                tokens.push(AdminToken { id: t.id.as_str().into(), digest, scopes });
            }
        }
        if admin.is_none_or(|a| a.tokens.is_empty()) {
            self.err("admin.tokens", "the admin API (listen.admin) is authenticated: give at least one token");
        }
        let tls = admin.and_then(|a| a.tls.as_ref()).and_then(|t| {
            let path = |f: &str| self.base.join(f);
            let ca = t.client_ca_file.as_deref().map(path);
            for f in [Some(path(&t.cert_file)), Some(path(&t.key_file)), ca.clone()].into_iter().flatten() {
                if let Ok(bytes) = std::fs::read(&f) {
                    super::read_source(&f, &bytes);
                }
            }
            match crate::admin::AdminTls::load(&path(&t.cert_file), &path(&t.key_file), ca.as_deref()) {
                Ok(tls) => Some(tls),
                Err(e) => {
                    self.err("admin.tls", e);
                    None
                }
            }
        });
        Some(AdminSettings { addr, tokens, tls })
    }
}
