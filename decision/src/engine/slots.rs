//! Traffic-spike control on the request path: after an allowed decision, a concurrency slot
//! for the route's upstream (a lease), or a wait in the queue, or a 503 (breaker open, queue
//! full, waited too long); and completions, from Envoy's access log, that release leases and
//! feed the breaker. The rules live in `decision_core::traffic`, the state in the store.
//!
//! A waiter sleeps until a slot is freed: a completion at this instance wakes it at once, one at
//! another instance through the store's notification (Redis pub/sub) when the store has one,
//! and a slow recheck covers leases that expire by TTL, which nobody announces.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use decision_core::Reason;
use decision_core::decide::{Decision, Lease};
use decision_core::policy::{OnStoreError, Policy, Route};
use decision_core::traffic::{self, Admit, TrafficConfig};
use tokio::sync::Notify;

use super::Engine;
use crate::clock;
use crate::store::{Admission, Store, StoreError, UpstreamState};

/// How often a waiter looks again without a notification (for leases that expired).
const RECHECK: Duration = Duration::from_millis(250);

/// The waiters of this instance, by upstream key.
#[derive(Default)]
pub struct Waiters(Mutex<HashMap<Arc<str>, Arc<Notify>>>);

impl Waiters {
    fn of(&self, key: &str) -> Arc<Notify> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = m.get(key) {
            return n.clone();
        }
        let n = Arc::new(Notify::new());
        m.insert(Arc::from(key), n.clone());
        n
    }

    /// A slot of `key` was freed: every waiter here looks again (the oldest gets it).
    pub fn freed(&self, key: &str) {
        let n = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(key).cloned();
        if let Some(n) = n {
            n.notify_waiters();
        }
    }
}

/// A new reservation id (the native Check's `reserve`): 128 random bits as 32 hex, as a lease's.
pub fn new_reservation_id() -> String {
    new_lease_id()
}

/// Random bytes for lease ids, drawn from the kernel's generator 4 KiB at a time on each
/// thread: one `getrandom` call per 256 leases instead of one per lease (that syscall was 2.4% of
/// a decision's CPU with traffic control on). Every byte is handed out once.
struct RandomPool {
    bytes: [u8; 4096],
    at: usize,
}

thread_local! {
    static RANDOM: std::cell::RefCell<RandomPool> =
        const { std::cell::RefCell::new(RandomPool { bytes: [0; 4096], at: 4096 }) };
}

/// 16 bytes from this thread's pool; None if the kernel's generator fails.
fn random_16() -> Option<[u8; 16]> {
    RANDOM.with_borrow_mut(|p| {
        if p.at + 16 > p.bytes.len() {
            getrandom::getrandom(&mut p.bytes).ok()?;
            p.at = 0;
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&p.bytes[p.at..p.at + 16]);
        p.at += 16;
        Some(out)
    })
}

/// A new lease id: 128 random bits as 32 hex (the store prefixes `l`, or `p` for a probe).
pub(crate) fn new_lease_id() -> String {
    let bytes = random_16().unwrap_or_else(|| {
        // the kernel's generator does not fail once the system is up; if it ever does, a
        // clock-and-counter id is still unique, which is all a lease id must be
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&clock::now_micros().to_be_bytes());
        bytes[8..].copy_from_slice(&n.to_be_bytes());
        bytes
    });
    decision_core::encode::hex(&bytes)
}

/// A lease header's two parts (`<upstream key>.<lease id>`, `respond::LEASE_HEADER`), if it is
/// well-formed: 16 hex, a dot, `l` or `p` and 32 hex.
pub fn parse_lease(header: &str) -> Option<(&str, &str)> {
    let (key, id) = header.trim().split_once('.')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let ok = hex(key, 16) && id.len() == 33 && matches!(id.as_bytes()[0], b'l' | b'p') && hex(&id[1..], 32);
    ok.then_some((key, id))
}

/// A request between its first ask for a slot and its decision. Dropped before `disarm` (its
/// caller cancelled the call, and the future went with it), it leaves the queue and frees any
/// slot the store granted under its lease id, on a task of its own, and wakes this instance's
/// waiters: an abandoned waiter must not hold the queue's head until `queue_timeout`.
/// It borrows what it names: nothing is allocated unless it fires.
pub(crate) struct Abandoned<'a, S: Store> {
    engine: &'a std::sync::Weak<Engine<S>>,
    upstream: &'a str,
    lease: &'a str,
    armed: bool,
}

