//! The Redis store against a real redis-server that each test starts on a free loopback port.

use std::time::Duration;

use decision_core::plan::{Op, OpKind};
use decision_core::quota::Limit;
use decision_core::units::{MICROS_PER_MINUTE, MICROS_PER_SEC};
use proptest::prelude::*;

use redis::cluster_routing::Slot;

use super::*;
use crate::store::MemoryStore;
use crate::store::conformance;
use ::tests::{RedisCluster, RedisServer};

fn settings(url: String) -> RedisSettings {
    RedisSettings {
        url,
        cluster: Vec::new(),
        timeout: Duration::from_millis(500),
        pool_size: 2,
        ca_file: None,
        local_share: None,
        over_limit_cache: 0,
    }
}

/// With an over-limit cache of 1,000 plans.
fn cached(url: String) -> RedisSettings {
    RedisSettings { over_limit_cache: 1_000, ..settings(url) }
}

fn cluster_settings(cluster: &RedisCluster) -> RedisSettings {
    RedisSettings { cluster: cluster.urls(), ..settings(String::new()) }
}

#[tokio::test]
async fn redis_store_passes_the_conformance_suite() {
    let server = RedisServer::start();
    conformance::run_all(|| {
        assert_eq!(server.command("FLUSHALL"), "+OK\r\n");
        let store = RedisStore::connect(&settings(server.url())).expect("store").with_test_clock();
        async move { store }
    })
    .await;
}

#[tokio::test]
async fn redis_cluster_store_passes_the_conformance_suite() {
    let cluster = RedisCluster::start(3, 0);
    conformance::run_all(|| {
        cluster.flush_all();
        let store = RedisStore::connect(&cluster_settings(&cluster)).expect("store").with_test_clock();
        async move { store }
    })
    .await;
}

