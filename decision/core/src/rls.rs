//! Envoy's rate limit service (RLS v3) over envoyproxy/ratelimit's configuration format.
//!
//! A domain is a tree of descriptor nodes compiled at load. A request descriptor (a list of
//! key/value entries) is matched level by level as envoyproxy/ratelimit's `GetLimit` does
//! (src/config/config_impl.go): at each level an exact `key`+`value` node wins, then the first
//! declared wildcard entry whose pattern matches `key_value` (`*` anywhere, any number of times,
//! matching any run of bytes), then a key-only node; the limit applies only if the request's last
//! entry lands on a node with a limit. `replaces` drops a named limit when another matched limit
//! of the same request (an `unlimited` one included) replaces it; `unlimited` counts nothing;
//! `shadow_mode` counts and reports but never refuses; `quota_mode` limits refuse the request
//! only when every quota-mode limit of it is over; `share_threshold` makes every value that
//! matches one wildcard entry share one counter. Counting is a sliding-window counter unless a
//! rule asks for `fixed_window`.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::plan::{Op, OpKind};
use crate::quota::{Limit, Verdict};
use crate::units::{MICROS_PER_DAY, MICROS_PER_HOUR, MICROS_PER_MINUTE, MICROS_PER_SEC, Micros};

/// Bounds on a request, so a caller cannot make us hash or allocate without limit.
pub const MAX_DESCRIPTORS: usize = 64;
pub const MAX_ENTRIES: usize = 16;
pub const MAX_ENTRY_BYTES: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    pub const ALL: [Unit; 7] = [Unit::Second, Unit::Minute, Unit::Hour, Unit::Day, Unit::Week, Unit::Month, Unit::Year];

    /// The unit's name in the configuration (case-insensitive, as envoyproxy/ratelimit reads it).
    pub fn parse(s: &str) -> Option<Unit> {
        Unit::ALL.into_iter().find(|u| u.as_str().eq_ignore_ascii_case(s))
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }

    /// The window length (a month is 30 days and a year 365, as envoyproxy/ratelimit counts).
    pub fn micros(self) -> Micros {
        match self {
            Unit::Second => MICROS_PER_SEC,
            Unit::Minute => MICROS_PER_MINUTE,
            Unit::Hour => MICROS_PER_HOUR,
            Unit::Day => MICROS_PER_DAY,
            Unit::Week => 7 * MICROS_PER_DAY,
            Unit::Month => 30 * MICROS_PER_DAY,
            Unit::Year => 365 * MICROS_PER_DAY,
        }
    }
}

/// One configured limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub requests_per_unit: u32,
    /// None when `unlimited`
    pub unit: Option<Unit>,
    pub shadow: bool,
    pub name: Option<Arc<str>>,
    pub replaces: Vec<Arc<str>>,
    pub fixed_window: bool,
    pub detailed_metric: bool,
    /// `quota_mode`: over this limit, the request is refused only if every quota-mode limit of
    /// the request is over too (the descriptor's own status is OVER_LIMIT either way)
    pub quota_mode: bool,
    /// the rule's place in the config (`edge.tier_basic.subject`): a bounded metric label
    pub id: Arc<str>,
}

impl Rule {
    /// An enforced sliding-window rule with no name, replacements or metrics options.
    pub fn new(requests_per_unit: u32, unit: Unit, id: &str) -> Rule {
        Rule {
            requests_per_unit,
            unit: Some(unit),
            shadow: false,
            name: None,
            replaces: Vec::new(),
            fixed_window: false,
            detailed_metric: false,
            quota_mode: false,
            id: Arc::from(id),
        }
    }

    pub fn unlimited(&self) -> bool {
        self.unit.is_none()
    }

    fn limit(&self) -> Option<Limit> {
        let unit = self.unit?;
        let limit = u64::from(self.requests_per_unit);
        Some(if self.fixed_window {
            Limit::FixedWindow { limit, window: unit.micros() }
        } else {
            Limit::SlidingWindow { limit, window: unit.micros() }
        })
    }

    /// The name a client sees in the RateLimit headers.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }
}

/// A wildcard entry: a `key` or `key_value` holding `*`, split at each `*`.
#[derive(Debug, Clone)]
struct Wildcard {
    parts: Vec<String>,
    /// the bytes the parts need between them (a shorter string cannot match)
    fixed: usize,
    node: usize,
}

impl Wildcard {
    fn new(pattern: &str, node: usize) -> Wildcard {
        let parts: Vec<String> = pattern.split('*').map(str::to_owned).collect();
        Wildcard { fixed: parts.iter().map(String::len).sum(), parts, node }
    }

