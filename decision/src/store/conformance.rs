//! The store contract, as one suite every store must pass (memory now, Redis when it lands):
//! exact counts at the limit, all-or-nothing plans, denied requests consuming nothing, expiry.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use decision_core::plan::{Op, OpKind};
use decision_core::quota::Limit;
use decision_core::traffic::{AdaptiveConfig, Admit, BreakerConfig, Mode, TrafficConfig};
use decision_core::units::{MICROS_PER_MINUTE, MICROS_PER_SEC, Micros};

use super::{Admission, Planned, Release, Store, UpstreamState};

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
    concurrent_acquirers_never_exceed_the_limit(&make().await).await;
    releases_are_idempotent_and_an_expired_lease_frees_nothing_else(&make().await).await;
    the_queue_is_first_come_first_served_and_bounded(&make().await).await;
    the_breaker_opens_and_gives_its_half_open_probe_to_exactly_one(&make().await).await;
    the_adaptive_limit_shrinks_on_errors_and_grows_back(&make().await).await;
    a_plan_and_its_admission_in_one_call(&make().await).await;
    a_dry_run_answers_as_apply_and_counts_nothing(&make().await).await;
    a_renewed_lease_outlives_its_first_ttl(&make().await).await;
    leaving_frees_a_slot_granted_under_the_same_id(&make().await).await;
    a_settle_refunds_and_overruns_exactly_once(&make().await).await;
    a_refund_never_goes_below_zero_nor_past_full(&make().await).await;
    an_unsettled_reservation_expires_keeping_its_estimate(&make().await).await;
    concurrent_reservations_settle_exactly(&make().await).await;
    a_grant_gives_back_up_to_the_whole_quota_and_forget_resets(&make().await).await;
    the_blocks_index_lists_what_is_blocked_soonest_first(&make().await).await;
    key_records_are_written_only_over_the_record_expected(&make().await).await;
}

