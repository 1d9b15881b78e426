//! What the admin API asks of the engine: addresses blocked, listed and unblocked; a subject's
//! usage read, granted and reset. Each is one store call (two for an unblock: the address's
//! keys, then the blocks index, which sit in different hash slots), bounded by the store's
//! timeout, and never on a decision's path.

use std::net::IpAddr;

use decision_core::decide::{auth_failure_key, block_key, revocation_key, tier_ops};
use decision_core::plan::{Op, OpKind};
use decision_core::policy::Tier;
use decision_core::quota::{Limit, Verdict};
use decision_core::units::Micros;

use super::Engine;
use crate::clock;
use crate::store::{Store, StoreError};

/// One of a subject's limits as it stands (`GetUsage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitUsage {
    pub kind: OpKind,
    pub limit: Limit,
    /// what a request of cost 0 sees: remaining now, and the time until the limit is whole
    pub verdict: Verdict,
}

impl<S: Store> Engine<S> {
    /// Raises an address's block (`raise`: a block flag operation with its duration) and notes
    /// it in the blocks index. Returns when the block ends (this instance's clock). A failure to
    /// note it is logged: the block itself stands.
    pub(super) async fn raise_block(&self, raise: &Op, ip: IpAddr, now: Micros) -> Result<Micros, StoreError> {
        let planned = self.apply(std::slice::from_ref(raise), now, None, None).await?;
        let until = now.saturating_add(planned.verdicts.first().map_or(0, |v| v.reset));
        if let Err(e) = self.bounded(self.store.note_block(&ip.to_string(), until, now), None).await {
            tracing::warn!(client_ip = %ip, error = %e, "a block was raised but not listed in the blocks index");
        }
        Ok(until)
    }

    /// Blocks `ip` fleet-wide for `duration` (or until an existing longer block ends): when it
    /// ends. Errors: the store failed.
    pub async fn block_address(&self, ip: IpAddr, duration: Micros) -> Result<Micros, StoreError> {
        let raise =
            Op { key: block_key(ip), limit: Limit::Flag { duration }, cost: 1, kind: OpKind::Block, shadow: false };
        self.raise_block(&raise, ip, clock::now_micros()).await
    }

    /// Lifts `ip`'s block and forgets its failed authentications, fleet-wide: whether it was
    /// blocked (as the blocks index knew it).
    pub async fn unblock_address(&self, ip: IpAddr) -> Result<bool, StoreError> {
        self.bounded(self.store.forget(&[block_key(ip), auth_failure_key(ip)]), None).await?;
        self.bounded(self.store.unnote_block(&ip.to_string(), clock::now_micros()), None).await
    }

    /// Every address blocked now, with when its block ends, soonest first.
    pub async fn blocked_addresses(&self) -> Result<Vec<(String, Micros)>, StoreError> {
        self.bounded(self.store.blocks(clock::now_micros()), None).await
    }

    /// `subject`'s tier limits as they stand, counting nothing.
    pub async fn usage(&self, subject: &str, tier: &Tier) -> Result<Vec<LimitUsage>, StoreError> {
        let ops = tier_ops(subject, tier, 0);
        let planned = self.dry_run(&ops, clock::now_micros(), None).await?;
        Ok(ops
            .iter()
            .zip(planned.verdicts)
            .map(|(op, verdict)| LimitUsage { kind: op.kind, limit: op.limit, verdict })
            .collect())
    }

    /// Gives `amount` units of `subject`'s `which` limit back for now (never past the whole
    /// quota), fleet-wide.
    pub async fn grant_usage(&self, subject: &str, tier: &Tier, which: OpKind, amount: u64) -> Result<(), StoreError> {
        let counters: Vec<(String, Limit)> =
            tier_ops(subject, tier, 0).into_iter().filter(|op| op.kind == which).map(|op| (op.key, op.limit)).collect();
        let delta = i64::try_from(amount).map_or(i64::MIN, |a| -a);
        self.bounded(self.store.adjust(&counters, delta, clock::now_micros()), None).await
    }

    /// Forgets what `subject` used of `which` limit (None: both), fleet-wide.
    pub async fn reset_usage(&self, subject: &str, tier: &Tier, which: Option<OpKind>) -> Result<u64, StoreError> {
        let keys: Vec<String> = tier_ops(subject, tier, 0)
            .into_iter()
            .filter(|op| which.is_none_or(|w| op.kind == w))
            .map(|op| op.key)
            .collect();
        self.bounded(self.store.forget(&keys), None).await
    }

    /// Revokes the bearer token `token_id` of `subject` until `until` (this instance's clock):
    /// every instance refuses it, 401 `token_revoked`, in the request's own store call.
    pub async fn revoke_token(&self, subject: &str, token_id: &str, until: Micros) -> Result<(), StoreError> {
        let now = clock::now_micros();
        let raise = Op {
            key: revocation_key(subject, token_id),
            limit: Limit::Flag { duration: until.saturating_sub(now).max(1) },
            cost: 1,
            kind: OpKind::Revocation,
            shadow: false,
        };
        self.apply(std::slice::from_ref(&raise), now, None, None).await.map(|_| ())
    }
}
