//! Quota math over a state and a time passed in; no clock, no I/O.
//!
//! - Token bucket as GCRA (the generic cell rate algorithm, ITU-T I.371, as in the `governor`
//!   crate and in Redis-cell): one number per key, the theoretical arrival time (TAT). A bucket
//!   of `burst` tokens refilled one token per `interval` allows a request of cost n at `now` when
//!   `max(TAT, now) + n * interval - now <= burst * interval`, and then moves TAT there.
//! - Sliding-window counter (the weighted previous and current fixed windows, as Cloudflare
//!   describes it): the count in the last window is estimated as
//!   `prev * (window - elapsed) / window + cur`; a request fits when that estimate plus its cost
//!   stays within the limit. Unlike a fixed window, no client gets twice the limit across an edge.
//!
//! `check` never mutates: it returns the verdict and the state to store if the whole plan is
//! allowed, so a store can keep plans all-or-nothing (a denied request consumes nothing).

use crate::units::Micros;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `burst` tokens, one more every `interval` microseconds.
    TokenBucket { burst: u64, interval: Micros },
    /// at most `limit` in any `window` (estimated from two fixed windows).
    SlidingWindow { limit: u64, window: Micros },
    /// at most `limit` per aligned `window` (envoyproxy/ratelimit's behaviour, for those who
    /// want it: a client can get twice the limit across a window edge).
    FixedWindow { limit: u64, window: Micros },
    /// A flag that stays up for `duration` once raised (an IP block). Cost 0 checks it and
    /// changes nothing: refused while it is up. Cost 1 or more raises it from now, always allowed.
    Flag { duration: Micros },
}

impl Limit {
    /// A bucket that refills `per_period` tokens every `period` and holds at most `burst`.
    /// The interval is rounded up, so the refill never runs faster than configured.
    pub fn token_bucket(per_period: u64, period: Micros, burst: u64) -> Limit {
        let per_period = per_period.max(1);
        Limit::TokenBucket { burst, interval: period.div_ceil(per_period).max(1) }
    }

    /// The quota a client sees (`q` of the RateLimit headers).
    pub fn quota(&self) -> u64 {
        match *self {
            Limit::TokenBucket { burst, .. } => burst,
            Limit::SlidingWindow { limit, .. } | Limit::FixedWindow { limit, .. } => limit,
            Limit::Flag { .. } => 0,
        }
    }

    /// This limit shared among `instances` that cannot coordinate (the Redis store's
    /// `local_share` degraded mode): each enforces its share, at least one.
    pub fn share(&self, instances: u64) -> Limit {
        let n = instances.max(1);
        match *self {
            Limit::TokenBucket { burst, interval } => {
                Limit::TokenBucket { burst: (burst / n).max(1), interval: interval.saturating_mul(n) }
            }
            Limit::SlidingWindow { limit, window } => Limit::SlidingWindow { limit: (limit / n).max(1), window },
            Limit::FixedWindow { limit, window } => Limit::FixedWindow { limit: (limit / n).max(1), window },
            Limit::Flag { duration } => Limit::Flag { duration },
        }
    }

    /// The window a client sees (`w`): the time to refill an empty bucket, or the window.
    pub fn window(&self) -> Micros {
        match *self {
            Limit::TokenBucket { burst, interval } => burst.saturating_mul(interval),
            Limit::SlidingWindow { window, .. } | Limit::FixedWindow { window, .. } => window,
            Limit::Flag { duration } => duration,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Bucket { tat: Micros },
    Window { start: Micros, prev: u64, cur: u64 },
}

/// The answer for one operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// what is left after this request (if allowed) or now (if denied)
    pub remaining: u64,
    /// time until the quota is whole again (bucket full / current window over)
    pub reset: Micros,
    /// time until a request of the same cost would fit (0 when allowed)
    pub retry_after: Micros,
}

/// The result of checking one operation: the verdict, and the state to store (with the time it
/// may expire) if the plan it belongs to commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    pub verdict: Verdict,
    pub next: State,
    pub expires_at: Micros,
}