    /// envoyproxy/ratelimit's `wildcardMatch`: `*` matches any run of bytes (none included); the
    /// first and last parts anchor the ends and the middle parts are found left-most first.
    fn matches(&self, s: &str) -> bool {
        let parts = &self.parts;
        let (Some(first), Some(last)) = (parts.first(), parts.last()) else { return false };
        if parts.len() == 1 {
            return first == s;
        }
        if !s.starts_with(first.as_str()) || !s.ends_with(last.as_str()) {
            return false;
        }
        if s.len() < self.fixed {
            return false;
        }
        let mut rest = &s[first.len()..s.len() - last.len()];
        for part in &parts[1..parts.len() - 1] {
            match rest.find(part.as_str()) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

#[derive(Debug, Clone, Default)]
struct Node {
    /// `key` or `key\0value` -> node
    children: HashMap<String, usize>,
    /// wildcard entries, in declaration order
    wildcards: Vec<Wildcard>,
    rule: Option<Rule>,
    /// `share_threshold` on a wildcard node: the value pattern every matching value counts under
    share: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
pub struct Domain {
    pub name: Arc<str>,
    nodes: Vec<Node>,
}

/// The root of a domain's tree.
pub const ROOT: usize = 0;

/// The rule a request descriptor matched, and the entries whose value a `share_threshold`
/// wildcard replaces in the counter key (entry index, value pattern).
#[derive(Debug, Clone)]
pub struct Match<'a> {
    pub rule: &'a Rule,
    pub shared: Shared,
}

impl Domain {
    pub fn new(name: &str) -> Domain {
        Domain { name: Arc::from(name), nodes: vec![Node::default()] }
    }

    /// Adds a descriptor node under `parent`; refuses a second node with the same key and value.
    pub fn add(&mut self, parent: usize, key: &str, value: Option<&str>, rule: Option<Rule>) -> Result<usize, String> {
        self.add_shared(parent, key, value, rule, false)
    }

    /// `add`, with envoyproxy/ratelimit's `share_threshold` (valid only on a wildcard entry).
    pub fn add_shared(
        &mut self,
        parent: usize,
        key: &str,
        value: Option<&str>,
        rule: Option<Rule>,
        share_threshold: bool,
    ) -> Result<usize, String> {
        let id = self.nodes.len();
        let final_key = value.map_or_else(|| key.to_owned(), |v| format!("{key}_{v}"));
        let wildcard = final_key.contains('*');
        if share_threshold && !wildcard {
            return Err(format!(
                "share_threshold can only be used with wildcard values (containing '*'), but found key '{final_key}'"
            ));
        }
        let composite = match value {
            Some(v) => format!("{key}\0{v}"),
            None => key.to_owned(),
        };
        let node = self.nodes.get_mut(parent).ok_or("no such parent")?;
        if node.children.contains_key(&composite) {
            return Err(format!("duplicate descriptor composite key '{final_key}'"));
        }
        // a wildcard node is also reachable by its literal pattern, as in envoyproxy/ratelimit
        node.children.insert(composite, id);
        let share = share_threshold.then(|| Arc::from(value.unwrap_or(key)));
        if wildcard {
            node.wildcards.push(Wildcard::new(&final_key, id));
        }
        self.nodes.push(Node { rule, share, ..Node::default() });
        Ok(id)
    }

    /// The rule for a request descriptor, by envoyproxy/ratelimit's matching rules.
    pub fn lookup(&self, entries: &[(&str, &str)]) -> Option<&Rule> {
        self.lookup_match(entries).map(|m| m.rule)
    }

    /// `lookup`, with the values a `share_threshold` entry replaces in the counter key.
    pub fn lookup_match(&self, entries: &[(&str, &str)]) -> Option<Match<'_>> {
        if entries.is_empty() {
            return None;
        }
        let mut at = ROOT;
        let mut found = None;
        let mut shared = Vec::new();
        let mut exact = String::new();
        let mut joined = String::new();
        for (i, (key, value)) in entries.iter().enumerate() {
            let node = &self.nodes[at];
            exact.clear();
            exact.push_str(key);
            exact.push('\0');
            exact.push_str(value);
            let mut next = node.children.get(&exact).copied();
            if next.is_none() && !node.wildcards.is_empty() {
                joined.clear();
                joined.push_str(key);
                joined.push('_');
                joined.push_str(value);
                if let Some(w) = node.wildcards.iter().find(|w| w.matches(&joined)) {
                    next = Some(w.node);
                    // only a level matched through its wildcard shares (an exact match of the
                    // literal pattern counts under that same value anyway)
                    if let Some(p) = &self.nodes[w.node].share {
                        shared.push((i, p.clone()));
                    }
                }
            }
            let next = next.or_else(|| node.children.get(*key).copied());
            let Some(next) = next else { break };
            if i == entries.len() - 1 {
                found = self.nodes[next].rule.as_ref();
            }
            if self.nodes[next].children.is_empty() {
                break;
            }
            at = next;
        }
        found.map(|rule| Match { rule, shared })
    }

    /// Every rule of the domain (for metrics and checks).
    pub fn rules(&self) -> impl Iterator<Item = &Rule> {
        self.nodes.iter().filter_map(|n| n.rule.as_ref())
    }
}

/// All RLS domains of a policy.
#[derive(Debug, Clone, Default)]
pub struct RlsConfig {
    pub domains: HashMap<String, Domain>,
    /// add the draft-03 `X-RateLimit-*` headers to responses
    pub x_ratelimit_headers: bool,
}

/// One descriptor of a request.
#[derive(Debug, Clone)]
pub struct DescriptorReq<'a> {
    pub entries: Vec<(&'a str, &'a str)>,
    /// the request's own limit (`RateLimitDescriptor.limit`), which replaces the configured one
    pub limit_override: Option<(u32, Unit)>,
    pub hits: u64,
}

/// Why a request could not be read (gRPC INVALID_ARGUMENT).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RlsRequestError(pub String);

/// What happens to each descriptor.
#[derive(Debug, Clone)]
pub enum Slot {
    /// no rule matched
    NoLimit,
    /// the rule says `unlimited`
    Unlimited,
    /// replaced by another rule of this request
    Replaced(Rule),
    /// counted by `ops[op]`
    Counted { op: usize, rule: Rule },
}

#[derive(Debug, Clone)]
pub struct RlsPlan {
    pub domain: Arc<str>,
    pub ops: Vec<Op>,
    pub slots: Vec<Slot>,
}

/// Checks a request's bounds.
pub fn validate(descriptors: &[DescriptorReq<'_>]) -> Result<(), RlsRequestError> {
    if descriptors.len() > MAX_DESCRIPTORS {
        return Err(RlsRequestError(format!("{} descriptors, more than {MAX_DESCRIPTORS}", descriptors.len())));
    }
    for (i, d) in descriptors.iter().enumerate() {
        if d.entries.len() > MAX_ENTRIES {
            return Err(RlsRequestError(format!(
                "descriptor {i} has {} entries, more than {MAX_ENTRIES}",
                d.entries.len()
            )));
        }
        if d.entries.iter().any(|(k, v)| k.len() > MAX_ENTRY_BYTES || v.len() > MAX_ENTRY_BYTES) {
            return Err(RlsRequestError(format!("descriptor {i} has an entry over {MAX_ENTRY_BYTES} bytes")));
        }
    }
    Ok(())
}

/// The entries whose value a `share_threshold` pattern replaces: (entry index, pattern).
type Shared = Vec<(usize, Arc<str>)>;

/// The store key of a descriptor's counter: a fixed-size digest of the domain, the entries and
/// the window, so a client's values cannot make keys long. Every part is length-prefixed, so the
/// encoding is injective: no choice of domain and entries can produce another's key material
/// (a domain ending in bytes that look like an entry, say). `shared` replaces entry values by
/// their `share_threshold` pattern.
fn counter_key(domain: &str, entries: &[(&str, &str)], shared: &[(usize, Arc<str>)], limit: Limit) -> String {
    let mut h = Sha256::new();
    h.update((domain.len() as u64).to_be_bytes());
    h.update(domain.as_bytes());
    h.update((entries.len() as u64).to_be_bytes());
    for (i, (k, v)) in entries.iter().enumerate() {
        let v = shared.iter().find(|(at, _)| *at == i).map_or(*v, |(_, p)| &**p);
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_be_bytes());
        h.update(v.as_bytes());
    }
    let hex = crate::encode::hex(&h.finalize()[..16]);
    let kind = match limit {
        Limit::FixedWindow { .. } => "f",
        _ => "s",
    };
    format!("rl:{{{hex}}}:{kind}{}", limit.window() / MICROS_PER_SEC)
}

/// Plans the counters of a request. An unknown domain matches nothing, request overrides
/// included (every status OK, nothing counted), as envoyproxy/ratelimit answers.
pub fn plan(config: &RlsConfig, domain: &str, descriptors: &[DescriptorReq<'_>]) -> RlsPlan {
    let Some(d) = config.domains.get(domain) else {
        return RlsPlan {
            domain: Arc::from(domain),
            ops: Vec::new(),
            slots: descriptors.iter().map(|_| Slot::NoLimit).collect(),
        };
    };
    // `replaces`: a named limit is dropped when another matched limit of the request (counted
    // or `unlimited`) replaces it; names are gathered from every match first, so replacement
    // does not chain.
    let mut replaced: Vec<Arc<str>> = Vec::new();
    let mut slots: Vec<(Slot, Shared)> = descriptors
        .iter()
        .map(|desc| {
            if let Some((rpu, unit)) = desc.limit_override {
                return (Slot::Counted { op: 0, rule: Rule::new(rpu, unit, "override") }, Vec::new());
            }
            match d.lookup_match(&desc.entries) {
                None => (Slot::NoLimit, Vec::new()),
                Some(m) => {
                    replaced.extend(m.rule.replaces.iter().cloned());
                    if m.rule.unlimited() {
                        (Slot::Unlimited, Vec::new())
                    } else {
                        (Slot::Counted { op: 0, rule: m.rule.clone() }, m.shared)
                    }
                }
            }
        })
        .collect();
    for (slot, _) in &mut slots {
        if let Slot::Counted { rule, .. } = slot
            && rule.name.as_ref().is_some_and(|n| replaced.contains(n))
        {
            *slot = Slot::Replaced(rule.clone());
        }
    }
    // with a single quota-mode limit left, "every quota-mode limit over" is that limit over: it
    // is enforced in the store like any other, so a refused request counts nothing
    let quota_limits = slots
        .iter()
        .filter(|(s, _)| matches!(s, Slot::Counted { rule, .. } if rule.quota_mode && !rule.shadow))
        .count();
    let mut ops = Vec::new();
    for ((slot, shared), desc) in slots.iter_mut().zip(descriptors) {
        if let Slot::Counted { rule, op } = slot {
            let Some(limit) = rule.limit() else { continue };
            *op = ops.len();
            ops.push(Op {
                key: counter_key(domain, &desc.entries, shared, limit),
                limit,
                cost: desc.hits,
                kind: OpKind::Descriptor,
                // a quota-mode limit among several never refuses the plan by itself: `conclude`
                // decides
                shadow: rule.shadow || (rule.quota_mode && quota_limits > 1),
            });
        }
    }
    RlsPlan { domain: d.name.clone(), ops, slots: slots.into_iter().map(|(s, _)| s).collect() }
}

/// The outcome for one descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// no limit applied (no match, unlimited, or replaced)
    Unlimited,
    Ok,
    /// within the limit, at or past 80% of it
    NearLimit,
    OverLimit,
    /// over a shadow-mode limit: reported, not enforced
    ShadowOverLimit,
}

impl Outcome {
    /// The outcome's name (a metric label).
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Unlimited => "unlimited",
            Outcome::Ok => "ok",
            Outcome::NearLimit => "near_limit",
            Outcome::OverLimit => "over_limit",
            Outcome::ShadowOverLimit => "shadow_over_limit",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Status {
    pub outcome: Outcome,
    pub rule: Option<Rule>,
    pub remaining: u64,
    pub reset: Micros,
    pub verdict: Option<Verdict>,
}

#[derive(Debug, Clone)]
pub struct RlsDecision {
    pub domain: Arc<str>,
    pub over_limit: bool,
    pub statuses: Vec<Status>,
    /// the longest wait among the enforced limits that refused
    pub retry_after: Option<Micros>,
}

/// The decision from the store's verdicts (one per op, in order).
pub fn conclude(plan: RlsPlan, verdicts: &[Verdict]) -> RlsDecision {
    let mut over_limit = false;
    let mut retry_after: Option<Micros> = None;
    // quota mode: (limits, of which over, their longest wait)
    let mut quota = (0usize, 0usize, 0);
    let statuses = plan
        .slots
        .into_iter()
        .map(|slot| match slot {
            // As envoyproxy/ratelimit answers: no limit (none matched, or replaced) reports 0
            // remaining, an unlimited one the largest count.
            Slot::NoLimit | Slot::Replaced(_) => {
                Status { outcome: Outcome::Unlimited, rule: None, remaining: 0, reset: 0, verdict: None }
            }
            Slot::Unlimited => Status {
                outcome: Outcome::Unlimited,
                rule: None,
                remaining: u64::from(u32::MAX),
                reset: 0,
                verdict: None,
            },
            Slot::Counted { op, rule } => {
                let v = verdicts.get(op).copied().unwrap_or(Verdict {
                    allowed: false,
                    remaining: 0,
                    reset: 0,
                    retry_after: 0,
                });
                let limit = u64::from(rule.requests_per_unit);
                if rule.quota_mode && !rule.shadow {
                    quota.0 += 1;
                }
                let outcome = if v.allowed {
                    // near the limit: 80% or more of it used
                    if limit > 0 && (limit - v.remaining.min(limit)) * 5 >= limit * 4 {
                        Outcome::NearLimit
                    } else {
                        Outcome::Ok
                    }
                } else if rule.shadow {
                    Outcome::ShadowOverLimit
                } else if rule.quota_mode {
                    quota.1 += 1;
                    quota.2 = quota.2.max(v.retry_after);
                    Outcome::OverLimit
                } else {
                    over_limit = true;
                    retry_after = Some(retry_after.unwrap_or(0).max(v.retry_after));
                    Outcome::OverLimit
                };
                Status { outcome, rule: Some(rule), remaining: v.remaining, reset: v.reset, verdict: Some(v) }
            }
        })
        .collect();
    // envoyproxy/ratelimit: over iff a plain limit is over, or every quota-mode limit is
    if quota.0 > 0 && quota.0 == quota.1 {
        over_limit = true;
        retry_after = Some(retry_after.unwrap_or(0).max(quota.2));
    }
    RlsDecision { domain: plan.domain, over_limit, statuses, retry_after }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(rpu: u32, unit: Unit, id: &str) -> Rule {
        Rule::new(rpu, unit, id)
    }

    /// The tree of the example `edge.yaml`, plus a wildcard and a nested default.
    fn edge() -> Domain {
        let mut d = Domain::new("edge");
        d.add(ROOT, "remote_address", None, Some(rule(600, Unit::Minute, "remote_address"))).expect("add");
        let basic = d.add(ROOT, "tier", Some("basic"), None).expect("add");
        d.add(basic, "subject", None, Some(rule(60, Unit::Minute, "tier_basic.subject"))).expect("add");
        let ent = d.add(ROOT, "tier", Some("enterprise"), None).expect("add");
        d.add(ent, "subject", None, Some(rule(1000, Unit::Minute, "tier_enterprise.subject"))).expect("add");
        d.add(
            ROOT,
            "path",
            Some("/api/v1/search"),
            Some(Rule { shadow: true, ..rule(5, Unit::Second, "path_search") }),
        )
        .expect("add");
        d.add(ROOT, "path", Some("/health"), Some(Rule { unit: None, ..rule(0, Unit::Second, "path_health") }))
            .expect("add");
        d.add(ROOT, "path", Some("/files/*"), Some(rule(7, Unit::Hour, "path_files"))).expect("add");
        d.add(ROOT, "path", None, Some(rule(100, Unit::Minute, "path"))).expect("add");
        d
    }

    fn check(d: &Domain, entries: &[(&str, &str)], want: Option<&str>) {
        assert_eq!(d.lookup(entries).map(|r| &*r.id), want, "{entries:?}");
    }

    #[test]
    fn descriptors_match_level_by_level_with_the_most_specific_entry() {
        let d = edge();
        check(&d, &[("remote_address", "10.0.0.1")], Some("remote_address"));
        check(&d, &[("tier", "basic"), ("subject", "alice")], Some("tier_basic.subject"));
        check(&d, &[("tier", "enterprise"), ("subject", "bob")], Some("tier_enterprise.subject"));
        // a tier with no node, and a request that stops above the limit's depth
        check(&d, &[("tier", "business"), ("subject", "carol")], None);
        check(&d, &[("tier", "basic")], None);
        // more entries than the config has levels: no limit
        check(&d, &[("remote_address", "10.0.0.1"), ("extra", "x")], None);
        // exact value beats the wildcard, which beats the key-only default
        check(&d, &[("path", "/api/v1/search")], Some("path_search"));
        check(&d, &[("path", "/files/a/b.txt")], Some("path_files"));
        check(&d, &[("path", "/elsewhere")], Some("path"));
        check(&d, &[("nothing", "x")], None);
    }

    #[test]
    fn duplicate_composite_keys_are_refused() {
        let mut d = edge();
        assert_eq!(
            d.add(ROOT, "tier", Some("basic"), None).unwrap_err(),
            "duplicate descriptor composite key 'tier_basic'"
        );
        assert!(d.add(ROOT, "path", Some("/files/*"), None).is_err());
        assert!(d.add(ROOT, "remote_address", None, None).is_err());
    }

    fn req<'a>(entries: &[(&'a str, &'a str)]) -> DescriptorReq<'a> {
        DescriptorReq { entries: entries.to_vec(), limit_override: None, hits: 1 }
    }

    #[test]
    fn plans_count_limited_descriptors_and_skip_the_rest() {
        let config = RlsConfig { domains: [("edge".to_string(), edge())].into(), x_ratelimit_headers: false };
        let p = plan(
            &config,
            "edge",
            &[
                req(&[("path", "/health")]),
                req(&[("tier", "basic"), ("subject", "a")]),
                req(&[("none", "x")]),
                req(&[("path", "/api/v1/search")]),
            ],
        );
        assert_eq!(p.ops.len(), 2);
        assert!(matches!(p.slots[0], Slot::Unlimited));
        assert!(matches!(p.slots[1], Slot::Counted { op: 0, .. }));
        assert!(matches!(p.slots[2], Slot::NoLimit));
        assert!(matches!(p.slots[3], Slot::Counted { op: 1, .. }));
        assert!(p.ops[1].shadow && !p.ops[0].shadow);
        // keys are fixed-size and distinct per descriptor value
        let a = plan(&config, "edge", &[req(&[("tier", "basic"), ("subject", "a")])]).ops[0].key.clone();
        let b = plan(&config, "edge", &[req(&[("tier", "basic"), ("subject", "b")])]).ops[0].key.clone();
        assert_ne!(a, b);
        assert_eq!(a.len(), b.len());
        // unknown domain: nothing is counted
        assert!(plan(&config, "other", &[req(&[("remote_address", "1.2.3.4")])]).ops.is_empty());
    }

    #[test]
    fn replaces_drops_the_named_limit_when_both_apply() {
        let mut d = Domain::new("d");
        d.add(ROOT, "a", None, Some(Rule { name: Some("general".into()), ..rule(10, Unit::Minute, "a") }))
            .expect("add");
        d.add(ROOT, "b", None, Some(Rule { replaces: vec!["general".into()], ..rule(100, Unit::Minute, "b") }))
            .expect("add");
        let config = RlsConfig { domains: [("d".to_string(), d)].into(), x_ratelimit_headers: false };
        let p = plan(&config, "d", &[req(&[("a", "1")]), req(&[("b", "1")])]);
        assert!(matches!(p.slots[0], Slot::Replaced(_)));
        assert_eq!(p.ops.len(), 1);
        let p = plan(&config, "d", &[req(&[("a", "1")])]);
        assert_eq!(p.ops.len(), 1, "without the replacing limit, the named one applies");
    }

    #[test]
    fn the_request_override_replaces_the_configured_limit() {
        let config = RlsConfig { domains: [("edge".to_string(), edge())].into(), x_ratelimit_headers: false };
        let d = DescriptorReq {
            entries: vec![("remote_address", "1.2.3.4")],
            limit_override: Some((3, Unit::Second)),
            hits: 2,
        };
        let p = plan(&config, "edge", &[d]);
        assert_eq!(p.ops[0].limit, Limit::SlidingWindow { limit: 3, window: MICROS_PER_SEC });
        assert_eq!(p.ops[0].cost, 2);
    }

    #[test]
    fn conclusion_reports_each_descriptor_and_enforces_only_real_limits() {
        let config = RlsConfig { domains: [("edge".to_string(), edge())].into(), x_ratelimit_headers: false };
        let p = plan(&config, "edge", &[req(&[("remote_address", "1")]), req(&[("path", "/api/v1/search")])]);
        let ok = Verdict { allowed: true, remaining: 500, reset: 1, retry_after: 0 };
        let shadow_over = Verdict { allowed: false, remaining: 0, reset: 1, retry_after: 5 };
        let d = conclude(p.clone(), &[ok, shadow_over]);
        assert!(!d.over_limit);
        assert_eq!(d.statuses[0].outcome, Outcome::Ok);
        assert_eq!(d.statuses[1].outcome, Outcome::ShadowOverLimit);
        let near = Verdict { allowed: true, remaining: 100, reset: 1, retry_after: 0 };
        assert_eq!(conclude(p.clone(), &[near, ok]).statuses[0].outcome, Outcome::NearLimit);
        let over = Verdict { allowed: false, remaining: 0, reset: 1, retry_after: 7 };
        let d = conclude(p, &[over, ok]);
        assert!(d.over_limit);
        assert_eq!(d.retry_after, Some(7));
    }

    #[test]
    fn request_bounds_are_enforced() {
        let long = "x".repeat(MAX_ENTRY_BYTES + 1);
        assert!(validate(&[req(&[("k", &long)])]).is_err());
        // Envoy sends an empty descriptor when all of its actions were skipped: it matches nothing
        assert!(validate(&[DescriptorReq { entries: vec![], limit_override: None, hits: 1 }]).is_ok());
        let many: Vec<DescriptorReq<'_>> = (0..=MAX_DESCRIPTORS).map(|_| req(&[("k", "v")])).collect();
        assert!(validate(&many).is_err());
        assert!(validate(&[req(&[("k", "v")])]).is_ok());
    }

    fn glob(pattern: &str, s: &str) -> bool {
        Wildcard::new(pattern, 0).matches(s)
    }

    #[test]
    fn wildcards_match_anywhere_as_envoyproxy_ratelimit_does() {
        // its own test table (test/config/wildcard.yaml), and the corners of the algorithm
        for (pattern, s, want) in [
            ("bar*b", "barab", true),
            ("bar*b", "bar123b", true),
            ("bar*b", "barb", true),
            ("bar*b", "bara", false),
            ("bar*b", "xbarb", false),
            ("foo*bar*baz", "foobarbaz", true),
            ("foo*bar*baz", "foo123baz", false),
            ("foo*bar*baz", "foo1bar2bar3baz", true),
            ("path_/api/*/users", "path_/api/v7/users", true),
            ("path_/api/*/users", "path_/api/users", false),
            ("path_/api/*/users", "path_/api/v7/users/1", false),
            ("path_*", "path_", true),
            ("a*a", "a", false),
            ("a**a", "aa", true),
            ("*", "", true),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob(pattern, s), want, "{pattern} ~ {s}");
        }
    }