/// A manual failover of the master holding a key, while calls keep coming: every call is
/// answered (a verdict, or an error within the timeout that on_store_error answers), none is
/// allowed past the limit, the count survives on the promoted replica, and exactness resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_mid_run_loses_no_decisions() {
    let cluster = RedisCluster::start(3, 1);
    let store = std::sync::Arc::new(RedisStore::connect(&cluster_settings(&cluster)).expect("store"));
    let key = "pc:{s:failover}:burst";
    // 100 at once, then one an hour: nothing refills during the test
    let op = Op {
        key: key.into(),
        limit: Limit::token_bucket(1, 60 * MICROS_PER_MINUTE, 100),
        cost: 1,
        kind: OpKind::TierBurst,
        shadow: false,
    };
    let (master, replicas) = cluster.owner_of(key);
    let replica = replicas[0];
    let run = |n: usize| {
        let (store, op) = (store.clone(), op.clone());
        tokio::spawn(async move {
            let (mut allowed, mut errors, mut slowest) = (0, 0, Duration::ZERO);
            for _ in 0..n {
                let started = crate::clock::instant();
                let answer = tokio::time::timeout(store.timeout, store.apply(std::slice::from_ref(&op), 0)).await;
                slowest = slowest.max(started.elapsed());
                match answer {
                    Ok(Ok(v)) => allowed += usize::from(v[0].allowed),
                    _ => errors += 1,
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (allowed, errors, slowest)
        })
    };
    let workers: Vec<_> = (0..4).map(|_| run(60)).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(replica.cli(&["CLUSTER", "FAILOVER"]).trim(), "OK");
    let (mut allowed, mut errors) = (0, 0);
    for w in workers {
        let (a, e, slowest) = w.await.expect("worker");
        assert!(slowest < store.timeout + Duration::from_millis(900), "a call took {slowest:?}");
        allowed += a;
        errors += e;
    }
    // the replica took over the key's hash slot
    let deadline = crate::clock::instant() + Duration::from_secs(20);
    while cluster.owner_of(key).0.port != replica.port {
        assert!(crate::clock::instant() < deadline, "the replica never took over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.wait_until_settled();
    assert!(allowed <= 100, "{allowed} allowed past a burst of 100");
    // a manual failover loses no write: the promoted replica holds every counted call, so what
    // is left of the burst is exactly what no call took (a call that failed may have counted)
    let mut rest = 0;
    for _ in 0..120 {
        let v = tokio::time::timeout(Duration::from_secs(2), store.apply(std::slice::from_ref(&op), 0))
            .await
            .expect("answered in time")
            .expect("answered after the failover");
        rest += usize::from(v[0].allowed);
    }
    assert!(
        allowed + rest <= 100 && allowed + rest + errors >= 100,
        "allowed {allowed} during and {rest} after the failover, {errors} errors: not one burst of 100"
    );
    assert_ne!(master.port, replica.port);
    // exactness on a fresh key, through the new layout
    let fresh = Op { key: "pc:{s:failover-after}:burst".into(), ..op.clone() };
    let mut after = 0;
    for _ in 0..150 {
        after += usize::from(store.apply(std::slice::from_ref(&fresh), 0).await.expect("answered")[0].allowed);
    }
    assert_eq!(after, 100);
}

/// A client hammering past its quota is answered from the over-limit cache, at no Redis call,
/// with the verdict Redis would give; the moment its limit would let it through, it goes to
/// Redis again. Other clients are not affected, and another instance's counts still show.
#[tokio::test]
async fn a_client_over_its_limit_costs_no_redis_call_until_its_limit_would_allow_it() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&cached(server.url())).expect("store").with_test_clock();
    let memory = MemoryStore::new();
    let t0 = 1_800_000_000 * MICROS_PER_SEC;
    let hammer = [conformance::bucket_op("hammer", 5, 60), conformance::window_op("zone", 1_000, MICROS_PER_MINUTE)];
    for i in 0..5 {
        assert!(store.apply(&hammer, t0 + i).await.expect("apply").iter().all(|v| v.allowed));
        memory.apply_now(&hammer, t0 + i);
    }
    let before = server.evalsha_calls();
    for i in 0..100 {
        let now = t0 + 1_000 + i * 1_000;
        let got = store.apply(&hammer, now).await.expect("apply");
        assert!(!got[0].allowed);
        assert_eq!(got, memory.apply_now(&hammer, now), "the cached answer is the one Redis gives, at {now}");
    }
    assert_eq!(server.evalsha_calls() - before, 1, "only the first refusal reached Redis");
    assert_eq!(store.over_limit.as_ref().expect("cache").hits().get(), 99);
    // a client that is not over its limit is not answered from the cache
    let other = [conformance::bucket_op("other", 5, 60)];
    assert!(store.apply(&other, t0 + 200_000).await.expect("apply")[0].allowed);
    assert_eq!(server.evalsha_calls() - before, 2);
    // a second later the bucket holds one token again: the plan goes to Redis and is allowed
    let later = t0 + MICROS_PER_SEC + 5;
    let got = store.apply(&hammer, later).await.expect("apply");
    assert!(got[0].allowed);
    assert_eq!(got, memory.apply_now(&hammer, later));
    assert_eq!(server.evalsha_calls() - before, 3);
}

/// Another instance can only consume more while a plan is refused, never give back, so a
/// refusal remembered here holds; and a limit changed by a reload is a different plan.
#[tokio::test]
async fn the_over_limit_cache_never_refuses_what_redis_would_allow() {
    let server = RedisServer::start();
    let here = RedisStore::connect(&cached(server.url())).expect("store");
    let there = RedisStore::connect(&settings(server.url())).expect("store");
    let op = [conformance::window_op("shared", 3, MICROS_PER_MINUTE)];
    for _ in 0..3 {
        assert!(there.apply(&op, 0).await.expect("apply")[0].allowed);
    }
    assert!(!here.apply(&op, 0).await.expect("apply")[0].allowed);
    assert!(!here.apply(&op, 0).await.expect("apply")[0].allowed);
    assert_eq!(here.over_limit.as_ref().expect("cache").hits().get(), 1);
    // the policy now allows 4: a new plan, decided by Redis
    let raised = [conformance::window_op("shared", 4, MICROS_PER_MINUTE)];
    assert!(here.apply(&raised, 0).await.expect("apply")[0].allowed);
    // a plan naming a key twice is never remembered
    let twice =
        [conformance::window_op("twice", 1, MICROS_PER_MINUTE), conformance::window_op("twice", 1, MICROS_PER_MINUTE)];
    assert!(here.over_limit.as_ref().expect("cache").fingerprint(&twice).is_none());
}

/// A cluster master dies (no replica to take over): calls for its slots fail within the timeout,
/// never hang, and the store reports itself down. Calls for the other masters' keys answer
/// rightly or fail within the timeout too: while a master is down (until a failover), the
/// client's refreshes of the layout can hold them past the timeout (seen on a loaded machine).
#[tokio::test]
async fn a_dead_cluster_master_fails_its_calls_within_the_timeout() {
    let mut cluster = RedisCluster::start(3, 0);
    let s = RedisSettings { timeout: Duration::from_millis(100), ..cluster_settings(&cluster) };
    let store = RedisStore::connect(&s).expect("store");
    let keys: Vec<String> = (0..30).map(|i| format!("pc:{{s:k{i}}}:burst")).collect();
    let op = |k: &str| [conformance::bucket_op(k, 100, 60)];
    for k in &keys {
        assert!(store.apply(&op(k), 0).await.expect("answered")[0].allowed);
    }
    assert!(store.probe().await.is_ok());
    let dead = cluster.owner_of(&keys[0]).0.port;
    let on_dead: Vec<bool> = keys.iter().map(|k| cluster.owner_of(k).0.port == dead).collect();
    assert!(on_dead.iter().any(|d| !d), "30 keys all on one master");
    cluster.nodes.iter_mut().find(|n| n.port == dead).expect("the master").kill();
    let mut live_answers = 0;
    for _ in 0..3 {
        for (k, dead) in keys.iter().zip(&on_dead) {
            let started = crate::clock::instant();
            // as the engine calls it: bounded by the store's timeout
            let answer = tokio::time::timeout(s.timeout, store.apply(&op(k), 0)).await;
            let took = started.elapsed();
            assert!(took < s.timeout + Duration::from_millis(900), "a call took {took:?}");
            match (dead, answer) {
                (true, Ok(Ok(v))) => panic!("a call to a dead master answered {v:?}"),
                (false, Ok(Ok(v))) => {
                    assert!(v[0].allowed, "a live key within its burst");
                    live_answers += 1;
                }
                _ => {}
            }
        }
    }
    assert!(live_answers > 0, "no live master answered at all");
    assert!(store.probe().await.is_err(), "a cluster with a dead master is not ready");
}

/// rediss:// to a cluster that talks TLS everywhere, with AUTH and the test CA: plans over two
/// slots are counted exactly; without the CA, the system's roots refuse the nodes.
#[tokio::test]
async fn a_tls_cluster_with_a_password_and_a_private_ca() {
    let cluster = RedisCluster::start_tls(3, "cluster-s3cret");
    let ca = ::tests::workspace_root().join("tests/fixtures/tls/ca.pem");
    let s = RedisSettings { ca_file: Some(ca), ..cluster_settings(&cluster) };
    assert!(s.cluster.iter().all(|u| u.starts_with("rediss://")));
    assert!(!format!("{s:?}").contains("cluster-s3cret"));
    let store = RedisStore::connect(&s).expect("store");
    let plan = [
        conformance::bucket_op("pc:{s:tls}:burst", 5, 1),
        conformance::window_op("pc:{ip:tls}:zone", 1_000, MICROS_PER_MINUTE),
    ];
    assert_ne!(Slot::for_key(&plan[0].key), Slot::for_key(&plan[1].key));
    let mut allowed = 0;
    for _ in 0..8 {
        allowed += usize::from(store.apply(&plan, 0).await.expect("answered over TLS")[0].allowed);
    }
    assert_eq!(allowed, 5);
    let untrusted =
        RedisStore::connect(&RedisSettings { timeout: Duration::from_millis(200), ..cluster_settings(&cluster) })
            .expect("store");
    assert!(untrusted.apply(&plan, 0).await.is_err(), "the test CA is not among the system's roots");
}

#[tokio::test]
async fn keys_expire_by_the_server_clock_no_later_than_needed() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&settings(server.url())).expect("store");
    let ops = [
        Op {
            key: "pc:{s:a}:burst".into(),
            limit: Limit::token_bucket(60, MICROS_PER_MINUTE, 100),
            cost: 1,
            kind: OpKind::TierBurst,
            shadow: false,
        },
        Op {
            key: "pc:{ip:1}:zone".into(),
            limit: Limit::SlidingWindow { limit: 10, window: MICROS_PER_MINUTE },
            cost: 1,
            kind: OpKind::Zone,
            shadow: false,
        },
        Op {
            key: "rl:{x}:f60".into(),
            limit: Limit::FixedWindow { limit: 10, window: MICROS_PER_MINUTE },
            cost: 1,
            kind: OpKind::Descriptor,
            shadow: false,
        },
    ];
    // `now` is ignored: the server's clock decides
    let v = store.apply(&ops, 0).await.expect("apply");
    assert!(v.iter().all(|v| v.allowed));
    assert!(store.ready());
    let ttl =
        |k: &str| server.command(&format!("PTTL {k}")).trim().trim_start_matches(':').parse::<i64>().unwrap_or(-9);
    let bucket = ttl("pc:{s:a}:burst");
    assert!((1..=1_000).contains(&bucket), "a bucket with one token spent is whole again within a second: {bucket} ms");
    let window = ttl("pc:{ip:1}:zone");
    assert!((60_000..=120_000).contains(&window), "a sliding window lives two windows from its start: {window} ms");
    let fixed = ttl("rl:{x}:f60");
    assert!((1..=60_000).contains(&fixed), "a fixed window lives to its end: {fixed} ms");
}

