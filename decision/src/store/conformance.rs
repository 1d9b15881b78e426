//! The store contract, as one suite every store must pass (memory now, Redis when it lands):
//! exact counts at the limit, all-or-nothing plans, denied requests consuming nothing, expiry.

use std::future::Future;

use decision_core::decide::{Op, OpKind};
use decision_core::quota::Limit;
use decision_core::units::{MICROS_PER_MINUTE, MICROS_PER_SEC, Micros};

use super::Store;

pub fn bucket_op(key: &str, burst: u64, per_minute: u64) -> Op {
    Op {
        key: key.into(),
        limit: Limit::token_bucket(per_minute, MICROS_PER_MINUTE, burst),
        cost: 1,
        kind: OpKind::TierBurst,
        shadow: false,
    }
}

pub fn window_op(key: &str, limit: u64, window: Micros) -> Op {
    Op { key: key.into(), limit: Limit::SlidingWindow { limit, window }, cost: 1, kind: OpKind::Zone, shadow: false }
}

const T0: Micros = 1_800_000_000 * MICROS_PER_SEC;

async fn allowed<S: Store>(s: &S, ops: &[Op], now: Micros) -> Vec<bool> {
    s.apply(ops, now).await.expect("store call").iter().map(|v| v.allowed).collect()
}

/// Runs every scenario, each on a fresh store from `make`.
pub async fn run_all<S: Store, F: Future<Output = S>>(make: impl Fn() -> F) {
    bucket_allows_exactly_burst(&make().await).await;
    window_allows_exactly_limit(&make().await).await;
    a_refused_plan_counts_nothing(&make().await).await;
    keys_are_independent(&make().await).await;
    expired_state_is_forgotten(&make().await).await;
    the_same_key_twice_in_one_plan_counts_twice(&make().await).await;
    a_shadow_operation_never_refuses_a_plan(&make().await).await;
    fixed_windows_count_per_aligned_window(&make().await).await;
    a_flag_blocks_until_it_comes_down(&make().await).await;
}

async fn a_flag_blocks_until_it_comes_down<S: Store>(s: &S) {
    let check = Op {
        key: "blk".into(),
        limit: Limit::Flag { duration: MICROS_PER_MINUTE },
        cost: 0,
        kind: OpKind::Block,
        shadow: false,
    };
    let raise = Op { cost: 1, ..check.clone() };
    let other = window_op("after-block", 10, MICROS_PER_MINUTE);
    assert_eq!(allowed(s, &[check.clone(), other.clone()], T0).await, [true, true], "{}: no flag yet", s.backend());
    assert_eq!(allowed(s, std::slice::from_ref(&raise), T0).await, [true]);
    // while it is up, plans with the check are refused and count nothing else
    for _ in 0..3 {
        assert_eq!(
            allowed(s, &[check.clone(), other.clone()], T0 + MICROS_PER_SEC).await,
            [false, true],
            "{}",
            s.backend()
        );
    }
    let v = s.apply(&[check.clone(), other.clone()], T0 + MICROS_PER_MINUTE).await.expect("store call");
    assert!(v[0].allowed && v[1].allowed, "{}: down after its duration", s.backend());
    assert_eq!(v[1].remaining, 8, "{}: refused plans counted nothing", s.backend());
}

async fn a_shadow_operation_never_refuses_a_plan<S: Store>(s: &S) {
    let shadow = Op { shadow: true, ..window_op("shadow", 1, MICROS_PER_MINUTE) };
    let plan = [window_op("real", 5, MICROS_PER_MINUTE), shadow];
    assert_eq!(allowed(s, &plan, T0).await, [true, true]);
    // the shadow limit is over, the plan still commits: the real limit keeps counting
    for _ in 0..4 {
        assert_eq!(allowed(s, &plan, T0).await, [true, false], "{}", s.backend());
    }
    assert_eq!(allowed(s, &plan, T0).await, [false, false], "{}: the real limit is spent", s.backend());
}

async fn fixed_windows_count_per_aligned_window<S: Store>(s: &S) {
    let op = [Op {
        limit: Limit::FixedWindow { limit: 2, window: MICROS_PER_MINUTE },
        ..window_op("f", 2, MICROS_PER_MINUTE)
    }];
    let edge = T0 + MICROS_PER_MINUTE;
    let mut results = Vec::new();
    for t in [edge - 1, edge - 1, edge - 1, edge, edge, edge] {
        results.extend(allowed(s, &op, t).await);
    }
    assert_eq!(results, [true, true, false, true, true, false], "{}", s.backend());
}

async fn bucket_allows_exactly_burst<S: Store>(s: &S) {
    let op = [bucket_op("b", 5, 60)];
    let mut results = Vec::new();
    for _ in 0..8 {
        results.extend(allowed(s, &op, T0).await);
    }
    assert_eq!(results, [true, true, true, true, true, false, false, false], "{}", s.backend());
    assert_eq!(allowed(s, &op, T0 + MICROS_PER_SEC).await, [true], "one token a second");
}

async fn window_allows_exactly_limit<S: Store>(s: &S) {
    let op = [window_op("w", 3, MICROS_PER_MINUTE)];
    let mut results = Vec::new();
    for _ in 0..5 {
        results.extend(allowed(s, &op, T0 + 1).await);
    }
    assert_eq!(results, [true, true, true, false, false], "{}", s.backend());
}

async fn a_refused_plan_counts_nothing<S: Store>(s: &S) {
    // "tight" allows 1, "wide" allows 10: once tight is spent, plans with both are refused and
    // wide must not be charged for them.
    let plan = [window_op("wide", 10, MICROS_PER_MINUTE), window_op("tight", 1, MICROS_PER_MINUTE)];
    assert_eq!(allowed(s, &plan, T0).await, [true, true]);
    for _ in 0..20 {
        assert_eq!(allowed(s, &plan, T0).await, [true, false], "{}", s.backend());
    }
    let v = s.apply(&[window_op("wide", 10, MICROS_PER_MINUTE)], T0).await.expect("store call");
    assert_eq!(v[0].remaining, 8, "{}: wide was charged by refused plans", s.backend());
}

async fn keys_are_independent<S: Store>(s: &S) {
    assert_eq!(allowed(s, &[window_op("x", 1, MICROS_PER_MINUTE)], T0).await, [true]);
    assert_eq!(allowed(s, &[window_op("x", 1, MICROS_PER_MINUTE)], T0).await, [false]);
    assert_eq!(allowed(s, &[window_op("y", 1, MICROS_PER_MINUTE)], T0).await, [true], "{}", s.backend());
}

async fn expired_state_is_forgotten<S: Store>(s: &S) {
    let op = [window_op("e", 1, MICROS_PER_MINUTE)];
    assert_eq!(allowed(s, &op, T0).await, [true]);
    assert_eq!(allowed(s, &op, T0).await, [false]);
    // two windows later the state has expired and the key starts afresh
    assert_eq!(allowed(s, &op, T0 + 2 * MICROS_PER_MINUTE).await, [true], "{}", s.backend());
}

async fn the_same_key_twice_in_one_plan_counts_twice<S: Store>(s: &S) {
    let plan = [window_op("d", 3, MICROS_PER_MINUTE), window_op("d", 3, MICROS_PER_MINUTE)];
    assert_eq!(allowed(s, &plan, T0).await, [true, true]);
    assert_eq!(allowed(s, &plan, T0).await, [true, false], "{}", s.backend());
    assert_eq!(allowed(s, &[window_op("d", 3, MICROS_PER_MINUTE)], T0).await, [true]);
}