pub fn check(limit: Limit, state: Option<State>, cost: u64, now: Micros) -> Checked {
    match limit {
        Limit::TokenBucket { burst, interval } => bucket(burst, interval, state, cost, now),
        Limit::SlidingWindow { limit, window } => sliding(limit, window, state, cost, now),
        Limit::FixedWindow { limit, window } => fixed(limit, window, state, cost, now),
        Limit::Flag { duration } => flag(duration, state, cost, now),
    }
}

/// A reservation settled: the state `check` stored for a plan that counted an estimate at
/// `reserved_at`, corrected at `now` by `delta`, the actual cost minus the estimate.
///
/// - An overrun (`delta > 0`) is counted now, even past the limit: the work is done, and the
///   next request is refused until the quota has room again.
/// - A refund (`delta < 0`) gives back to the window the estimate was counted in (the previous
///   window of a sliding counter once it has rolled, nothing once that is gone too), and never
///   takes a count below zero, nor a token bucket past full.
///
/// Returns the state to store and when it may expire; None when nothing changes (a refund
/// whose window has passed, or a zero delta). A flag is never settled.
pub fn settle(
    limit: Limit,
    state: Option<State>,
    reserved_at: Micros,
    delta: i64,
    now: Micros,
) -> Option<(State, Micros)> {
    let more = delta.unsigned_abs();
    if delta == 0 {
        return None;
    }
    match limit {
        Limit::TokenBucket { interval, .. } => {
            let tat = match state {
                Some(State::Bucket { tat }) => tat,
                _ => now,
            };
            let next = if delta > 0 {
                // at most 2^52 microseconds at once, so that Lua's doubles compute it exactly
                let more = more.min(LUA_EXACT / interval.max(1));
                tat.max(now).saturating_add(more.saturating_mul(interval))
            } else if tat > now {
                tat.saturating_sub(more.saturating_mul(interval)).max(now)
            } else {
                return None;
            };
            Some((State::Bucket { tat: next }, next))
        }
        Limit::SlidingWindow { window, .. } => {
            let window = window.max(1);
            let (start, mut prev, mut cur) = roll(state, window, now);
            let counted_in = reserved_at - reserved_at % window;
            if delta > 0 {
                cur = cur.saturating_add(more);
            } else if counted_in == start {
                cur = cur.saturating_sub(more);
            } else if counted_in.saturating_add(window) == start {
                prev = prev.saturating_sub(more);
            } else {
                return None;
            }
            Some((State::Window { start, prev, cur }, start + 2 * window))
        }
        Limit::FixedWindow { window, .. } => {
            let window = window.max(1);
            let start = now - now % window;
            let mut cur = match state {
                Some(State::Window { start: s, cur, .. }) if s >= start => cur,
                _ => 0,
            };
            if delta > 0 {
                cur = cur.saturating_add(more);
            } else if reserved_at - reserved_at % window == start {
                cur = cur.saturating_sub(more);
            } else {
                return None;
            }
            Some((State::Window { start, prev: 0, cur }, start + window))
        }
        Limit::Flag { .. } => None,
    }
}

/// The largest amount of time settle and grant move a bucket by at once: 2^52 microseconds
/// (142 years), below which the Redis scripts' doubles are exact.
pub const LUA_EXACT: u64 = 1 << 52;

/// Units given back to a limit now (the admin API's grant): a bucket refilled by `amount`
/// tokens (never past full); a window's count lowered by `amount`, from the current window
/// first and then from the previous one (a sliding window's estimate weighs it), never below
/// zero. None when nothing changes.
pub fn grant(limit: Limit, state: Option<State>, amount: u64, now: Micros) -> Option<(State, Micros)> {
    if amount == 0 {
        return None;
    }
    match limit {
        Limit::TokenBucket { interval, .. } => match state {
            Some(State::Bucket { tat }) if tat > now => {
                let next = tat.saturating_sub(amount.saturating_mul(interval)).max(now);
                Some((State::Bucket { tat: next }, next))
            }
            _ => None,
        },
        Limit::SlidingWindow { window, .. } => {
            let window = window.max(1);
            let (start, prev, cur) = roll(state, window, now);
            if prev == 0 && cur == 0 {
                return None;
            }
            let from_cur = amount.min(cur);
            let from_prev = (amount - from_cur).min(prev);
            Some((State::Window { start, prev: prev - from_prev, cur: cur - from_cur }, start + 2 * window))
        }
        Limit::FixedWindow { window, .. } => {
            let window = window.max(1);
            let start = now - now % window;
            match state {
                Some(State::Window { start: s, cur, .. }) if s >= start => {
                    Some((State::Window { start, prev: 0, cur: cur.saturating_sub(amount) }, start + window))
                }
                _ => None,
            }
        }
        Limit::Flag { .. } => None,
    }
}