    #[test]
    fn exact_values_beat_wildcards_which_beat_key_only_entries_first_declared_first() {
        let mut d = Domain::new("d");
        d.add(ROOT, "path", Some("/api/*/users"), Some(rule(1, Unit::Minute, "users"))).expect("add");
        d.add(ROOT, "path", Some("/api/*"), Some(rule(2, Unit::Minute, "api"))).expect("add");
        d.add(ROOT, "path", Some("/api/v1/users"), Some(rule(3, Unit::Minute, "exact"))).expect("add");
        d.add(ROOT, "path", None, Some(rule(4, Unit::Minute, "any"))).expect("add");
        d.add(ROOT, "k*", None, Some(rule(5, Unit::Minute, "k-keys"))).expect("add");
        check(&d, &[("path", "/api/v1/users")], Some("exact"));
        check(&d, &[("path", "/api/v7/users")], Some("users"));
        check(&d, &[("path", "/api/v7/orders")], Some("api"));
        // declared first wins, even when a later pattern is more specific
        check(&d, &[("path", "/api/x/users")], Some("users"));
        check(&d, &[("path", "/other")], Some("any"));
        // the pattern is matched against key_value: a `*` in the key matches keys
        check(&d, &[("kind", "v")], Some("k-keys"));
        check(&d, &[("other", "v")], None);
        // the literal pattern is an exact value too
        check(&d, &[("path", "/api/*")], Some("api"));
        assert!(d.add(ROOT, "path", Some("/api/*"), None).is_err(), "a duplicate pattern");
    }