impl<'a, S: Store> Abandoned<'a, S> {
    pub(crate) fn new(engine: &'a std::sync::Weak<Engine<S>>, upstream: &'a str, lease: &'a str) -> Self {
        Abandoned { engine, upstream, lease, armed: true }
    }

    /// The decision was made: the slot, if any, is the request's to hand over.
    pub(crate) fn disarm(&mut self) {
        self.armed = false;
    }
}

impl<S: Store> Drop for Abandoned<'_, S> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(engine) = self.engine.upgrade() {
            tracing::debug!(upstream = self.upstream, "a cancelled request gives its slot or queue place back");
            engine.leave_later(self.upstream, self.lease);
        }
    }
}

/// Resolves at the caller's deadline; never without one.
async fn sleep_until_caller(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}

impl<S: Store> Engine<S> {
    /// `leave`, on a task of its own on the background runtime (with a shared engine; else not
    /// at all: the place or slot then expires by itself).
    pub(crate) fn leave_later(&self, upstream: &str, lease: &str) {
        let (Some(engine), Some(rt)) = (self.this.upgrade(), self.background()) else { return };
        let (upstream, lease) = (upstream.to_owned(), lease.to_owned());
        rt.spawn(async move {
            engine.leave(&upstream, &lease).await;
            engine.waiters.freed(&upstream);
        });
    }

    fn seen(&self, upstream: &Arc<str>, o: UpstreamState) {
        self.metrics.traffic_seen(upstream, o.in_use, o.queued, o.mode as u64, o.limit);
    }