/// `put_key_record` writes only when the current record is the one expected (none for a new
/// id); `key_record` and `key_records` read what was written.
async fn key_records_are_written_only_over_the_record_expected<S: Store>(s: &S) {
    let b = s.backend();
    assert!(s.put_key_record("k1", r#"{"v":1}"#, None).await.expect("put"), "{b}");
    assert!(!s.put_key_record("k1", r#"{"v":2}"#, None).await.expect("put"), "{b}: an existing id written as new");
    assert!(!s.put_key_record("k1", r#"{"v":2}"#, Some(r#"{"v":0}"#)).await.expect("put"), "{b}: a stale expectation");
    assert!(s.put_key_record("k1", r#"{"v":2}"#, Some(r#"{"v":1}"#)).await.expect("put"), "{b}");
    assert!(!s.put_key_record("k2", "{}", Some("{}")).await.expect("put"), "{b}: no record to replace");
    assert_eq!(s.key_record("k1").await.expect("get").as_deref(), Some(r#"{"v":2}"#), "{b}");
    assert_eq!(s.key_record("k2").await.expect("get"), None, "{b}");
    assert!(s.put_key_record("k3", "{}", None).await.expect("put"), "{b}");
    let mut all = s.key_records().await.expect("all");
    all.sort();
    assert_eq!(all, [("k1".to_owned(), r#"{"v":2}"#.to_owned()), ("k3".to_owned(), "{}".to_owned())], "{b}");
}

/// `adjust` with a negative delta gives units back now (never past the whole quota); `forget`
/// deletes counters and says how many existed.
async fn a_grant_gives_back_up_to_the_whole_quota_and_forget_resets<S: Store>(s: &S) {
    let b = s.backend();
    s.apply(&reserved_plan("hank", None, 900, 0), T0).await.expect("apply");
    assert_eq!(left(s, "hank", T0).await, (100, 100), "{b}");
    let ops = reserved_plan("hank", None, 0, 0);
    let counters: Vec<(String, Limit)> = ops[..2].iter().map(|o| (o.key.clone(), o.limit)).collect();
    s.adjust(&counters[..1], -300, T0).await.expect("adjust");
    assert_eq!(left(s, "hank", T0).await, (400, 100), "{b}: 300 burst units given back");
    s.adjust(&counters, -5_000, T0).await.expect("adjust");
    assert_eq!(left(s, "hank", T0).await, (1_000, 1_000), "{b}: never past the whole quota");
    // a day later the day's count sits in the previous window: a grant takes it from there
    let day = 24 * 60 * MICROS_PER_MINUTE;
    let t = T0 - T0 % day;
    s.apply(&reserved_plan("ivy", None, 800, 0), t + 1).await.expect("apply");
    let ivy: Vec<(String, Limit)> =
        reserved_plan("ivy", None, 0, 0)[1..2].iter().map(|o| (o.key.clone(), o.limit)).collect();
    let next_day = t + day;
    assert_eq!(left(s, "ivy", next_day).await.1, 200, "{b}: the previous day's 800 still weigh fully");
    s.adjust(&ivy, -500, next_day).await.expect("grant");
    assert_eq!(left(s, "ivy", next_day).await.1, 700, "{b}: 500 given back from the previous window");
    s.apply(&reserved_plan("hank", None, 10, 0), T0).await.expect("apply");
    assert_eq!(s.forget(&[counters[1].0.clone(), "pc:{s:hank}:none".into()]).await.expect("forget"), 1, "{b}");
    assert_eq!(left(s, "hank", T0).await, (990, 1_000), "{b}: the daily counter is forgotten, the bucket kept");
}

/// `note_block` keeps the later end of two blocks; `blocks` lists live ones soonest first;
/// `unnote_block` says whether the address was listed.
async fn the_blocks_index_lists_what_is_blocked_soonest_first<S: Store>(s: &S) {
    let b = s.backend();
    let min = MICROS_PER_MINUTE;
    s.note_block("203.0.113.9", T0 + 15 * min, T0).await.expect("note");
    s.note_block("2001:db8::1", T0 + 5 * min, T0).await.expect("note");
    s.note_block("203.0.113.9", T0 + 10 * min, T0).await.expect("note: shorter, ignored");
    s.note_block("198.51.100.1", T0 + min, T0).await.expect("note");
    let listed = s.blocks(T0 + 2 * min).await.expect("blocks");
    assert_eq!(
        listed,
        [("2001:db8::1".to_owned(), T0 + 5 * min), ("203.0.113.9".to_owned(), T0 + 15 * min)],
        "{b}: the expired one dropped, the longer block kept"
    );
    assert!(s.unnote_block("203.0.113.9", T0 + 2 * min).await.expect("unnote"), "{b}");
    assert!(!s.unnote_block("203.0.113.9", T0 + 2 * min).await.expect("unnote"), "{b}");
    assert_eq!(s.blocks(T0 + 6 * min).await.expect("blocks"), [], "{b}");
}

/// A tier's plan as `decide::plan` makes it for `subject` with `reserve`: its burst bucket and
/// daily window counting `cost`, the reservation `id` right after them, then a zone operation
/// (another hash tag: a cluster splits the plan). The tier allows 1,000 in both.
fn reserved_plan(subject: &str, id: Option<&str>, cost: u64, ttl: Micros) -> Vec<Op> {
    let [record, burst, daily] = decision_core::decide::reservation_keys(subject, id.unwrap_or("0"));
    let op = |key: String, limit, kind| Op { key, limit, cost, kind, shadow: false };
    let mut ops = vec![
        op(burst, Limit::token_bucket(1_000, MICROS_PER_MINUTE, 1_000), OpKind::TierBurst),
        op(daily, Limit::SlidingWindow { limit: 1_000, window: 24 * 60 * MICROS_PER_MINUTE }, OpKind::TierDaily),
    ];
    if id.is_some() {
        ops.push(op(record, Limit::Flag { duration: ttl }, OpKind::Reservation));
    }
    ops.push(window_op(&format!("pc:{{ip:{subject}}}:zone"), 1_000_000, MICROS_PER_MINUTE));
    ops
}

/// What a subject has left in its burst bucket and its daily window at `now` (a dry run).
async fn left<S: Store>(s: &S, subject: &str, now: Micros) -> (u64, u64) {
    let v = s.dry_run(&reserved_plan(subject, None, 1, 0)[..2], now).await.expect("dry run");
    (v[0].remaining + 1, v[1].remaining + 1)
}

async fn settle<S: Store>(s: &S, subject: &str, id: &str, actual: u64, now: Micros) -> Option<u64> {
    s.settle(&decision_core::decide::reservation_keys(subject, id), actual, now).await.expect("settle")
}

const RES_A: &str = "0000000000000000000000000000000a";
const RES_B: &str = "0000000000000000000000000000000b";
const RES_C: &str = "0000000000000000000000000000000c";

/// Estimate 100, actual 30: 70 come back. Estimate 100, actual 300: 200 more are counted. An
/// overrun past the limit is counted, and refuses what follows. A settle happens once.
async fn a_settle_refunds_and_overruns_exactly_once<S: Store>(s: &S) {
    let b = s.backend();
    let ttl = MICROS_PER_MINUTE;
    let v = s.apply(&reserved_plan("alice", Some(RES_A), 100, ttl), T0).await.expect("apply");
    assert!(v.iter().all(|v| v.allowed), "{b}: {v:?}");
    assert_eq!(left(s, "alice", T0).await, (900, 900), "{b}: the estimate is counted");
    assert_eq!(settle(s, "alice", RES_A, 30, T0).await, Some(100), "{b}");
    assert_eq!(left(s, "alice", T0).await, (970, 970), "{b}: 70 returned");
    assert_eq!(settle(s, "alice", RES_A, 0, T0).await, None, "{b}: settled twice");
    assert_eq!(left(s, "alice", T0).await, (970, 970), "{b}: a second settle changed something");

    s.apply(&reserved_plan("alice", Some(RES_B), 100, ttl), T0).await.expect("apply");
    assert_eq!(settle(s, "alice", RES_B, 300, T0).await, Some(100), "{b}");
    assert_eq!(left(s, "alice", T0).await, (670, 670), "{b}: 200 more counted");

    s.apply(&reserved_plan("alice", Some(RES_C), 600, ttl), T0).await.expect("apply");
    assert_eq!(settle(s, "alice", RES_C, 1_000, T0).await, Some(600), "{b}");
    let v = s.dry_run(&reserved_plan("alice", None, 1, 0)[..2], T0).await.expect("dry run");
    assert!(!v[0].allowed && !v[1].allowed, "{b}: an overrun past the limit must refuse the next request");
    assert_eq!((v[0].remaining, v[1].remaining), (0, 0), "{b}");
    // an unknown reservation, or one of another subject, settles nothing
    assert_eq!(settle(s, "bob", RES_C, 0, T0).await, None, "{b}");
    assert_eq!(settle(s, "alice", "ffffffffffffffffffffffffffffffff", 0, T0).await, None, "{b}");
}

/// A refund gives back only what is still counted: never below zero in a window that has
/// rolled, never past full in a bucket that has refilled meanwhile.
async fn a_refund_never_goes_below_zero_nor_past_full<S: Store>(s: &S) {
    let b = s.backend();
    let day = 24 * 60 * MICROS_PER_MINUTE;
    let t = T0 - T0 % day + day / 2;
    s.apply(&reserved_plan("carol", None, 50, 0), t).await.expect("apply");
    s.apply(&reserved_plan("carol", Some(RES_A), 100, 2 * day), t).await.expect("apply");
    assert_eq!(left(s, "carol", t).await, (850, 850), "{b}");
    // 90 seconds later the bucket has refilled (1,000 a minute); the day's window still holds 150
    let later = t + 90 * MICROS_PER_SEC;
    assert_eq!(left(s, "carol", later).await, (1_000, 850), "{b}");
    assert_eq!(settle(s, "carol", RES_A, 0, later).await, Some(100), "{b}");
    assert_eq!(left(s, "carol", later).await, (1_000, 950), "{b}: a full bucket stays full, the window gives 100");

    // in the next day's window, the previous day's count is what a refund can take back
    s.apply(&reserved_plan("dave", Some(RES_B), 100, 2 * day), t).await.expect("apply");
    let next_day = t + day;
    assert_eq!(settle(s, "dave", RES_B, 400, next_day).await, Some(100), "{b}");
    // the overrun is counted today; the estimate stays in yesterday, half weighted
    assert_eq!(left(s, "dave", next_day).await.1, 1_000 - 300 - 50, "{b}");
    s.apply(&reserved_plan("erin", Some(RES_C), 100, 3 * day), t).await.expect("apply");
    assert_eq!(settle(s, "erin", RES_C, 0, next_day).await, Some(100), "{b}");
    assert_eq!(left(s, "erin", next_day).await.1, 1_000, "{b}: yesterday's 100 refunded, not below zero");
}

/// A reservation never settled keeps its estimate and is gone after its time to live.
async fn an_unsettled_reservation_expires_keeping_its_estimate<S: Store>(s: &S) {
    let b = s.backend();
    s.apply(&reserved_plan("frank", Some(RES_A), 100, 10 * MICROS_PER_SEC), T0).await.expect("apply");
    let late = T0 + 11 * MICROS_PER_SEC;
    assert_eq!(settle(s, "frank", RES_A, 1, late).await, None, "{b}: an expired reservation settled");
    assert_eq!(left(s, "frank", late).await.1, 900, "{b}: the estimate stays counted");
}

/// Fifty reservations of 10 at once, then fifty settles at 3 at once: exactly 150 counted.
async fn concurrent_reservations_settle_exactly<S: Store>(s: &S) {
    let b = s.backend();
    let ids: Vec<String> = (0..50).map(|i| format!("{i:032x}")).collect();
    let plans: Vec<Vec<Op>> = ids.iter().map(|id| reserved_plan("grace", Some(id), 10, MICROS_PER_MINUTE)).collect();
    let calls = plans.iter().map(|p| Box::pin(s.apply(p, T0)) as Pin<Box<dyn Future<Output = _> + Send + '_>>);
    let verdicts: Vec<Result<Vec<decision_core::quota::Verdict>, super::StoreError>> = join_all(calls.collect()).await;
    assert!(verdicts.iter().all(|v| v.as_ref().is_ok_and(|v| v.iter().all(|v| v.allowed))), "{b}");
    assert_eq!(left(s, "grace", T0).await, (500, 500), "{b}");
    let settles =
        ids.iter().map(|id| Box::pin(settle(s, "grace", id, 3, T0)) as Pin<Box<dyn Future<Output = _> + Send + '_>>);
    let settled = join_all(settles.collect()).await;
    assert!(settled.iter().all(|e: &Option<u64>| *e == Some(10)), "{b}: {settled:?}");
    assert_eq!(left(s, "grace", T0).await, (850, 850), "{b}: 50 x 3 counted");
}

/// `leave` after a grant (a request cancelled while its admission was under way): the slot is
/// free again at once, and nothing counts for the breaker.
async fn leaving_frees_a_slot_granted_under_the_same_id<S: Store>(s: &S) {
    let cfg = traffic(1, 1, None);
    let (a, b) = ("00000000000000000000000000000011", "00000000000000000000000000000012");
    assert!(matches!(admit(s, a, false, &cfg, T0).await, Admit::Granted { .. }));
    assert!(matches!(admit(s, b, false, &cfg, T0).await, Admit::Wait(_)));
    s.leave("up", a).await.expect("leave");
    assert!(
        matches!(admit(s, b, true, &cfg, T0).await, Admit::Granted { .. }),
        "{}: the slot stayed taken",
        s.backend()
    );
    // and a waiter that leaves no longer holds the queue's head
    let c = "00000000000000000000000000000013";
    assert!(matches!(admit(s, c, false, &cfg, T0).await, Admit::Wait(_)));
    s.leave("up", c).await.expect("leave");
    s.leave("up", b).await.expect("leave");
    let d = "00000000000000000000000000000014";
    assert!(matches!(admit(s, d, false, &cfg, T0).await, Admit::Granted { .. }), "{}", s.backend());
}

/// `renew`: a lease renewed before it runs out stays held past its first expiry; an expired,
/// released or unknown lease is not brought back.
async fn a_renewed_lease_outlives_its_first_ttl<S: Store>(s: &S) {
    let cfg = traffic(1, 0, None);
    let ttl = cfg.lease_ttl;
    let held = "0000000000000000000000000000000e";
    assert!(matches!(admit(s, held, false, &cfg, T0).await, Admit::Granted { .. }));
    let lease = format!("l{held}");
    // renewed at 3/4 of its life, twice: held at 1.5 ttl, when it would have expired unrenewed
    assert!(s.renew("up", &lease, ttl, T0 + ttl * 3 / 4).await.expect("renew"), "{}", s.backend());
    assert!(s.renew("up", &lease, ttl, T0 + ttl * 3 / 2).await.expect("renew"));
    let other = "0000000000000000000000000000000f";
    assert!(matches!(admit(s, other, false, &cfg, T0 + ttl * 2).await, Admit::QueueFull(_)), "still held");
    // unknown, or past its renewed expiry: not renewed
    assert!(!s.renew("up", "l00000000000000000000000000000001", ttl, T0 + ttl * 2).await.expect("renew"));
    assert!(
        !s.renew("up", &lease, ttl, T0 + ttl * 3).await.expect("renew"),
        "{}: an expired lease came back",
        s.backend()
    );
    assert!(matches!(admit(s, other, false, &cfg, T0 + ttl * 3).await, Admit::Granted { .. }), "freed by expiry");
}

/// `dry_run` gives the verdicts `apply` would give, and stores nothing: not on an allowed plan,
/// not on a refused one.
async fn a_dry_run_answers_as_apply_and_counts_nothing<S: Store>(s: &S) {
    let plan = [window_op("dry", 2, MICROS_PER_MINUTE), bucket_op("dry-b", 3, 1)];
    for _ in 0..5 {
        let v = s.dry_run(&plan, T0).await.expect("dry run");
        assert_eq!((v[0].allowed, v[0].remaining, v[1].remaining), (true, 1, 2), "{}", s.backend());
    }
    assert_eq!(allowed(s, &plan, T0).await, [true, true]);
    assert_eq!(allowed(s, &plan, T0).await, [true, true]);
    // the window is spent: a dry run says so, as apply does, and still counts nothing
    let v = s.dry_run(&plan, T0).await.expect("dry run");
    assert_eq!((v[0].allowed, v[1].allowed, v[1].remaining), (false, true, 0), "{}", s.backend());
    let v = s.apply(&[bucket_op("dry-b", 3, 1)], T0).await.expect("store call");
    assert_eq!((v[0].allowed, v[0].remaining), (true, 0), "{}: a dry run was counted", s.backend());
}

/// `apply_admit`: a committed plan asks for its slot in the same call; a refused one takes none.
async fn a_plan_and_its_admission_in_one_call<S: Store>(s: &S) {
    let cfg = traffic(1, 1, None);
    let plan = [bucket_op("planned", 2, 1)];
    let (plan, cfg) = (&plan, &cfg);
    let call =
        |lease: &'static str| async move { s.apply_admit(plan, &Admission { upstream: "up", lease, cfg }, T0).await };
    let Planned { verdicts: v, admitted: first } = call("0000000000000000000000000000000a").await.expect("first");
    assert!(v[0].allowed);
    assert!(matches!(first, Some((Admit::Granted { probe: false }, o)) if o.in_use == 1));
    let Planned { verdicts: v, admitted: second } = call("0000000000000000000000000000000b").await.expect("second");
    assert!(v[0].allowed);
    assert!(matches!(second, Some((Admit::Wait(_), o)) if o.queued == 1));
    // the bucket is empty: refused, and no slot asked for
    let Planned { verdicts: v, admitted: third } = call("0000000000000000000000000000000c").await.expect("third");
    assert!(!v[0].allowed);
    assert!(third.is_none());
    // the queue holds only the second: a new arrival finds it full, not longer
    let d = "0000000000000000000000000000000d";
    assert!(matches!(admit(s, d, false, cfg, T0).await, Admit::QueueFull(o) if o.in_use == 1 && o.queued == 1));
}

async fn the_adaptive_limit_shrinks_on_errors_and_grows_back<S: Store>(s: &S) {
    let mut cfg = traffic(10, 0, None);
    cfg.adaptive = Some(AdaptiveConfig {
        min_limit: 2,
        decrease: 5_000,
        increase: 1,
        interval: MICROS_PER_SEC,
        error_rate: 500,
        latency: 500_000,
    });
    // an interval of errors and slow answers
    for i in 0..10u64 {
        let lease = format!("e{i}");
        assert_eq!(admit(s, &lease, false, &cfg, T0 + i).await, Admit::Granted { probe: false });
        let (_, occ) = complete(s, &format!("l{lease}"), i % 2 == 0, 700_000, &cfg, T0 + i).await;
        assert_eq!(occ.limit, 10);
    }
    // the next interval's first completion halves the limit
    assert_eq!(admit(s, "n0", false, &cfg, T0 + MICROS_PER_SEC).await, Admit::Granted { probe: false });
    let (_, occ) = complete(s, "ln0", false, 1_000, &cfg, T0 + MICROS_PER_SEC).await;
    assert_eq!(occ.limit, 5);
    let at = T0 + MICROS_PER_SEC + 1;
    let mut granted = 0;
    for i in 0..8 {
        if let Admit::Granted { .. } = admit(s, &format!("h{i}"), false, &cfg, at + i).await {
            granted += 1;
        }
    }
    assert_eq!(granted, 5, "five slots under the adaptive limit");
    for i in 0..5 {
        assert!(complete(s, &format!("lh{i}"), false, 1_000, &cfg, at + 10 + i).await.0);
    }
    // a healthy interval gives one slot back
    let later = T0 + 2 * MICROS_PER_SEC + 100;
    assert_eq!(admit(s, "g0", false, &cfg, later).await, Admit::Granted { probe: false });
    let (_, occ) = complete(s, "lg0", false, 1_000, &cfg, later).await;
    assert_eq!(occ.limit, 6);
}

fn traffic(limit: u64, queue: u64, breaker: Option<BreakerConfig>) -> TrafficConfig {
    TrafficConfig {
        concurrency_limit: limit,
        queue_size: queue,
        queue_timeout: 5 * MICROS_PER_SEC,
        lease_ttl: 10 * MICROS_PER_SEC,
        breaker,
        adaptive: None,
    }
}

/// Polls every future to completion concurrently (so a store that serves calls concurrently,
/// like Redis on multiplexed connections, really gets them at once).
async fn join_all<'a, T>(futs: Vec<Pin<Box<dyn Future<Output = T> + Send + 'a>>>) -> Vec<T> {
    let mut futs: Vec<Option<Pin<Box<dyn Future<Output = T> + Send + 'a>>>> = futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = f
                && let Poll::Ready(v) = fut.as_mut().poll(cx)
            {
                *o = Some(v);
                *f = None;
            }
        }
        if futs.iter().all(Option::is_none) { Poll::Ready(()) } else { Poll::Pending }
    })
    .await;
    out.into_iter().flatten().collect()
}

async fn complete<S: Store>(
    s: &S,
    lease: &str,
    error: bool,
    latency: Micros,
    cfg: &TrafficConfig,
    now: Micros,
) -> (bool, UpstreamState) {
    s.complete(&Release { upstream: "up", lease, error, latency, cfg }, now).await.expect("complete")
}

async fn admit<S: Store>(s: &S, lease: &str, returning: bool, cfg: &TrafficConfig, now: Micros) -> Admit {
    s.admit(&Admission { upstream: "up", lease, cfg }, returning, now).await.expect("admit").0
}

async fn concurrent_acquirers_never_exceed_the_limit<S: Store>(s: &S) {
    let cfg = traffic(5, 0, None);
    let names: Vec<String> = (0..40).map(|i| format!("{i:032x}")).collect();
    let calls = names.iter().map(|n| {
        let cfg = &cfg;
        Box::pin(async move { admit(s, n, false, cfg, T0).await }) as Pin<Box<dyn Future<Output = Admit> + Send + '_>>
    });
    let answers = join_all(calls.collect()).await;
    let granted: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| matches!(a, Admit::Granted { probe: false }))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(granted.len(), 5, "{answers:?}");
    assert!(answers.iter().all(|a| matches!(a, Admit::Granted { .. } | Admit::QueueFull(_))), "{answers:?}");
    // two completions free two slots, no more
    for i in &granted[..2] {
        let (released, occ) = complete(s, &format!("l{}", names[*i]), false, 0, &cfg, T0 + 1).await;
        assert!(released);
        assert_eq!(occ.in_use, 4 - u64::try_from(granted.iter().position(|g| g == i).unwrap_or(0)).unwrap_or(0));
    }
    let again: Vec<Admit> = join_all(
        (0..5)
            .map(|i| {
                let cfg = &cfg;
                Box::pin(async move { admit(s, &format!("{:032x}", 100 + i), false, cfg, T0 + 2).await })
                    as Pin<Box<dyn Future<Output = Admit> + Send + '_>>
            })
            .collect(),
    )
    .await;
    assert_eq!(again.iter().filter(|a| matches!(a, Admit::Granted { .. })).count(), 2, "{again:?}");
}

async fn releases_are_idempotent_and_an_expired_lease_frees_nothing_else<S: Store>(s: &S) {
    let cfg = traffic(1, 0, None);
    assert_eq!(admit(s, "aa", false, &cfg, T0).await, Admit::Granted { probe: false });
    assert!(matches!(admit(s, "bb", false, &cfg, T0 + 1).await, Admit::QueueFull(_)));
    assert!(complete(s, "laa", false, 0, &cfg, T0 + 2).await.0);
    assert!(!complete(s, "laa", false, 0, &cfg, T0 + 3).await.0, "a second release frees nothing");
    assert!(!complete(s, "lforged", true, 0, &cfg, T0 + 3).await.0, "an unknown lease frees nothing");
    // B takes the slot and never completes: its lease expires, C gets the slot
    assert_eq!(admit(s, "bb", false, &cfg, T0 + 4).await, Admit::Granted { probe: false });
    assert!(matches!(admit(s, "cc", false, &cfg, T0 + 5).await, Admit::QueueFull(_)));
    let later = T0 + 4 + cfg.lease_ttl;
    assert_eq!(admit(s, "cc", false, &cfg, later).await, Admit::Granted { probe: false });
    // B's late completion does not free C's slot
    assert!(!complete(s, "lbb", false, 0, &cfg, later + 1).await.0);
    assert!(matches!(admit(s, "dd", false, &cfg, later + 2).await, Admit::QueueFull(_)));
}

async fn the_queue_is_first_come_first_served_and_bounded<S: Store>(s: &S) {
    let cfg = traffic(1, 2, None);
    assert_eq!(admit(s, "aa", false, &cfg, T0).await, Admit::Granted { probe: false });
    assert!(matches!(admit(s, "w1", false, &cfg, T0 + 1).await, Admit::Wait(o) if o.queued == 1));
    assert!(matches!(admit(s, "w2", false, &cfg, T0 + 2).await, Admit::Wait(o) if o.queued == 2));
    assert!(matches!(admit(s, "w3", false, &cfg, T0 + 3).await, Admit::QueueFull(o) if o.queued == 2 && o.in_use == 1));
    assert!(complete(s, "laa", false, 0, &cfg, T0 + 10).await.0);
    // the slot is free, but it is the oldest waiter's: not the second's, nor a new arrival's
    assert!(matches!(admit(s, "w2", true, &cfg, T0 + 11).await, Admit::Wait(_)));
    assert!(matches!(admit(s, "nn", false, &cfg, T0 + 12).await, Admit::QueueFull(o) if o.queued == 2));
    assert_eq!(admit(s, "w1", true, &cfg, T0 + 13).await, Admit::Granted { probe: false });
    // a waiter that gives up leaves; one past its deadline is dropped
    assert!(matches!(admit(s, "nn", false, &cfg, T0 + 13).await, Admit::Wait(o) if o.queued == 2));
    s.leave("up", "nn").await.expect("leave");
    assert!(complete(s, "lw1", false, 0, &cfg, T0 + 14).await.0);
    let past = T0 + 2 + cfg.queue_timeout;
    assert_eq!(admit(s, "xx", false, &cfg, past).await, Admit::Granted { probe: false }, "w2 timed out");
}

async fn the_breaker_opens_and_gives_its_half_open_probe_to_exactly_one<S: Store>(s: &S) {
    let b = BreakerConfig {
        error_threshold: 5_000,
        min_requests: 4,
        window: 60 * MICROS_PER_SEC,
        reset_timeout: 30 * MICROS_PER_SEC,
    };
    let cfg = traffic(100, 0, Some(b));
    for i in 0..4u64 {
        let lease = format!("{i:02}");
        assert_eq!(admit(s, &lease, false, &cfg, T0 + i).await, Admit::Granted { probe: false });
        let (_, occ) = complete(s, &format!("l{lease}"), true, 0, &cfg, T0 + i).await;
        assert_eq!(occ.mode, if i < 3 { Mode::Closed } else { Mode::Open }, "after {} errors", i + 1);
    }
    let opened = T0 + 3;
    assert_eq!(admit(s, "x", false, &cfg, opened + 1).await, Admit::BreakerOpen { retry_after: b.reset_timeout - 1 });
    // half-open: of ten callers at once, exactly one probes
    let reset = opened + b.reset_timeout;
    let answers = join_all(
        (0..10)
            .map(|i| {
                let cfg = &cfg;
                Box::pin(async move { admit(s, &format!("h{i}"), false, cfg, reset).await })
                    as Pin<Box<dyn Future<Output = Admit> + Send + '_>>
            })
            .collect(),
    )
    .await;
    let probes: Vec<usize> =
        answers.iter().enumerate().filter(|(_, a)| **a == Admit::Granted { probe: true }).map(|(i, _)| i).collect();
    assert_eq!(probes.len(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|a| matches!(a, Admit::BreakerOpen { .. })).count(), 9);
    // a probe's lease is not renewed: the half-open test is one request, not a tunnel
    let probe = format!("ph{}", probes[0]);
    assert!(!s.renew("up", &probe, cfg.lease_ttl, reset).await.expect("renew"), "{}", s.backend());
    // the probe succeeds: closed again
    let (released, occ) = complete(s, &probe, false, 0, &cfg, reset + 1).await;
    assert!(released);
    assert_eq!(occ.mode, Mode::Closed);
    assert_eq!(admit(s, "y", false, &cfg, reset + 2).await, Admit::Granted { probe: false });
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