/// The flag's state is the instant it comes down (a `Bucket` state holds one instant).
fn flag(duration: Micros, state: Option<State>, cost: u64, now: Micros) -> Checked {
    let until = match state {
        Some(State::Bucket { tat }) => tat,
        _ => 0,
    };
    if cost == 0 {
        let up = until > now;
        let wait = until.saturating_sub(now);
        return Checked {
            verdict: Verdict { allowed: !up, remaining: u64::from(!up), reset: wait, retry_after: wait },
            next: State::Bucket { tat: until },
            expires_at: until,
        };
    }
    let until = until.max(now.saturating_add(duration));
    Checked {
        verdict: Verdict { allowed: true, remaining: 0, reset: until - now, retry_after: 0 },
        next: State::Bucket { tat: until },
        expires_at: until,
    }
}

fn fixed(limit: u64, window: Micros, state: Option<State>, cost: u64, now: Micros) -> Checked {
    let window = window.max(1);
    let start = now - now % window;
    let cur = match state {
        Some(State::Window { start: s, cur, .. }) if s >= start => cur,
        _ => 0,
    };
    let reset = start + window - now;
    if cur.saturating_add(cost) <= limit {
        Checked {
            verdict: Verdict { allowed: true, remaining: limit - cur - cost, reset, retry_after: 0 },
            next: State::Window { start, prev: 0, cur: cur + cost },
            expires_at: start + window,
        }
    } else {
        Checked {
            verdict: Verdict {
                allowed: false,
                remaining: limit.saturating_sub(cur),
                reset,
                retry_after: if cost > limit { reset + window } else { reset },
            },
            next: state.unwrap_or(State::Window { start, prev: 0, cur }),
            expires_at: start + window,
        }
    }
}

fn bucket(burst: u64, interval: Micros, state: Option<State>, cost: u64, now: Micros) -> Checked {
    let stored = match state {
        Some(State::Bucket { tat }) => tat,
        _ => now,
    };
    let tat = stored.max(now);
    let tau = burst.saturating_mul(interval);
    let new_tat = tat.saturating_add(cost.saturating_mul(interval));
    if new_tat - now <= tau {
        Checked {
            verdict: Verdict {
                allowed: true,
                remaining: (tau - (new_tat - now)) / interval,
                reset: new_tat - now,
                retry_after: 0,
            },
            next: State::Bucket { tat: new_tat },
            expires_at: new_tat,
        }
    } else {
        Checked {
            verdict: Verdict {
                allowed: false,
                remaining: tau.saturating_sub(tat - now) / interval,
                reset: tat - now,
                retry_after: (new_tat - now) - tau,
            },
            next: State::Bucket { tat: stored },
            expires_at: stored,
        }
    }
}

/// The previous window's weight is counted in these units (1e-5 of a window).
pub const WEIGHT_SCALE: u64 = 100_000;

/// `prev * (window - elapsed) / window`, rounded up so the estimate never under-counts.
///
/// Computed in milliseconds with the weight in units of 1e-5, so that every intermediate value
/// stays below 2^53 for windows up to a year and counts up to 9e10: the Redis store's Lua script
/// (whose numbers are doubles) computes exactly the same integer.
pub fn weighted(prev: u64, window: Micros, elapsed: Micros) -> u64 {
    let window_ms = (window / 1_000).max(1);
    let elapsed_ms = (elapsed / 1_000).min(window_ms);
    let weight = (window_ms - elapsed_ms) * WEIGHT_SCALE / window_ms;
    let num = u128::from(prev) * u128::from(weight);
    u64::try_from(num.div_ceil(u128::from(WEIGHT_SCALE))).unwrap_or(u64::MAX)
}

