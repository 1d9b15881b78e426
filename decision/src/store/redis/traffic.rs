//! traffic.lua's keys, arguments and answers: an upstream's concurrency slots, queue and
//! circuit breaker under one hash tag (`pc:{up:<upstream>}:slots|queue|breaker`).

use decision_core::traffic::{Admit, Mode, Occupancy, TrafficConfig};

use crate::store::{Release, StoreError, UpstreamState};

/// Where traffic.lua announces freed slots.
pub const FREED_CHANNEL: &str = "pc:traffic:freed";

/// traffic.lua's keys for `upstream`, added to `inv`.
pub(super) fn upstream_keys(inv: &mut redis::ScriptInvocation<'_>, upstream: &str) {
    for part in ["slots", "queue", "breaker"] {
        inv.key(format!("pc:{{up:{upstream}}}:{part}"));
    }
}

/// traffic.lua's arguments for an admission at `clock` (-1: the server's time).
pub(super) fn admit_args(clock: i64, lease: &str, returning: bool, cfg: &TrafficConfig) -> Vec<String> {
    let mut args = vec![
        "admit".to_owned(),
        clock.to_string(),
        lease.to_owned(),
        // a request waits in the queue under its lease id
        lease.to_owned(),
        u8::from(returning).to_string(),
        cfg.concurrency_limit.to_string(),
        cfg.queue_size.to_string(),
        cfg.queue_timeout.to_string(),
        cfg.lease_ttl.to_string(),
    ];
    args.extend(breaker_args(cfg));
    args.extend(adaptive_args(cfg));
    args
}

/// traffic.lua's arguments for a waiter leaving the queue.
pub(super) fn leave_args(lease: &str) -> Vec<String> {
    vec!["leave".to_owned(), "-1".to_owned(), lease.to_owned()]
}

/// traffic.lua's arguments for a lease's renewal at `clock` (-1: the server's time).
pub(super) fn renew_args(clock: i64, lease: &str, lease_ttl: u64) -> Vec<String> {
    vec!["renew".to_owned(), clock.to_string(), lease.to_owned(), lease_ttl.to_string()]
}

/// traffic.lua's arguments for a finished request at `clock` (-1: the server's time).
pub(super) fn complete_args(clock: i64, r: &Release<'_>) -> Vec<String> {
    let Release { lease, error, latency, cfg, .. } = *r;
    let mut args = vec![
        "complete".to_owned(),
        clock.to_string(),
        lease.to_owned(),
        u8::from(error).to_string(),
        cfg.lease_ttl.to_string(),
    ];
    args.extend(breaker_args(cfg));
    args.push(latency.to_string());
    args.extend(adaptive_args(cfg));
    args.push(cfg.concurrency_limit.to_string());
    args
}

/// The breaker's settings as traffic.lua takes them (zeros without a breaker).
fn breaker_args(cfg: &TrafficConfig) -> [String; 5] {
    match &cfg.breaker {
        Some(b) => [
            "1".into(),
            b.error_threshold.to_string(),
            b.min_requests.to_string(),
            b.window.to_string(),
            b.reset_timeout.to_string(),
        ],
        None => ["0".into(), "0".into(), "0".into(), "0".into(), "0".into()],
    }
}

/// The adaptive limit's settings as traffic.lua takes them (zeros when off).
fn adaptive_args(cfg: &TrafficConfig) -> [String; 7] {
    match &cfg.adaptive {
        Some(a) => [
            "1".into(),
            a.min_limit.to_string(),
            a.decrease.to_string(),
            a.increase.to_string(),
            a.interval.to_string(),
            a.error_rate.to_string(),
            a.latency.to_string(),
        ],
        None => ["0".into(), "0".into(), "0".into(), "0".into(), "0".into(), "0".into(), "0".into()],
    }
}

/// traffic.lua's answer to an admission.
pub(super) fn admitted(r: &[i64]) -> Result<(Admit, UpstreamState), StoreError> {
    let [code, a, b, c, in_use, queued, mode, limit] = r[..] else {
        return Err(StoreError::Script(format!("traffic.lua admit answered {r:?}")));
    };
    let occupancy = Occupancy { in_use: count(a), queued: count(b), hold: count(c) };
    let admit = match code {
        0 => Admit::Granted { probe: a == 1 },
        1 => Admit::Wait(occupancy),
        2 => Admit::QueueFull(occupancy),
        3 => Admit::BreakerOpen { retry_after: count(a) },
        _ => return Err(StoreError::Script(format!("traffic.lua admit answered {r:?}"))),
    };
    Ok((admit, upstream_state(in_use, queued, mode, limit)))
}

/// traffic.lua's answer to a completion: whether the lease was held, and the upstream after.
pub(super) fn completed(r: &[i64]) -> Result<(bool, UpstreamState), StoreError> {
    let [released, in_use, queued, mode, limit] = r[..] else {
        return Err(StoreError::Script(format!("traffic.lua complete answered {r:?}")));
    };
    Ok((released == 1, upstream_state(in_use, queued, mode, limit)))
}

fn upstream_state(in_use: i64, queued: i64, mode: i64, limit: i64) -> UpstreamState {
    UpstreamState {
        in_use: count(in_use),
        queued: count(queued),
        mode: Mode::from_code(count(mode)),
        limit: count(limit),
    }
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}
