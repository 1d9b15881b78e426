//! Traffic-spike control per upstream, as pure functions over the small states a store keeps:
//! concurrency slots held as leases (a lease id and an expiry, so a proxy that dies leaks
//! nothing), a FIFO queue of waiters, and a circuit breaker fed by completions.
//!
//! The stores hold the state and apply these rules atomically (the memory store under a lock,
//! the Redis store in `lua/traffic.lua`, which mirrors this file line for line); the
//! conformance suite runs the same scenarios on both.

use crate::quota::weighted;
use crate::units::Micros;

/// Error thresholds are in basis points (`50%` = 5,000), as `units::parse_percent` reads them.
pub const BASIS: u64 = 10_000;
/// A probe lease's id starts with this (a half-open breaker's one trial request).
pub const PROBE_PREFIX: char = 'p';

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// open at this share of errors (basis points) ...
    pub error_threshold: u64,
    /// ... among at least this many completions ...
    pub min_requests: u64,
    /// ... in this sliding window
    pub window: Micros,
    /// open this long, then half-open
    pub reset_timeout: Micros,
}

/// Adaptive concurrency (`traffic.adaptive`): every `interval`, an upstream whose completions in
/// that interval had too many errors or a p99 latency above `latency` (more than 1% of them
/// slower) gets its effective limit cut by `decrease`; a healthy one gets `increase` slots back,
/// up to `concurrency_limit`, never below `min_limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdaptiveConfig {
    pub min_limit: u64,
    /// the share of the limit kept on a decrease, in basis points (`50%` = 5,000)
    pub decrease: u64,
    pub increase: u64,
    pub interval: Micros,
    /// error share (basis points) above which the upstream is unhealthy
    pub error_rate: u64,
    /// p99 latency above which the upstream is unhealthy
    pub latency: Micros,
}

/// One upstream's effective limit and the completions of the interval being measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AdaptiveState {
    /// the effective limit (0: not set yet, the configured limit)
    pub limit: u64,
    /// the current interval's start
    pub since: Micros,
    pub total: u64,
    pub errors: u64,
    pub slow: u64,
}

impl AdaptiveState {
    /// The limit in force.
    pub fn effective(&self, max: u64) -> u64 {
        if self.limit == 0 { max } else { self.limit.min(max) }
    }

    /// After a completion: counted in its interval; an interval that is over decides a step.
    pub fn record(&self, cfg: &AdaptiveConfig, max: u64, error: bool, latency: Micros, now: Micros) -> AdaptiveState {
        let mut next = *self;
        if next.since == 0 {
            next.since = now;
        }
        if now >= next.since + cfg.interval {
            let current = next.effective(max);
            let unhealthy =
                next.total > 0 && (next.errors * BASIS > cfg.error_rate * next.total || next.slow * 100 > next.total);
            next.limit = if unhealthy {
                (current * cfg.decrease / BASIS).max(cfg.min_limit).min(max)
            } else {
                (current + cfg.increase).min(max)
            };
            (next.since, next.total, next.errors, next.slow) = (now, 0, 0, 0);
        }
        next.total += 1;
        next.errors += u64::from(error);
        next.slow += u64::from(latency > cfg.latency);
        next
    }
}

/// The reference's traffic-spike settings, compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficConfig {
    /// requests in flight at once, per upstream, fleet-wide
    pub concurrency_limit: u64,
    /// requests waiting beyond the limit; a full queue is a 503
    pub queue_size: u64,
    /// a waiter gives up (503) after this long
    pub queue_timeout: Micros,
    /// a lease whose completion never comes frees its slot after this long
    pub lease_ttl: Micros,
    pub breaker: Option<BreakerConfig>,
    pub adaptive: Option<AdaptiveConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    #[default]
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl Mode {
    pub fn from_code(c: u64) -> Mode {
        match c {
            1 => Mode::Open,
            2 => Mode::HalfOpen,
            _ => Mode::Closed,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Closed => "closed",
            Mode::Open => "open",
            Mode::HalfOpen => "half_open",
        }
    }
}