    fn config_of(d: Domain) -> RlsConfig {
        RlsConfig { domains: [(d.name.to_string(), d)].into(), x_ratelimit_headers: false }
    }

    #[test]
    fn share_threshold_counts_every_matching_value_under_one_key() {
        let mut d = Domain::new("d");
        d.add_shared(ROOT, "files", Some("files/*"), Some(rule(2, Unit::Minute, "files")), true).expect("add");
        d.add(ROOT, "own", Some("own/*"), Some(rule(2, Unit::Minute, "own"))).expect("add");
        let route = d.add_shared(ROOT, "route", Some("/api*v1"), None, true).expect("add");
        d.add(route, "method", None, Some(rule(3, Unit::Minute, "method"))).expect("add");
        let cfg = config_of(d);
        let key = |entries: &[(&str, &str)]| plan(&cfg, "d", &[req(entries)]).ops[0].key.clone();
        assert_eq!(key(&[("files", "files/a.pdf")]), key(&[("files", "files/b.csv")]));
        assert_ne!(key(&[("own", "own/a")]), key(&[("own", "own/b")]), "without share_threshold");
        assert_eq!(key(&[("route", "/api/x/v1"), ("method", "GET")]), key(&[("route", "/apiZv1"), ("method", "GET")]));
        assert_ne!(
            key(&[("route", "/api/x/v1"), ("method", "GET")]),
            key(&[("route", "/api/x/v1"), ("method", "POST")]),
            "a level that does not share keeps its value"
        );
        let mut bad = Domain::new("bad");
        let e = bad.add_shared(ROOT, "path", Some("/exact"), None, true).unwrap_err();
        assert!(e.starts_with("share_threshold can only be used with wildcard values"), "{e}");
    }