#[tokio::test]
async fn a_script_flush_or_a_restart_does_not_fail_requests_for_long() {
    let mut server = RedisServer::start();
    let port = server.port;
    let store = RedisStore::connect(&cached(server.url())).expect("store");
    let op = [conformance::window_op("k", 1000, MICROS_PER_MINUTE)];
    store.apply(&op, 0).await.expect("first call");
    // a client over its limit, refused from the over-limit cache
    let over = [conformance::window_op("over", 1, MICROS_PER_MINUTE)];
    assert!(store.apply(&over, 0).await.expect("counted")[0].allowed);
    assert!(!store.apply(&over, 0).await.expect("refused by Redis")[0].allowed);
    assert!(!store.apply(&over, 0).await.expect("refused from the cache")[0].allowed);
    assert_eq!(store.over_limit.as_ref().expect("cache").hits().get(), 1);
    // SCRIPT FLUSH (as after a failover): EVALSHA meets NOSCRIPT, the script is reloaded, the
    // request is answered
    assert_eq!(server.command("SCRIPT FLUSH"), "+OK\r\n");
    store.apply(&op, 0).await.expect("answered after SCRIPT FLUSH");

    // down: an error within the timeout, never a hang; /readyz would report it
    server.kill();
    let started = crate::clock::instant();
    assert!(store.apply(&op, 0).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    assert!(!store.ready());
    assert!(store.probe().await.is_err());

    // back on the same port: service resumes without a restart of ours
    let _server = RedisServer::start_on(port);
    let deadline = crate::clock::instant() + Duration::from_secs(20);
    while store.apply(&op, 0).await.is_err() {
        assert!(crate::clock::instant() < deadline, "the store did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(store.ready());
    // the restarted Redis lost its counters, and the cache forgot its refusals with the outage
    assert!(store.apply(&over, 0).await.expect("answered")[0].allowed);
}

#[test]
fn passwords_never_reach_a_log_line() {
    assert_eq!(redacted("redis://:s3cret@10.0.0.1:6379/0"), "redis://:****@10.0.0.1:6379/0");
    assert_eq!(redacted("redis://app:s3cret@host:6379"), "redis://app:****@host:6379");
    assert_eq!(redacted("redis://host:6379"), "redis://host:6379");
    let s = RedisSettings {
        url: "redis://app:s3cret@host:6379".into(),
        cluster: vec!["redis://app:s3cret@host:6379".into()],
        timeout: Duration::from_millis(25),
        pool_size: 1,
        ca_file: None,
        local_share: None,
        over_limit_cache: 0,
    };
    assert!(!format!("{s:?}").contains("s3cret"));
}

#[derive(Debug, Clone)]
struct RandomOp {
    key: usize,
    limit: Limit,
    cost: u64,
    shadow: bool,
}

fn random_limit() -> impl Strategy<Value = Limit> {
    prop_oneof![
        (1..50u64, 1..120u64).prop_map(|(burst, per_minute)| Limit::token_bucket(per_minute, MICROS_PER_MINUTE, burst)),
        (0..30u64, prop_oneof![Just(MICROS_PER_SEC), Just(MICROS_PER_MINUTE), Just(3_600 * MICROS_PER_SEC)])
            .prop_map(|(limit, window)| Limit::SlidingWindow { limit, window }),
        (0..30u64, prop_oneof![Just(MICROS_PER_SEC), Just(MICROS_PER_MINUTE)])
            .prop_map(|(limit, window)| Limit::FixedWindow { limit, window }),
    ]
}

fn plans() -> impl Strategy<Value = Vec<(u64, Vec<RandomOp>)>> {
    let op = (0..3usize, random_limit(), prop_oneof![4 => Just(1u64), 1 => 0..4u64], prop::bool::weighted(0.2))
        .prop_map(|(key, limit, cost, shadow)| RandomOp { key, limit, cost, shadow });
    prop::collection::vec(
        (prop_oneof![Just(0u64), 0..3_000_000u64, 0..200_000_000u64], prop::collection::vec(op, 1..4)),
        1..40,
    )
}

/// The Lua script and the Rust quota math agree on every plan of random operations at random
/// time steps (the same key always keeps the same kind of limit, as in real plans). Run through
/// a TestRunner so the redis-server is owned here and stopped at the end.
#[test]
fn the_lua_script_and_the_rust_quota_math_agree() {
    let server = RedisServer::start();
    lua_and_rust_agree(48, || {
        assert_eq!(server.command("FLUSHALL"), "+OK\r\n");
        settings(server.url())
    });
}

/// With the over-limit cache, every plan is allowed or refused exactly as without it, and an
/// allowed plan's verdicts are exact (it went to Redis). A refused plan answered from the cache
/// reports what its operations saw at the refusal, advanced in time: its other operations may
/// since have been counted by other plans, which it does not see.
#[test]
fn the_over_limit_cache_decides_every_plan_as_redis_would() {
    let server = RedisServer::start();
    lua_and_rust_agree(32, || {
        assert_eq!(server.command("FLUSHALL"), "+OK\r\n");
        cached(server.url())
    });
}

/// The same on a Redis Cluster, where the keys k0, k1 and k2 sit in three slots, so plans are
/// split by hash slot, checked, then counted: they must still be all-or-nothing.
#[test]
fn split_plans_on_a_redis_cluster_agree_with_the_rust_quota_math() {
    let cluster = RedisCluster::start(3, 0);
    lua_and_rust_agree(16, || {
        cluster.flush_all();
        cluster_settings(&cluster)
    });
}

fn lua_and_rust_agree(cases: u32, fresh: impl Fn() -> RedisSettings) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
    let result = runner.run(&plans(), |plans| {
        let settings = fresh();
        let _in_runtime = rt.enter();
        let redis = RedisStore::connect(&settings).expect("store").with_test_clock();
        let memory = MemoryStore::new();
        let mut now = 1_800_000_000 * MICROS_PER_SEC + 123_456;
        // one limit per key for the whole sequence, taken from its first use
        let mut limits: [Option<Limit>; 3] = [None; 3];
        for (dt, ops) in plans {
            now += dt;
            let ops: Vec<Op> = ops
                .iter()
                .map(|o| {
                    let limit = *limits[o.key].get_or_insert(o.limit);
                    Op { key: format!("k{}", o.key), limit, cost: o.cost, kind: OpKind::Descriptor, shadow: o.shadow }
                })
                .collect();
            let expected = memory.apply_now(&ops, now);
            let got = rt.block_on(redis.apply(&ops, now)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let refused = decision_core::plan::refuses(&ops, &expected);
            prop_assert_eq!(decision_core::plan::refuses(&ops, &got), refused, "at {} with {:?}", now, ops);
            if !refused || settings.over_limit_cache == 0 {
                prop_assert_eq!(got, expected, "at {} with {:?}", now, ops);
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// The previous window's weight, exactly at the boundary where one unit more or less changes the
/// answer: at many instants of a window, a request that just fits by the Rust math must fit by
/// the script's, and one more must not.
#[tokio::test]
async fn the_sliding_weight_agrees_to_the_last_unit() {
    let server = RedisServer::start();
    let redis = RedisStore::connect(&settings(server.url())).expect("store").with_test_clock();
    let window = MICROS_PER_MINUTE;
    let limit = 1_000_000;
    let prev = 99_991; // prime, so prev * weight crosses multiples of the scale often
    let t0 = 1_800_000_000 * MICROS_PER_SEC; // a window start
    for step in 0..200u64 {
        let elapsed = step * 299_993 % window;
        let key = format!("w{step}");
        let op = |cost| Op {
            key: key.clone(),
            limit: Limit::SlidingWindow { limit, window },
            cost,
            kind: OpKind::Descriptor,
            shadow: false,
        };
        assert!(redis.apply(&[op(prev)], t0).await.expect("fill")[0].allowed);
        let now = t0 + window + elapsed;
        let estimate = decision_core::quota::weighted(prev, window, elapsed);
        let fits = limit - estimate;
        assert!(
            !redis.apply(&[op(fits + 1)], now).await.expect("over")[0].allowed,
            "one more than fits, at {elapsed} us"
        );
        assert!(redis.apply(&[op(fits)], now).await.expect("fits")[0].allowed, "exactly what fits, at {elapsed} us");
    }
}

#[tokio::test]
async fn a_freed_slot_is_announced_to_every_instance() {
    use decision_core::traffic::{Admit, TrafficConfig};
    let server = RedisServer::start();
    let (a, b) = (
        RedisStore::connect(&settings(server.url())).expect("store"),
        RedisStore::connect(&settings(server.url())).expect("store"),
    );
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    b.watch_freed(
        std::sync::Arc::new(move |key: &str| {
            let _ = tx.send(key.to_owned());
        }),
        std::sync::Arc::new(|_: &str| {}),
    );
    let cfg = TrafficConfig {
        concurrency_limit: 1,
        queue_size: 1,
        queue_timeout: 5 * MICROS_PER_SEC,
        lease_ttl: 5 * MICROS_PER_SEC,
        breaker: None,
        adaptive: None,
    };
    let key = "00112233aabbccdd";
    // the subscription is made in the background: keep freeing until it is heard
    let heard = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let lease = "a".repeat(32);
            let (admit, _) =
                a.admit(&Admission { upstream: key, lease: &lease, cfg: &cfg }, false, 0).await.expect("admit");
            assert_eq!(admit, Admit::Granted { probe: false });
            let (released, _) = a
                .complete(
                    &Release { upstream: key, lease: &format!("l{lease}"), error: false, latency: 0, cfg: &cfg },
                    0,
                )
                .await
                .expect("complete");
            assert!(released);
            if let Ok(Some(k)) = tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                return k;
            }
        }
    })
    .await
    .expect("a release at one instance is heard at another");
    assert_eq!(heard, key);
}

/// One step of a random traffic scenario.
#[derive(Debug, Clone)]
enum Step {
    /// a new arrival (its id) or a waiter coming back
    Admit {
        id: u8,
        returning: bool,
    },
    /// the completion of lease `id` (probe or not), with an error or not, this slow
    Complete {
        id: u8,
        probe: bool,
        error: bool,
        latency: u64,
    },
    Leave {
        id: u8,
    },
}

fn steps() -> impl Strategy<Value = Vec<(u64, Step)>> {
    let step = prop_oneof![
        (0u8..12, any::<bool>()).prop_map(|(id, returning)| Step::Admit { id, returning }),
        (0u8..12, prop::bool::weighted(0.1), any::<bool>(), 0u64..1_000_000)
            .prop_map(|(id, probe, error, latency)| Step::Complete { id, probe, error, latency }),
        (0u8..12).prop_map(|id| Step::Leave { id }),
    ];
    // time steps from nothing to past every timeout of the scenario's settings
    prop::collection::vec((prop_oneof![Just(0u64), 1u64..2_000_000, 2_000_000u64..40_000_000], step), 1..60)
}

/// traffic.lua and the memory store (decision-core's traffic rules) agree on every answer of
/// random scenarios: arrivals, waiters, completions with errors and latencies, departures, at
/// random time steps, with a breaker and an adaptive limit on.
#[test]
fn traffic_lua_and_the_rust_traffic_rules_agree() {
    use decision_core::traffic::{AdaptiveConfig, BreakerConfig, TrafficConfig};
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 48, ..ProptestConfig::default() });
    let cfg = TrafficConfig {
        concurrency_limit: 3,
        queue_size: 2,
        queue_timeout: 5 * MICROS_PER_SEC,
        lease_ttl: 8 * MICROS_PER_SEC,
        breaker: Some(BreakerConfig {
            error_threshold: 5_000,
            min_requests: 3,
            window: 10 * MICROS_PER_SEC,
            reset_timeout: 4 * MICROS_PER_SEC,
        }),
        adaptive: Some(AdaptiveConfig {
            min_limit: 1,
            decrease: 5_000,
            increase: 1,
            interval: 3 * MICROS_PER_SEC,
            error_rate: 2_000,
            latency: 800_000,
        }),
    };
    let result = runner.run(&steps(), |steps| {
        assert_eq!(server.command("FLUSHALL"), "+OK\r\n");
        let _in_runtime = rt.enter();
        let redis = RedisStore::connect(&settings(server.url())).expect("store").with_test_clock();
        let memory = MemoryStore::new();
        let mut now = 1_800_000_000 * MICROS_PER_SEC + 123_456;
        let up = "0011223344556677";
        for (dt, step) in steps {
            now += dt + 1; // distinct instants: the queue's order by deadline is then arrival order
            let hex = |id: u8| format!("{id:032x}");
            match step {
                Step::Admit { id, returning } => {
                    let lease = hex(id);
                    let a = Admission { upstream: up, lease: &lease, cfg: &cfg };
                    let expected = memory.admit_now(&a, returning, now);
                    let got =
                        rt.block_on(redis.admit(&a, returning, now)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(got, expected, "admit {} at {}", id, now);
                }
                Step::Complete { id, probe, error, latency } => {
                    let lease = format!("{}{}", if probe { 'p' } else { 'l' }, hex(id));
                    let r = Release { upstream: up, lease: &lease, error, latency, cfg: &cfg };
                    let expected = memory.complete_now(&r, now);
                    let got = rt.block_on(redis.complete(&r, now)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(got, expected, "complete {} at {}", lease, now);
                }
                Step::Leave { id } => {
                    memory.leave_now(up, &hex(id));
                    rt.block_on(redis.leave(up, &hex(id))).map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// settle.lua and `quota::settle` (through the memory store) agree, and admin.lua's grants and
/// `quota::grant`: random reservations on a subject's two tier limits (random kinds), settled
/// with random actual costs at random later times (some after their window rolled, some after
/// their record expired), and operators' grants between them, leave both stores with the same
/// counts, step after step.
#[test]
fn settle_lua_and_the_rust_settle_agree() {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let step = (prop_oneof![Just(0u64), 0..5_000_000u64, 0..120_000_000u64], 1..60u64, 0..120u64, any::<bool>());
    let case = (random_limit(), random_limit(), prop::collection::vec(step, 1..30));
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 32, ..ProptestConfig::default() });
    let result = runner.run(&case, |(burst, daily, steps)| {
        assert_eq!(server.command("FLUSHALL"), "+OK\r\n");
        let _in_runtime = rt.enter();
        let redis = RedisStore::connect(&settings(server.url())).expect("store").with_test_clock();
        let memory = MemoryStore::new();
        let mut now = 1_800_000_000 * MICROS_PER_SEC + 654_321;
        let mut open: Vec<String> = Vec::new();
        let tier = |cost: u64| {
            let [_, b, d] = decision_core::decide::reservation_keys("sam", "0");
            vec![
                Op { key: b, limit: burst, cost, kind: OpKind::TierBurst, shadow: false },
                Op { key: d, limit: daily, cost, kind: OpKind::TierDaily, shadow: false },
            ]
        };
        for (i, (dt, estimate, actual, reserve)) in steps.into_iter().enumerate() {
            now += dt;
            if estimate % 5 == 0 {
                // an operator's grant of `actual` units on both limits
                let counters: Vec<(String, Limit)> = tier(0).into_iter().map(|o| (o.key, o.limit)).collect();
                let delta = -i64::try_from(actual).unwrap_or(0);
                memory.adjust_now(&counters, delta, now);
                rt.block_on(redis.adjust(&counters, delta, now)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            } else if reserve || open.is_empty() {
                let id = format!("{i:032x}");
                let mut ops = tier(estimate);
                let [record, ..] = decision_core::decide::reservation_keys("sam", &id);
                let ttl = 30 * MICROS_PER_SEC;
                ops.push(Op {
                    key: record,
                    limit: Limit::Flag { duration: ttl },
                    cost: estimate,
                    kind: OpKind::Reservation,
                    shadow: false,
                });
                let expected = memory.apply_now(&ops, now);
                let got = rt.block_on(redis.apply(&ops, now)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(&got, &expected, "reserve at {}", now);
                if !decision_core::plan::refuses(&ops, &got) {
                    open.push(id);
                }
            } else {
                let id = open.remove(usize::try_from(actual).unwrap_or(0) % open.len());
                let keys = decision_core::decide::reservation_keys("sam", &id);
                let expected = memory.settle_now(&keys, actual, now);
                let got =
                    rt.block_on(redis.settle(&keys, actual, now)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, expected, "settle {} at {}", id, now);
            }
            let probe = tier(1);
            let expected = memory.dry_run_now(&probe, now);
            let got = rt.block_on(redis.dry_run(&probe, now)).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(got, expected, "the counts after step {} at {}", i, now);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}
