//! `network`: trusted proxies, zones (CIDR lists) and the reference guide's zone limits.

use decision_core::net::{self, CidrTable};
use decision_core::policy::{self, Network, UNTRUSTED, UNTRUSTED_BIT, Zones};
use decision_core::quota::Limit;
use decision_core::units;

use super::{Validator, raw};

/// The reference guide's zone limits.
pub const DEFAULT_ZONE_LIMIT_TRUSTED: &str = "1000/minute";
pub const DEFAULT_ZONE_LIMIT_UNTRUSTED: &str = "10/minute";

impl Validator<'_> {
    /// Zone names (or `untrusted`) as a mask of zone bits; an unknown name is a problem.
    pub(super) fn zone_mask(&mut self, path: &str, names: &[String], zones: &Zones) -> u64 {
        let mut mask = 0;
        for (j, z) in names.iter().enumerate() {
            if z == UNTRUSTED {
                mask |= UNTRUSTED_BIT;
            } else if let Some(k) = zones.names.iter().position(|n| n == z) {
                mask |= 1 << k;
            } else {
                self.err(
                    format!("{path}[{j}]"),
                    format!("unknown zone {z:?} (known: {}, untrusted)", zones.names.join(", ")),
                );
            }
        }
        mask
    }

    pub(super) fn network(&mut self, n: raw::RawNetwork) -> Network {
        let mut trusted_proxies = CidrTable::default();
        self.cidrs("network.trusted_proxies", &n.trusted_proxies, 1, &mut trusted_proxies);
        let mut deny = CidrTable::default();
        self.cidrs("network.deny", &n.deny, 1, &mut deny);
        let mut zones = Zones::default();
        for (i, (name, nets)) in n.zones.0.iter().enumerate() {
            let path = format!("network.zones.{name}");
            if name == UNTRUSTED {
                self.err(
                    &path,
                    "\"untrusted\" is the name of every address outside the named zones; choose another name",
                );
                continue;
            }
            if i >= 63 {
                self.err(&path, "at most 63 zones");
                continue;
            }
            self.cidrs(&path, nets, 1 << zones.names.len(), &mut zones.table);
            zones.names.push(name.clone());
        }
        let zl = n.zone_limits.unwrap_or_default();
        let trusted = zl.trusted.as_deref().unwrap_or(DEFAULT_ZONE_LIMIT_TRUSTED);
        let untrusted = zl.untrusted.as_deref().unwrap_or(DEFAULT_ZONE_LIMIT_UNTRUSTED);
        let zone_limit_trusted =
            self.parse("network.zone_limits.trusted", units::parse_rate(trusted)).map(policy::zone_limit);
        let zone_limit_untrusted =
            self.parse("network.zone_limits.untrusted", units::parse_rate(untrusted)).map(policy::zone_limit);
        let auto_block = n.auto_block.as_ref().and_then(|ab| {
            if ab.failed_auth == 0 {
                self.err("network.auto_block.failed_auth", "must be at least 1");
            }
            let within = self.parse("network.auto_block.within", units::parse_duration(&ab.within));
            let block_for = self.parse("network.auto_block.block_for", units::parse_duration(&ab.block_for));
            let exempt_zones = self.zone_mask("network.auto_block.exempt_zones", &ab.exempt_zones, &zones);
            Some(policy::AutoBlock {
                failures: Limit::SlidingWindow { limit: ab.failed_auth.saturating_sub(1), window: within?.max(1) },
                block: Limit::Flag { duration: block_for?.max(1) },
                exempt_zones,
            })
        });
        Network { trusted_proxies, deny, zones, zone_limit_trusted, zone_limit_untrusted, auto_block }
    }

    pub(super) fn cidrs(&mut self, path: &str, list: &[String], bits: u64, table: &mut CidrTable) {
        for (i, s) in list.iter().enumerate() {
            if let Some(n) = self.parse(&format!("{path}[{i}]"), net::parse_cidr(s)) {
                table.insert(n, bits);
            }
        }
    }
}
