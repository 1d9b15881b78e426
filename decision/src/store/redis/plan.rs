//! The plan codec: a plan's operations as apply.lua's keys and arguments, and its reply back
//! as verdicts, recomputed with the same pure quota function the memory store uses so both
//! stores answer alike by construction.

use decision_core::plan::{Op, OpKind};
use decision_core::quota::{self, Limit, State, Verdict};
use decision_core::units::Micros;
use redis::cluster_routing::Slot;

use crate::store::StoreError;

/// apply.lua's keys and arguments for `ops` (all in one hash slot), added to `inv`: `clock` is the
/// time to use (-1: the server's), `commit` false only checks them.
pub(super) fn plan_args<'a>(
    inv: &mut redis::ScriptInvocation<'a>,
    ops: impl Iterator<Item = &'a Op> + Clone,
    clock: i64,
    commit: bool,
) {
    for op in ops.clone() {
        inv.key(op.key.as_str());
    }
    inv.arg(clock).arg(u8::from(commit));
    // the run of reservable operations right before each one (`plan::covered`, over this call's
    // operations): what a reservation covers
    let mut run = (0u64, 0u64);
    for op in ops {
        let (kind, a, b) = match op.limit {
            _ if op.kind == OpKind::Reservation => ("r", if run.1 == op.cost { run.0 } else { 0 }, op.limit.window()),
            Limit::TokenBucket { burst, interval } => ("b", burst, interval),
            Limit::SlidingWindow { limit, window } => ("s", limit, window),
            Limit::FixedWindow { limit, window } => ("f", limit, window),
            Limit::Flag { duration } => ("k", 0, duration),
        };
        run = match run {
            _ if !op.kind.reservable() => (0, 0),
            (n, cost) if n > 0 && cost == op.cost => (n + 1, cost),
            _ => (1, op.cost),
        };
        inv.arg(kind).arg(a).arg(b).arg(op.cost).arg(u8::from(op.shadow));
    }
}

/// A plan's operations grouped by the cluster hash slot of their keys (indices, in plan order); one
/// group when every key shares a slot.
pub(super) fn by_hash_slot(ops: &[Op]) -> Vec<Vec<usize>> {
    let mut parts: Vec<(Slot, Vec<usize>)> = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let slot = Slot::for_key(&op.key);
        match parts.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, idx)) => idx.push(i),
            None => parts.push((slot, vec![i])),
        }
    }
    parts.into_iter().map(|(_, idx)| idx).collect()
}

/// Whether a plan's keys fall in more than one cluster hash slot.
pub(super) fn spans_slots(ops: &[Op]) -> bool {
    ops.iter().skip(1).any(|op| Slot::for_key(&op.key) != Slot::for_key(&ops[0].key))
}

/// The verdicts of one apply.lua call on `ops`, appended to `verdicts`.
pub(super) fn decode<'a>(
    reply: &[i64],
    ops: impl ExactSizeIterator<Item = &'a Op>,
    verdicts: &mut Vec<Verdict>,
) -> Result<(), StoreError> {
    if reply.len() != 2 + 4 * ops.len() {
        return Err(StoreError::Script(format!("reply of {} values for {} operations", reply.len(), ops.len())));
    }
    let now = u64::try_from(reply[0]).map_err(|_| StoreError::Script("negative server time".into()))?;
    for (i, op) in ops.enumerate() {
        let r = &reply[2 + 4 * i..6 + 4 * i];
        let state = state_seen(op, r);
        let checked = quota::check(op.limit, state, op.cost, now as Micros);
        if checked.verdict.allowed != (r[0] == 1) {
            return Err(StoreError::Script(format!(
                "the script and the quota math disagree on operation {i} ({:?}, state {state:?}, now {now})",
                op.limit
            )));
        }
        verdicts.push(checked.verdict);
    }
    Ok(())
}

/// The state an operation saw, from its four values in a reply (allowed, s1, s2, s3).
fn state_seen(op: &Op, r: &[i64]) -> Option<State> {
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    (r[1] >= 0).then(|| match op.limit {
        Limit::TokenBucket { .. } | Limit::Flag { .. } => State::Bucket { tat: u(r[1]) },
        _ => State::Window { start: u(r[1]), prev: u(r[2]), cur: u(r[3]) },
    })
}

/// The replies behind a plan's verdicts (already checked by `decode`).
pub(super) enum Replies {
    One(Vec<i64>),
    /// a plan split by hash slot: each part's operations (indices into the plan) and its reply
    Parts(Vec<(Vec<usize>, Vec<i64>)>),
}

impl Replies {
    /// The store's time and the state each of `ops` saw (for the over-limit cache). A split
    /// plan's parts have each their node's clock: the latest is taken, which can only make the
    /// cache send a plan to the store earlier.
    pub fn seen(&self, ops: &[Op]) -> (Micros, Vec<Option<State>>) {
        let time = |r: &[i64]| Micros::try_from(r[0]).unwrap_or(0);
        match self {
            Replies::One(r) => {
                (time(r), ops.iter().enumerate().map(|(i, op)| state_seen(op, &r[2 + 4 * i..])).collect())
            }
            Replies::Parts(parts) => {
                let mut states = vec![None; ops.len()];
                let mut at = 0;
                for (idx, r) in parts {
                    at = at.max(time(r));
                    for (j, &i) in idx.iter().enumerate() {
                        states[i] = state_seen(&ops[i], &r[2 + 4 * j..]);
                    }
                }
                (at, states)
            }
        }
    }
}
