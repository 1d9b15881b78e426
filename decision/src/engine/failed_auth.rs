//! A request whose credential was refused: the one fetch that could change the answer (a newer
//! key set for an unknown `kid`, an introspection answer not cached yet), and auto-block, which
//! counts failed authentications per address and blocks an address past the policy's threshold.

use decision_core::decide::{AfterFailure, conclude_failure, failure_plan};
use decision_core::identity::bearer_token;
use decision_core::policy::Policy;
use decision_core::{Decision, Reason, Request};

use super::Engine;
use crate::store::{Store, StoreError};

/// The longest a request waits for a fetch its bearer token needs (the fetches carry their own,
/// shorter, timeouts; this bounds waiting behind another request's fetch).
const FETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl<S: Store> Engine<S> {
    /// Auto-block: a failed authentication is counted against its address (one store call,
    /// only on this path); an address already blocked, or whose failures just crossed the
    /// threshold, is answered 403 `ip_blocked` (the block raised with a second call). A store
    /// failure here keeps the 401; past the caller's `deadline` nothing is counted and the
    /// answer is `deadline_exceeded` (the caller learns nothing about its credential).
    pub(super) async fn after_failed_auth(
        &self,
        policy: &Policy,
        d: Decision,
        now: u64,
        deadline: Option<std::time::Instant>,
    ) -> Decision {
        let Some(ops) = failure_plan(policy, &d) else { return d };
        let counted = match self.apply(&ops, now, None, deadline).await {
            Ok(counted) => counted,
            Err(StoreError::DeadlineExceeded) => return Decision { reason: Reason::DeadlineExceeded, ..d },
            Err(_) => return d,
        };
        match conclude_failure(policy, d.clone(), &counted.verdicts) {
            AfterFailure::Answer(answer) => answer,
            AfterFailure::Block { raise, blocked } => {
                let raised = match blocked.ctx.client_ip {
                    Some(ip) => self.raise_block(&raise, ip, now).await.map(|_| ()),
                    None => self.apply(std::slice::from_ref(&raise), now, None, None).await.map(|_| ()),
                };
                match raised {
                    Ok(()) => {
                        tracing::warn!(client_ip = ?blocked.ctx.client_ip, "address blocked after repeated failed authentications");
                        blocked
                    }
                    Err(_) => d,
                }
            }
        }
    }

    /// Runs the fetch the bearer verifier asks for after refusing a token, if any: on a task of
    /// its own, so a client that gives up does not cancel it halfway, and awaited at most
    /// `FETCH_WAIT`, and never past the caller's `deadline`. True when there was one to wait
    /// for.
    pub(super) async fn fetch_for(
        &self,
        policy: &Policy,
        req: &Request<'_>,
        reason: Reason,
        deadline: Option<std::time::Instant>,
    ) -> bool {
        let (Some(verifier), Some(auth)) = (&policy.bearer, req.authorization) else { return false };
        let Some(token) = bearer_token(auth) else { return false };
        let Some(fetch) = verifier.fetch_for(token, reason) else { return false };
        let wait =
            deadline.map_or(FETCH_WAIT, |d| FETCH_WAIT.min(d.saturating_duration_since(crate::clock::instant())));
        // on the background runtime: the fetch goes on past `wait` (and past this runtime)
        let Some(rt) = self.background() else { return false };
        let _ = tokio::time::timeout(wait, rt.spawn(fetch)).await;
        true
    }
}
