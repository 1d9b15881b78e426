//! What live monitoring (`alerts`) learns from each decision, and what its alerts do: every
//! alert becomes an audit event, and a critical failed-authentication alert that asks for it
//! blocks the address.

use decision_core::policy::Policy;
use decision_core::{Decision, Request};

use super::Engine;
use crate::clock;
use crate::store::Store;

impl<S: Store> Engine<S> {
    /// An alert goes to the audit trail; a critical failed-auth alert that asks for it blocks
    /// the address (one store call, off the decision's own path).
    pub async fn raised(&self, policy: &Policy, raised: crate::alerts::Raised, zone: u64) {
        if let Some(ip) = raised.block
            && let Some(op) = decision_core::decide::block_raise(policy, ip, zone)
            && self.raise_block(&op, ip, clock::now_micros()).await.is_ok()
        {
            tracing::warn!(client_ip = %ip, "address blocked by a critical failed-authentication alert");
        }
        if let Some(audit) = self.audit() {
            audit.record(raised.event);
        }
    }

    /// What live monitoring learns from a decision: failed authentications, payload sizes.
    pub(super) async fn observe(&self, policy: &Policy, req: &Request<'_>, d: &Decision) {
        let Some(m) = self.alerts() else { return };
        if let Some(size) = req.content_length
            && let Some(r) = m.payload(size)
        {
            self.raised(policy, r, d.ctx.zone).await;
        }
        if decision_core::decide::is_auth_failure(d.reason)
            && let Some(ip) = d.ctx.client_ip
            && let Some(r) = m.failed_auth(ip)
        {
            self.raised(policy, r, d.ctx.zone).await;
        }
    }
}