/// One upstream's breaker: its mode, and completions counted in a sliding window (an aligned
/// current window and the previous one, weighted as the quota windows are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Breaker {
    pub mode: Mode,
    /// open: when it turns half-open; half-open: when the outstanding probe's lease expires
    /// (0: no probe out)
    pub until: Micros,
    /// the current window's start
    pub start: Micros,
    pub total: u64,
    pub errors: u64,
    pub prev_total: u64,
    pub prev_errors: u64,
}

/// Whether a request may go to the upstream, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// pass as the half-open breaker's one probe
    Probe,
    /// open (or half-open with its probe out): 503 at once
    Refuse {
        retry_after: Micros,
    },
}

impl Breaker {
    /// The gate at `now`, and the state to keep if the request is admitted.
    pub fn gate(&self, cfg: &BreakerConfig, lease_ttl: Micros, now: Micros) -> (Gate, Breaker) {
        let mut next = *self;
        match self.mode {
            Mode::Closed => (Gate::Pass, next),
            Mode::Open if now < self.until => (Gate::Refuse { retry_after: self.until - now }, next),
            Mode::HalfOpen if self.until != 0 && now < self.until => {
                (Gate::Refuse { retry_after: (self.until - now).min(cfg.reset_timeout) }, next)
            }
            // open past its reset timeout, or half-open with no probe out: this one probes
            Mode::Open | Mode::HalfOpen => {
                next.mode = Mode::HalfOpen;
                next.until = now + lease_ttl;
                (Gate::Probe, next)
            }
        }
    }

    /// The state after a completion (`error`: a 5xx or a timeout) of an admitted request.
    pub fn record(&self, cfg: &BreakerConfig, error: bool, probe: bool, now: Micros) -> Breaker {
        let mut next = *self;
        match self.mode {
            Mode::HalfOpen if probe => {
                if error {
                    next = Breaker { mode: Mode::Open, until: now + cfg.reset_timeout, ..Breaker::default() };
                } else {
                    next = Breaker::default();
                }
            }
            Mode::Closed => {
                next.roll(cfg.window, now);
                next.total += 1;
                next.errors += u64::from(error);
                let window = cfg.window.max(1);
                let elapsed = now.saturating_sub(next.start);
                let total = weighted(next.prev_total, window, elapsed) + next.total;
                let errors = weighted(next.prev_errors, window, elapsed) + next.errors;
                if error && total >= cfg.min_requests.max(1) && errors * BASIS >= cfg.error_threshold * total {
                    next = Breaker { mode: Mode::Open, until: now + cfg.reset_timeout, ..Breaker::default() };
                }
            }
            // completions of requests admitted before the breaker opened do not move it
            Mode::Open | Mode::HalfOpen => {}
        }
        next
    }

    fn roll(&mut self, window: Micros, now: Micros) {
        let window = window.max(1);
        let aligned = now - now % window;
        if self.start == aligned {
            return;
        }
        if self.start + window == aligned {
            (self.prev_total, self.prev_errors) = (self.total, self.errors);
        } else if self.start < aligned {
            (self.prev_total, self.prev_errors) = (0, 0);
        } else {
            return; // a state from the future (a clock behind the one that wrote it): keep it
        }
        (self.start, self.total, self.errors) = (aligned, 0, 0);
    }
}

/// What an upstream's slots and queue hold at a moment, for the answer to a request that did
/// not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Occupancy {
    pub in_use: u64,
    pub queued: u64,
    /// the recent mean time a lease was held (0: not known yet)
    pub hold: Micros,
}