/// A sliding window's state moved to the window `now` falls in: the same window, the next one
/// (the current count becomes the previous), a state from the future (a clock behind the one
/// that wrote it) kept as it is, or anything older forgotten. As (start, prev, cur); common.lua's
/// `roll` is its mirror.
fn roll(state: Option<State>, window: Micros, now: Micros) -> (Micros, u64, u64) {
    let aligned = now - now % window;
    match state {
        Some(State::Window { start, prev, cur }) if start == aligned => (start, prev, cur),
        Some(State::Window { start, cur, .. }) if start + window == aligned => (aligned, cur, 0),
        Some(State::Window { start, prev, cur }) if start > aligned => (start, prev, cur),
        _ => (aligned, 0, 0),
    }
}

fn sliding(limit: u64, window: Micros, state: Option<State>, cost: u64, now: Micros) -> Checked {
    let window = window.max(1);
    let (start, prev, cur) = roll(state, window, now);
    let elapsed = now.saturating_sub(start).min(window);
    let estimate = weighted(prev, window, elapsed).saturating_add(cur);
    let reset = window - elapsed;
    if estimate.saturating_add(cost) <= limit {
        let cur = cur + cost;
        Checked {
            verdict: Verdict { allowed: true, remaining: limit - estimate - cost, reset, retry_after: 0 },
            next: State::Window { start, prev, cur },
            expires_at: start + 2 * window,
        }
    } else {
        let retry_after = if cost > limit {
            // can never fit: say "after two windows" rather than never
            2 * window - elapsed
        } else if cur + cost <= limit {
            // wait for the previous window's weight to decay enough
            let room = limit - cur - cost;
            let decay_to = if prev == 0 {
                0
            } else {
                u64::try_from(u128::from(room) * u128::from(window) / u128::from(prev)).unwrap_or(u64::MAX).min(window)
            };
            (window - decay_to).saturating_sub(elapsed).max(1)
        } else {
            // the current window alone is too full: into the next one, until it decays
            let decay_to = u64::try_from(u128::from(limit - cost) * u128::from(window) / u128::from(cur))
                .unwrap_or(u64::MAX)
                .min(window);
            reset + (window - decay_to)
        };
        Checked {
            verdict: Verdict { allowed: false, remaining: limit.saturating_sub(estimate), reset, retry_after },
            next: state.unwrap_or(State::Window { start, prev, cur }),
            expires_at: start + 2 * window,
        }
    }
}

#[cfg(test)]
mod share_tests {
    use super::*;

