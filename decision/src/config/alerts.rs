//! `alerts`: the reference guide's monitoring thresholds, compared each second.

use std::time::Duration;

use decision_core::units;

use super::{Validator, raw};

impl Validator<'_> {
    /// `alerts`: the reference's thresholds, compiled.
    pub(super) fn alerts(&mut self, a: &raw::RawAlerts) -> crate::alerts::AlertSettings {
        use crate::alerts::{AlertSettings, Levels};
        let percent = |s: &str| units::parse_percent(s).map(u64::from).map_err(|e| e.to_string());
        let duration = |s: &str| units::parse_duration(s).map_err(|e| e.to_string());
        let size = |s: &str| units::parse_size(s).map_err(|e| e.to_string());
        let error_rate = a.error_rate.as_ref().and_then(|t| self.levels("error_rate", t, &percent));
        let response_time = a.response_time.as_ref().and_then(|t| self.levels("response_time", t, &duration));
        let payload_size = a.payload_size.as_ref().and_then(|t| self.levels("payload_size", t, &size));
        let mut window = Duration::from_secs(60);
        let failed_auth = a.failed_auth.as_ref().and_then(|t| {
            let w = self.parse("alerts.failed_auth.warn", units::parse_rate(&t.warn));
            let c = self.parse("alerts.failed_auth.critical", units::parse_rate(&t.critical));
            let (w, c) = (w?, c?);
            if w.per != c.per {
                self.err(
                    "alerts.failed_auth",
                    "warn and critical must use the same period, e.g. 10/minute and 50/minute",
                );
            }
            if w.count > c.count {
                self.err("alerts.failed_auth", "warn must not be above critical");
            }
            window = Duration::from_micros(w.per);
            Some(Levels { warn: w.count, critical: c.count })
        });
        let block_on_critical = a.failed_auth.as_ref().and_then(|t| t.block).unwrap_or(false);
        let mut webhooks = Vec::new();
        for (i, w) in a.webhooks.iter().enumerate() {
            if let Some(u) = self.parse(&format!("alerts.webhooks[{i}]"), crate::https::Url::parse_web(w)) {
                webhooks.push(u);
            }
        }
        AlertSettings {
            error_rate,
            response_time,
            failed_auth,
            failed_auth_window: window,
            block_on_critical,
            payload_size,
            webhooks,
        }
    }

    /// One alert's warn and critical levels.
    pub(super) fn levels(
        &mut self,
        name: &str,
        t: &raw::RawThreshold,
        parse: &dyn Fn(&str) -> Result<u64, String>,
    ) -> Option<crate::alerts::Levels<u64>> {
        let warn = self.parse(&format!("alerts.{name}.warn"), parse(&t.warn));
        let critical = self.parse(&format!("alerts.{name}.critical"), parse(&t.critical));
        if t.block.is_some() {
            self.err(format!("alerts.{name}.block"), "only failed_auth alerts can block an address");
        }
        let (warn, critical) = (warn?, critical?);
        if warn > critical {
            self.err(format!("alerts.{name}"), "warn must not be above critical");
        }
        Some(crate::alerts::Levels { warn, critical })
    }
}