impl Occupancy {
    /// `Retry-After` for a request refused for a full queue or a timed-out wait: the time the
    /// requests ahead of it need to go through `limit` slots at the recent turnover, at least a
    /// second.
    pub fn retry_after(&self, limit: u64) -> Micros {
        let hold = if self.hold == 0 { 1_000_000 } else { self.hold };
        let ahead = self.queued + 1;
        (ahead.saturating_mul(hold) / limit.max(1)).max(1_000_000)
    }
}

/// The recent mean hold time, after a lease held for `held` (an exponentially weighted mean,
/// 1/8 per sample, as TCP's smoothed RTT).
pub fn mean_hold(previous: Micros, held: Micros) -> Micros {
    if previous == 0 { held } else { previous - previous / 8 + held / 8 }
}

/// An admission: what a request (or a waiter coming back) gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// a slot, held under the lease id given
    Granted { probe: bool },
    /// no slot: queued (a new arrival) or still waiting (a waiter)
    Wait(Occupancy),
    /// no slot and no room in the queue
    QueueFull(Occupancy),
    /// the breaker refuses
    BreakerOpen { retry_after: Micros },
}

/// Lease ids: 16 random bytes in hex, with the probe prefix for a probe (so the store knows at
/// completion what the lease was, without another key).
pub fn lease_id(random: [u8; 16], probe: bool) -> String {
    let hex = crate::encode::hex(&random);
    if probe { format!("{PROBE_PREFIX}{hex}") } else { format!("l{hex}") }
}

