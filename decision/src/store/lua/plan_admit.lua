-- plan_admit.lua: a request's quota plan and, when the plan commits, its admission to one
-- upstream's concurrency slots, in one script call: one round trip for a request under
-- `traffic`. store/redis.rs loads it after common.lua, apply.lua and traffic.lua, the last two
-- wrapped as the functions apply_plan(KEYS, ARGV) and traffic(KEYS, ARGV), so each keeps its
-- own KEYS and ARGV and its header stays true.
--
-- KEYS      the plan's keys (apply.lua's KEYS), then the upstream's slots, queue and breaker
--           (traffic.lua's KEYS)
-- ARGV[1]   n: how many of KEYS are the plan's
-- ARGV[2]   m: how many of the ARGV after these two are the plan's (apply.lua's ARGV)
-- ARGV[3 .. 2 + m]   apply.lua's ARGV
-- ARGV[3 + m ..]     traffic.lua's ARGV for "admit"
-- Returns   apply.lua's reply; when the plan committed, followed by traffic.lua's admit reply
--
-- Why one script: a request under `traffic` would otherwise pay a second round trip for its
-- slot. Both halves run on the keys they always ran on, so a plan refused takes no slot, and an
-- admission is exactly the one traffic.lua makes. A Redis Cluster keeps the two calls: the
-- upstream's keys carry their own hash tag.

local n, m = tonumber(ARGV[1]), tonumber(ARGV[2])
local plan_keys, plan_args, up_keys, up_args = {}, {}, {}, {}
for i = 1, #KEYS do
  if i <= n then plan_keys[#plan_keys + 1] = KEYS[i] else up_keys[#up_keys + 1] = KEYS[i] end
end
for i = 3, #ARGV do
  if i <= 2 + m then plan_args[#plan_args + 1] = ARGV[i] else up_args[#up_args + 1] = ARGV[i] end
end
local out = apply_plan(plan_keys, plan_args)
if out[2] == 1 then
  for _, v in ipairs(traffic(up_keys, up_args)) do out[#out + 1] = v end
end
return out
