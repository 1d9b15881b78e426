//! The Lua scripts a `RedisStore` runs (`store/lua/`), each by EVALSHA and reloaded on NOSCRIPT
//! after a failover or a SCRIPT FLUSH.

use redis::Script;

/// The five scripts, assembled from `store/lua/` at compile time.
pub(super) struct Scripts {
    /// `apply.lua`: one plan (or, on a cluster, one hash slot's part of it)
    pub apply: Script,
    /// `traffic.lua`: an upstream's slots, queue and breaker
    pub traffic: Script,
    /// `plan_admit.lua`: a plan and a new arrival's admission in one call (single node)
    pub plan_admit: Script,
    /// `settle.lua`: a reservation settled with its actual cost
    pub settle: Script,
    /// `admin.lua`: the admin API's counters and blocks index
    pub admin: Script,
}

impl Scripts {
    pub fn new() -> Scripts {
        Scripts {
            apply: Script::new(concat!(include_str!("../lua/common.lua"), include_str!("../lua/apply.lua"))),
            traffic: Script::new(concat!(include_str!("../lua/common.lua"), include_str!("../lua/traffic.lua"))),
            plan_admit: Script::new(concat!(
                include_str!("../lua/common.lua"),
                "local function apply_plan(KEYS, ARGV)\n",
                include_str!("../lua/apply.lua"),
                "\nend\nlocal function traffic(KEYS, ARGV)\n",
                include_str!("../lua/traffic.lua"),
                "\nend\n",
                include_str!("../lua/plan_admit.lua"),
            )),
            settle: Script::new(concat!(
                include_str!("../lua/common.lua"),
                include_str!("../lua/adjust.lua"),
                include_str!("../lua/settle.lua")
            )),
            admin: Script::new(concat!(
                include_str!("../lua/common.lua"),
                include_str!("../lua/adjust.lua"),
                include_str!("../lua/admin.lua")
            )),
        }
    }
}