pub fn is_probe(lease: &str) -> bool {
    lease.starts_with(PROBE_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Micros = 1_000_000;
    const CFG: BreakerConfig =
        BreakerConfig { error_threshold: 5_000, min_requests: 4, window: 60 * S, reset_timeout: 30 * S };
    const TTL: Micros = 10 * S;

    fn feed(b: Breaker, outcomes: &[bool], now: Micros) -> Breaker {
        outcomes.iter().fold(b, |b, e| b.record(&CFG, *e, false, now))
    }

    #[test]
    fn closed_opens_past_the_threshold_with_enough_requests_only() {
        let t0 = 1_000 * 60 * S;
        // three errors out of three: fewer than min_requests, no verdict
        let b = feed(Breaker::default(), &[true, true, true], t0);
        assert_eq!(b.mode, Mode::Closed);
        // the fourth completion is a success: 3/4 = 75% but the last was no error; the next error opens
        let b = feed(b, &[false], t0);
        assert_eq!(b.mode, Mode::Closed);
        let b = feed(b, &[true], t0 + S);
        assert_eq!((b.mode, b.until), (Mode::Open, t0 + S + CFG.reset_timeout));
        // below the threshold it stays closed
        let b = feed(Breaker::default(), &[false, false, true, false, false, true], t0);
        assert_eq!(b.mode, Mode::Closed);
    }

    #[test]
    fn open_refuses_then_half_open_lets_exactly_one_probe() {
        let t0 = 1_000 * 60 * S;
        let open = feed(Breaker::default(), &[true; 4], t0);
        assert_eq!(open.mode, Mode::Open);
        let (g, _) = open.gate(&CFG, TTL, t0 + 10 * S);
        assert_eq!(g, Gate::Refuse { retry_after: 20 * S });
        let (g, half) = open.gate(&CFG, TTL, t0 + 30 * S);
        assert_eq!((g, half.mode), (Gate::Probe, Mode::HalfOpen));
        // while the probe is out, everyone else is refused
        let (g, _) = half.gate(&CFG, TTL, t0 + 31 * S);
        assert!(matches!(g, Gate::Refuse { .. }), "{g:?}");
        // the probe succeeds: closed, with a fresh window
        let closed = half.record(&CFG, false, true, t0 + 32 * S);
        assert_eq!(closed, Breaker::default());
        assert_eq!(closed.gate(&CFG, TTL, t0 + 32 * S).0, Gate::Pass);
        // the probe fails: open again for reset_timeout
        let reopened = half.record(&CFG, true, true, t0 + 32 * S);
        assert_eq!((reopened.mode, reopened.until), (Mode::Open, t0 + 62 * S));
        // a probe whose completion never comes: after its lease expires, another probe goes
        let (g, _) = half.gate(&CFG, TTL, t0 + 30 * S + TTL);
        assert_eq!(g, Gate::Probe);
        // a late non-probe completion does not move a half-open breaker
        assert_eq!(half.record(&CFG, true, false, t0 + 33 * S), half);
    }

    #[test]
    fn old_completions_leave_the_window() {
        let t0 = 1_000 * 60 * S;
        let b = feed(Breaker::default(), &[true, true, true], t0);
        // two windows later the errors are forgotten: one more error is one of one
        let b = feed(b, &[true], t0 + 120 * S);
        assert_eq!(b.mode, Mode::Closed);
        assert_eq!((b.total, b.prev_total), (1, 0));
        // one window later they still weigh in part
        let b = feed(Breaker::default(), &[true, true, true], t0);
        let b = feed(b, &[true], t0 + 60 * S);
        assert_eq!(b.mode, Mode::Open);
    }

    #[test]
    fn adaptive_limits_decrease_multiplicatively_and_recover_additively() {
        let cfg = AdaptiveConfig {
            min_limit: 10,
            decrease: 5_000,
            increase: 5,
            interval: S,
            error_rate: 500,
            latency: 500_000,
        };
        let t0 = 1_000 * S;
        let step = |a: AdaptiveState, n: u64, errors: u64, slow: u64, at: Micros| {
            (0..n).fold(a, |a, i| a.record(&cfg, 100, i < errors, if i < slow { 600_000 } else { 1_000 }, at))
        };
        // an interval with 10% errors: the next interval starts at half the limit
        let a = step(AdaptiveState::default(), 100, 10, 0, t0);
        assert_eq!(a.effective(100), 100);
        let a = step(a, 100, 10, 0, t0 + S);
        assert_eq!(a.effective(100), 50);
        let a = step(a, 100, 0, 2, t0 + 2 * S); // 2% slower than 500 ms: p99 above it
        assert_eq!(a.effective(100), 25);
        let a = step(a, 100, 0, 0, t0 + 3 * S);
        assert_eq!(a.effective(100), 12, "halved again, from the slow interval");
        let a = step(a, 100, 0, 0, t0 + 4 * S);
        assert_eq!(a.effective(100), 17, "healthy: five slots back");
        // never below min_limit, never above the configured limit
        let mut low = AdaptiveState { limit: 12, since: t0, total: 10, errors: 10, slow: 0 };
        low = low.record(&cfg, 100, true, 0, t0 + S);
        assert_eq!(low.effective(100), 10);
        let mut high = AdaptiveState { limit: 98, since: t0, total: 10, errors: 0, slow: 0 };
        high = high.record(&cfg, 100, false, 0, t0 + S);
        assert_eq!(high.effective(100), 100);
        // 1% slow is not above p99
        let a = step(AdaptiveState { limit: 40, since: t0, ..Default::default() }, 100, 0, 1, t0);
        assert_eq!(a.record(&cfg, 100, false, 0, t0 + S).effective(100), 45);
    }

    #[test]
    fn retry_after_follows_the_turnover() {
        let o = Occupancy { in_use: 2, queued: 3, hold: 2 * S };
        assert_eq!(o.retry_after(2), 4 * S);
        assert_eq!(Occupancy::default().retry_after(1000), S, "at least a second");
        assert_eq!(mean_hold(0, 800), 800);
        assert_eq!(mean_hold(800, 1600), 900);
    }

    #[test]
    fn lease_ids_say_whether_they_probe() {
        let p = lease_id([7; 16], true);
        let l = lease_id([7; 16], false);
        assert!(is_probe(&p) && !is_probe(&l));
        assert_eq!(l.len(), 33);
    }
}