    #[test]
    fn a_share_is_a_fraction_of_the_limit_and_never_zero() {
        let b = Limit::token_bucket(60, 60_000_000, 100);
        assert_eq!(b.share(3), Limit::TokenBucket { burst: 33, interval: 3_000_000 });
        assert_eq!(
            Limit::SlidingWindow { limit: 10, window: 60 }.share(3),
            Limit::SlidingWindow { limit: 3, window: 60 }
        );
        assert_eq!(Limit::FixedWindow { limit: 2, window: 60 }.share(5), Limit::FixedWindow { limit: 1, window: 60 });
        assert_eq!(Limit::Flag { duration: 9 }.share(4), Limit::Flag { duration: 9 });
        assert_eq!(b.share(0), b.share(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::{MICROS_PER_MINUTE, MICROS_PER_SEC};
    use proptest::prelude::*;

    fn basic() -> Limit {
        Limit::token_bucket(60, MICROS_PER_MINUTE, 100)
    }

    /// Runs requests of cost 1 at the given instants, storing state only when allowed.
    fn run(limit: Limit, times: &[Micros]) -> Vec<bool> {
        let mut state = None;
        times
            .iter()
            .map(|&t| {
                let c = check(limit, state, 1, t);
                if c.verdict.allowed {
                    state = Some(c.next);
                }
                c.verdict.allowed
            })
            .collect()
    }

    #[test]
    fn a_full_bucket_allows_exactly_burst_at_once() {
        let t0 = 1_700_000_000 * MICROS_PER_SEC;
        let allowed = run(basic(), &[t0; 150]);
        assert_eq!(allowed.iter().filter(|a| **a).count(), 100);
        assert!(allowed[..100].iter().all(|a| *a) && !allowed[100]);
    }

    #[test]
    fn an_empty_bucket_refills_one_token_per_interval() {
        let t0 = 1_000 * MICROS_PER_SEC;
        let mut state = None;
        for _ in 0..100 {
            state = Some(check(basic(), state, 1, t0).next);
        }
        let denied = check(basic(), state, 1, t0);
        assert!(!denied.verdict.allowed);
        assert_eq!(denied.verdict.retry_after, MICROS_PER_SEC);
        assert_eq!(denied.verdict.remaining, 0);
        assert_eq!(denied.next, state.expect("state"));
        let later = check(basic(), state, 1, t0 + MICROS_PER_SEC);
        assert!(later.verdict.allowed);
        assert_eq!(later.verdict.remaining, 0);
        assert!(!check(basic(), Some(later.next), 1, t0 + MICROS_PER_SEC).verdict.allowed);
    }

    #[test]
    fn bucket_reports_remaining_and_reset() {
        let c = check(basic(), None, 1, 5 * MICROS_PER_SEC);
        assert_eq!(c.verdict, Verdict { allowed: true, remaining: 99, reset: MICROS_PER_SEC, retry_after: 0 });
        let c = check(basic(), Some(c.next), 10, 5 * MICROS_PER_SEC);
        assert_eq!(c.verdict.remaining, 89);
        assert_eq!(c.verdict.reset, 11 * MICROS_PER_SEC);
    }

    #[test]
    fn window_counts_exactly_to_the_limit_then_denies() {
        let limit = Limit::SlidingWindow { limit: 10, window: MICROS_PER_MINUTE };
        let t0 = 100 * MICROS_PER_MINUTE;
        let allowed = run(limit, &[t0 + 1; 11]);
        assert_eq!(allowed.iter().filter(|a| **a).count(), 10);
        assert!(!allowed[10]);
    }

    #[test]
    fn window_edge_gives_no_double_burst() {
        // 10 requests at the very end of one window: right after the edge the previous window
        // still weighs almost fully, so almost nothing more is allowed.
        let limit = Limit::SlidingWindow { limit: 10, window: MICROS_PER_MINUTE };
        let edge = 100 * MICROS_PER_MINUTE;
        let mut times = vec![edge - 1; 10];
        times.extend(vec![edge + 1; 10]);
        let allowed = run(limit, &times);
        assert_eq!(allowed.iter().filter(|a| **a).count(), 10);
        // half a window later, half of the previous window has decayed
        let mut times2 = times.clone();
        times2.extend(vec![edge + MICROS_PER_MINUTE / 2; 10]);
        let allowed = run(limit, &times2);
        assert_eq!(allowed.iter().filter(|a| **a).count(), 15);
    }

    #[test]
    fn window_retry_after_is_when_the_request_would_fit() {
        let limit = Limit::SlidingWindow { limit: 10, window: MICROS_PER_MINUTE };
        let t0 = 100 * MICROS_PER_MINUTE;
        let mut state = None;
        for _ in 0..10 {
            state = Some(check(limit, state, 1, t0).next);
        }
        let denied = check(limit, state, 1, t0);
        assert!(!denied.verdict.allowed);
        let retry = denied.verdict.retry_after;
        assert!(retry > 0);
        assert!(check(limit, state, 1, t0 + retry).verdict.allowed, "fits after retry_after ({retry} us)");
        assert!(!check(limit, state, 1, t0 + retry - MICROS_PER_SEC).verdict.allowed, "not a second earlier");
    }

    #[test]
    fn fixed_window_resets_at_the_edge() {
        let limit = Limit::FixedWindow { limit: 3, window: MICROS_PER_MINUTE };
        let edge = 100 * MICROS_PER_MINUTE;
        let mut times = vec![edge - 1; 4];
        times.extend(vec![edge; 4]);
        assert_eq!(run(limit, &times), [true, true, true, false, true, true, true, false]);
        let c = check(limit, None, 1, edge - 10);
        assert_eq!(c.verdict.reset, 10);
    }

    #[test]
    fn a_flag_is_checked_without_change_and_raised_for_its_duration() {
        let f = Limit::Flag { duration: 60 * MICROS_PER_SEC };
        let t0 = 1_000 * MICROS_PER_SEC;
        let down = check(f, None, 0, t0);
        assert!(down.verdict.allowed, "no flag: not blocked");
        let raised = check(f, None, 1, t0);
        assert!(raised.verdict.allowed);
        let state = Some(raised.next);
        let up = check(f, state, 0, t0 + 59 * MICROS_PER_SEC);
        assert!(!up.verdict.allowed);
        assert_eq!(up.verdict.retry_after, MICROS_PER_SEC);
        assert_eq!(up.next, raised.next, "a check changes nothing");
        assert!(check(f, state, 0, t0 + 60 * MICROS_PER_SEC).verdict.allowed, "down after its duration");
    }

    #[derive(Debug, Clone)]
    struct Step {
        dt: Micros,
        cost: u64,
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            (prop_oneof![Just(0u64), 0..2_000_000u64, 0..90_000_000u64], prop_oneof![4 => Just(1u64), 1 => 1..5u64])
                .prop_map(|(dt, cost)| Step { dt, cost }),
            1..400,
        )
    }

    /// Applies steps, returning (time, cost) of every allowed request, and checks on the way
    /// that a denied request leaves the state as it was.
    fn apply(limit: Limit, steps: &[Step]) -> Result<Vec<(Micros, u64)>, TestCaseError> {
        let mut now = 1_000_000 * MICROS_PER_SEC;
        let mut state = None;
        let mut allowed = Vec::new();
        for s in steps {
            now += s.dt;
            let c = check(limit, state, s.cost, now);
            if c.verdict.allowed {
                state = Some(c.next);
                allowed.push((now, s.cost));
            } else {
                prop_assert_eq!(c.next, state.unwrap_or(c.next), "a denied request changed the state");
                prop_assert!(c.verdict.retry_after > 0);
            }
        }
        Ok(allowed)
    }

    fn max_in_span(allowed: &[(Micros, u64)], span: Micros) -> u64 {
        let mut best = 0;
        let mut lo = 0;
        let mut sum = 0;
        for hi in 0..allowed.len() {
            sum += allowed[hi].1;
            while allowed[hi].0 - allowed[lo].0 >= span {
                sum -= allowed[lo].1;
                lo += 1;
            }
            best = best.max(sum);
        }
        best
    }

    /// What a limit has used at `now` after `state`: the quota less what a check of cost 1
    /// sees left.
    fn used(limit: Limit, state: Option<State>, now: Micros) -> u64 {
        let v = check(limit, state, 1, now).verdict;
        limit.quota() - if v.allowed { v.remaining + 1 } else { v.remaining }
    }

    #[test]
    fn a_settle_corrects_the_estimate_by_the_actual_cost() {
        let now = 1_000 * MICROS_PER_SEC;
        for limit in [
            Limit::token_bucket(1_000, MICROS_PER_MINUTE, 1_000),
            Limit::SlidingWindow { limit: 1_000, window: MICROS_PER_MINUTE },
            Limit::FixedWindow { limit: 1_000, window: MICROS_PER_MINUTE },
        ] {
            let reserved = check(limit, None, 100, now).next;
            let (refunded, _) = settle(limit, Some(reserved), now, 30 - 100, now).expect("a refund");
            assert_eq!(used(limit, Some(refunded), now), 30, "{limit:?}");
            let (overrun, _) = settle(limit, Some(reserved), now, 300 - 100, now).expect("an overrun");
            assert_eq!(used(limit, Some(overrun), now), 300, "{limit:?}");
            // past the limit: counted all the same, and the next request is refused
            let (over, _) = settle(limit, Some(reserved), now, 1_500 - 100, now).expect("an overrun");
            assert!(!check(limit, Some(over), 1, now).verdict.allowed, "{limit:?}");
            // a refund of more than is counted stops at zero
            let (empty, _) = settle(limit, Some(reserved), now, -5_000, now).expect("a refund");
            assert_eq!(used(limit, Some(empty), now), 0, "{limit:?}");
            assert_eq!(settle(limit, Some(reserved), now, 0, now), None);
        }
        // a fixed window that has passed gives nothing back; a flag is never settled
        let fixed = Limit::FixedWindow { limit: 1_000, window: MICROS_PER_MINUTE };
        let reserved = check(fixed, None, 100, now).next;
        assert_eq!(settle(fixed, Some(reserved), now, -100, now + MICROS_PER_MINUTE), None);
        assert_eq!(settle(Limit::Flag { duration: 9 }, None, now, 5, now), None);
    }

    proptest! {
        #[test]
        fn a_refund_never_takes_a_count_below_zero_nor_gives_more_than_it_took(
            window_s in 1..600u64, cost in 1..1_000u64, actual in 0..1_000u64, wait in 0..1_200u64,
        ) {
            let now = 7_777 * MICROS_PER_SEC;
            let later = now + wait * MICROS_PER_SEC;
            for limit in [
                Limit::token_bucket(100, window_s * MICROS_PER_SEC, 1_000),
                Limit::SlidingWindow { limit: 1_000, window: window_s * MICROS_PER_SEC },
                Limit::FixedWindow { limit: 1_000, window: window_s * MICROS_PER_SEC },
            ] {
                let reserved = Some(check(limit, None, cost, now).next);
                let before = used(limit, reserved, later);
                let delta = i64::try_from(actual).unwrap() - i64::try_from(cost).unwrap();
                let after = match settle(limit, reserved, now, delta, later) {
                    Some((st, _)) => used(limit, Some(st), later),
                    None => before,
                };
                if delta < 0 {
                    prop_assert!(after <= before && before - after <= delta.unsigned_abs(), "{limit:?}");
                } else {
                    prop_assert!(after >= before, "{limit:?}");
                }
            }
        }

        #[test]
        fn bucket_never_allows_more_than_burst_plus_rate_in_any_minute(
            per_minute in 1..2_000u64, burst in 1..3_000u64, steps in steps()
        ) {
            let limit = Limit::token_bucket(per_minute, MICROS_PER_MINUTE, burst);
            let allowed = apply(limit, &steps)?;
            prop_assert!(max_in_span(&allowed, MICROS_PER_MINUTE) <= burst + per_minute);
        }

        #[test]
        fn window_never_allows_more_than_the_limit_in_an_aligned_window_nor_twice_it_in_any_span(
            limit in 1..500u64, steps in steps()
        ) {
            let l = Limit::SlidingWindow { limit, window: MICROS_PER_MINUTE };
            let allowed = apply(l, &steps)?;
            let mut per_window = std::collections::HashMap::new();
            for (t, c) in &allowed {
                *per_window.entry(t / MICROS_PER_MINUTE).or_insert(0) += c;
            }
            prop_assert!(per_window.values().all(|n| *n <= limit));
            prop_assert!(max_in_span(&allowed, MICROS_PER_MINUTE) < 2 * limit.max(1));
        }

        #[test]
        fn a_request_retried_after_retry_after_fits_if_nothing_else_happened(
            per_minute in 1..600u64, burst in 1..200u64, n in 1..400usize, cost in 1..4u64
        ) {
            let limit = Limit::token_bucket(per_minute, MICROS_PER_MINUTE, burst);
            let now = 77 * MICROS_PER_SEC;
            let mut state = None;
            for _ in 0..n {
                let c = check(limit, state, 1, now);
                if c.verdict.allowed { state = Some(c.next); }
            }
            let c = check(limit, state, cost, now);
            if !c.verdict.allowed && cost <= burst {
                prop_assert!(check(limit, state, cost, now + c.verdict.retry_after).verdict.allowed);
            }
        }
    }
}