    #[test]
    fn a_matched_unlimited_rule_still_replaces() {
        let mut d = Domain::new("d");
        d.add(ROOT, "user", None, Some(Rule { name: Some("per_user".into()), ..rule(1, Unit::Minute, "user") }))
            .expect("add");
        d.add(
            ROOT,
            "plan",
            Some("partner"),
            Some(Rule { unit: None, replaces: vec!["per_user".into()], ..rule(0, Unit::Minute, "partner") }),
        )
        .expect("add");
        let cfg = config_of(d);
        let p = plan(&cfg, "d", &[req(&[("user", "u-b")]), req(&[("plan", "partner")])]);
        assert!(p.ops.is_empty(), "{p:?}");
        assert!(matches!(p.slots[0], Slot::Replaced(_)) && matches!(p.slots[1], Slot::Unlimited));
        assert_eq!(plan(&cfg, "d", &[req(&[("user", "u-b")])]).ops.len(), 1);
    }

    /// Whether any op of the request's plan is counted without refusing it.
    fn p_shadows(cfg: &RlsConfig, descriptors: &[DescriptorReq<'_>]) -> bool {
        plan(cfg, "d", descriptors).ops.iter().any(|o| o.shadow)
    }

    #[test]
    fn quota_mode_limits_refuse_only_when_all_of_them_are_over() {
        let mut d = Domain::new("d");
        d.add(ROOT, "tenant", None, Some(Rule { quota_mode: true, ..rule(1, Unit::Second, "tenant") })).expect("add");
        d.add(ROOT, "project", None, Some(Rule { quota_mode: true, ..rule(1, Unit::Second, "project") })).expect("add");
        d.add(ROOT, "plain", None, Some(rule(1, Unit::Second, "plain"))).expect("add");
        let cfg = config_of(d);
        let p = plan(&cfg, "d", &[req(&[("tenant", "t")]), req(&[("project", "p")])]);
        assert!(p.ops.iter().all(|o| o.shadow), "a quota-mode op never refuses the plan by itself");
        let ok = Verdict { allowed: true, remaining: 0, reset: 1, retry_after: 0 };
        let over = Verdict { allowed: false, remaining: 0, reset: 1, retry_after: 9 };
        let one = conclude(p.clone(), &[over, ok]);
        assert!(!one.over_limit);
        assert_eq!(one.statuses[0].outcome, Outcome::OverLimit, "the descriptor itself is over");
        let both = conclude(p, &[over, over]);
        assert!(both.over_limit);
        assert_eq!(both.retry_after, Some(9));
        let p = plan(&cfg, "d", &[req(&[("tenant", "t")]), req(&[("plain", "x")])]);
        assert!(conclude(p, &[ok, over]).over_limit, "a plain limit over refuses");
        assert!(
            !p_shadows(&cfg, &[req(&[("tenant", "t")]), req(&[("plain", "x")])]),
            "one quota-mode limit is enforced"
        );
        let mut d = Domain::new("d");
        let named = Rule { quota_mode: true, name: Some("tq".into()), ..rule(1, Unit::Second, "tenant") };
        d.add(ROOT, "tenant", None, Some(named)).expect("add");
        d.add(ROOT, "project", None, Some(Rule { quota_mode: true, ..rule(1, Unit::Second, "project") })).expect("add");
        d.add(
            ROOT,
            "swap",
            None,
            Some(Rule { unit: None, replaces: vec!["tq".into()], ..rule(0, Unit::Second, "swap") }),
        )
        .expect("add");
        let cfg = config_of(d);
        let both = [req(&[("tenant", "t")]), req(&[("project", "p")])];
        assert!(p_shadows(&cfg, &both));
        let one_left = [req(&[("tenant", "t")]), req(&[("project", "p")]), req(&[("swap", "s")])];
        assert!(!p_shadows(&cfg, &one_left), "the quota-mode limit a replacement leaves alone is enforced");
    }

    #[test]
    fn counter_keys_are_an_injective_encoding_and_unknown_domains_count_nothing() {
        let cfg = config_of(edge());
        let victim = plan(&cfg, "edge", &[req(&[("remote_address", "203.0.113.5")])]).ops[0].clone();
        // a domain spelled as the victim's domain followed by its entry, length-prefixed as the
        // old encoding hashed it
        let mut forged = String::from("edge");
        for part in ["remote_address", "203.0.113.5"] {
            forged.push_str(&String::from_utf8_lossy(&(part.len() as u64).to_be_bytes()));
            forged.push_str(part);
        }
        let limit = victim.limit;
        assert_ne!(counter_key(&forged, &[], &[], limit), victim.key);
        assert_ne!(counter_key("edgeremote_address", &[("", "203.0.113.5")], &[], limit), victim.key);
        assert_ne!(counter_key("edge", &[("remote_address", "203.0.113.5"), ("", "")], &[], limit), victim.key);
        // an override for a domain no file defines is ignored, as envoyproxy/ratelimit does
        let over = DescriptorReq { entries: vec![], limit_override: Some((600, Unit::Minute)), hits: 551 };
        let p = plan(&cfg, &forged, &[over]);
        assert!(p.ops.is_empty() && matches!(p.slots[0], Slot::NoLimit));
    }

    #[test]
    fn units_parse_by_name() {
        for u in Unit::ALL {
            assert_eq!(Unit::parse(&u.as_str().to_uppercase()), Some(u));
        }
        assert_eq!(Unit::parse("fortnight"), None);
    }
}