    /// Takes a slot for an allowed request, waiting in the queue if need be (at most
    /// `queue_timeout`, and never past the caller's `deadline`); the decision comes back with
    /// its lease, or turned into a 503 (a 504 `deadline_exceeded` when the caller gave up first).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn take_slot(
        &self,
        policy: &Policy,
        cfg: &TrafficConfig,
        route: &Route,
        mut d: Decision,
        lease: &str,
        mut first: Option<(Admit, UpstreamState)>,
        caller_deadline: Option<std::time::Instant>,
    ) -> Decision {
        let key = &*route.upstream_key;
        let admission = Admission { upstream: key, lease, cfg };
        let started = clock::instant();
        let deadline = tokio::time::Instant::now() + Duration::from_micros(cfg.queue_timeout);
        let notify = self.waiters.of(key);
        let mut returning = false;
        let mut last: traffic::Occupancy;
        let refuse = |mut d: Decision, reason: Reason, retry_after: u64| {
            d.reason = reason;
            d.retry_after = Some(retry_after);
            d
        };
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // the first admission may have come with the plan's store call
            let answer = match first.take() {
                Some(admitted) => Ok(admitted),
                None => self.admit(&admission, returning, caller_deadline).await,
            };
            match answer {
                Err(StoreError::DeadlineExceeded) => {
                    // the call may have been cut after the store granted the slot; the caller is
                    // out of time, so this happens off its path
                    self.leave_later(key, lease);
                    d.reason = Reason::DeadlineExceeded;
                    return d;
                }
                Err(e) => {
                    // waiting in the queue, or granted by a call cut short on its way back: give
                    // it back, off the request's path (the store just failed once already)
                    if returning || matches!(e, StoreError::Timeout(_)) {
                        self.leave_later(key, lease);
                    }
                    return match policy.on_store_error {
                        OnStoreError::Deny => refuse(d, Reason::StoreUnavailable, 1_000_000),
                        OnStoreError::Allow => {
                            d.reason = Reason::AllowedStoreUnavailable;
                            d
                        }
                    };
                }
                Ok((admit, occupied)) => {
                    self.seen(&route.upstream, occupied);
                    match admit {
                        Admit::Granted { probe } => {
                            let waited = if returning { started.elapsed() } else { Duration::ZERO };
                            if returning {
                                self.metrics.queue_wait(&route.upstream, waited);
                            }
                            let prefix = if probe { traffic::PROBE_PREFIX } else { 'l' };
                            d.lease = Some(Lease {
                                upstream: route.upstream.clone(),
                                id: format!("{key}.{prefix}{lease}"),
                                waited: u64::try_from(waited.as_micros()).unwrap_or(u64::MAX),
                            });
                            return d;
                        }
                        Admit::BreakerOpen { retry_after } => return refuse(d, Reason::CircuitOpen, retry_after),
                        Admit::QueueFull(o) => {
                            return refuse(d, Reason::QueueFull, o.retry_after(cfg.concurrency_limit));
                        }
                        Admit::Wait(o) => {
                            returning = true;
                            last = o;
                        }
                    }
                }
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep(RECHECK) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    self.leave(key, lease).await;
                    return refuse(d, Reason::QueueTimeout, last.retry_after(cfg.concurrency_limit));
                }
                _ = sleep_until_caller(caller_deadline) => {
                    self.leave_later(key, lease);
                    d.reason = Reason::DeadlineExceeded;
                    return d;
                }
            }
        }
    }

    /// A request completed: release its lease and, if it held one, count its outcome for the
    /// breaker and wake this instance's waiters. `error`: a 5xx, or the upstream timed out,
    /// reset or could not be reached.
    async fn release(&self, lease_header: &str, error: bool, latency: Duration) -> bool {
        let policy = self.policy();
        let Some(cfg) = &policy.traffic else { return false };
        let Some((key, id)) = parse_lease(lease_header) else {
            self.metrics.completion("unknown");
            return false;
        };
        let Some(upstream) = policy.upstream_by_key(key).cloned() else {
            self.metrics.completion("unknown");
            return false;
        };
        let latency = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        match self.complete_lease(key, id, error, latency, cfg).await {
            Ok((released, occupied)) => {
                self.seen(&upstream, occupied);
                if released {
                    self.metrics.completion("released");
                    self.waiters.freed(key);
                } else {
                    self.metrics.completion("unknown");
                }
                released
            }
            Err(_) => {
                self.metrics.completion("error");
                false
            }
        }
    }

    /// Renews the lease a long request holds (`lease_header`: `<upstream key>.<lease id>`, as
    /// the answer gave it) for another `lease_ttl`: `Some(lease_ttl)` when it was still held;
    /// None when it had expired, been released or never existed, or the policy has no
    /// `traffic`. Errors: the store failed.
    pub async fn renew_lease(&self, lease_header: &str) -> Result<Option<Duration>, StoreError> {
        let policy = self.policy();
        let Some(cfg) = &policy.traffic else { return Ok(None) };
        let Some((key, id)) = parse_lease(lease_header) else { return Ok(None) };
        if policy.upstream_by_key(key).is_none() {
            return Ok(None);
        }
        let held = self.renew(key, id, cfg.lease_ttl).await?;
        Ok(held.then(|| Duration::from_micros(cfg.lease_ttl)))
    }

    /// Everything a finished request teaches (Envoy's access log or the native `Complete`):
    /// its lease released, live monitoring fed, a completion event in the audit trail. True when
    /// a lease was released.
    pub async fn record_completion(&self, c: &Completion<'_>) -> bool {
        let released = match c.lease {
            Some(lease) => self.release(lease, c.upstream_error, c.latency).await,
            None => false,
        };
        if let Some(m) = self.alerts() {
            m.completion(c.upstream_error, c.latency);
        }
        if let Some(audit) = self.audit() {
            audit.record(super::record::completion_event(audit, c));
        }
        released
    }
}

/// A finished request, as a proxy reports it.
#[derive(Debug, Clone, Default)]
pub struct Completion<'a> {
    /// the `x-portcullis-lease` the upstream request carried, if any
    pub lease: Option<&'a str>,
    pub request_id: &'a str,
    /// the status the client got (0: none)
    pub status: u32,
    /// a 5xx, or the upstream timed out, reset or could not be reached
    pub upstream_error: bool,
    /// how long the upstream took
    pub latency: Duration,
    /// the whole request, in milliseconds (the audit event's processing_time)
    pub total_ms: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_headers_are_parsed_strictly() {
        let key = "0123456789abcdef";
        let id = format!("l{}", "a".repeat(32));
        let header = format!("{key}.{id}");
        assert_eq!(parse_lease(&header), Some((key, id.as_str())));
        for bad in [
            String::new(),
            key.to_owned(),
            format!("{key}.x{}", "a".repeat(32)),
            format!("{key}.l{}", "a".repeat(31)),
            format!("pc:{{up:x}}.{id}"),
            format!("{key}.l{}z", "a".repeat(31)),
        ] {
            assert_eq!(parse_lease(&bad), None, "{bad:?}");
        }
        assert_eq!(new_lease_id().len(), 32);
        assert_ne!(new_lease_id(), new_lease_id());
        // across several refills of the thread's pool (256 ids each), every id is new
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_lease_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}
