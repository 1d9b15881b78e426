-- common.lua: put before apply.lua and before traffic.lua (store/redis.rs concatenates them), so
-- the two scripts read the clock the same way and compute the sliding weight with one function:
-- quota::weighted in decision-core, mirrored here exactly.

local SCALE = 100000

-- The time in microseconds: `arg` when a test passes one (>= 0), else the Redis server's TIME.
-- Returns the time and whether it is a test's.
local function clock(arg)
  local t = tonumber(arg)
  if t >= 0 then return t, true end
  local now = redis.call('TIME')
  return tonumber(now[1]) * 1000000 + tonumber(now[2]), false
end

-- prev * (window - elapsed) / window, rounded up, in milliseconds and units of 1e-5 (every
-- intermediate below 2^53, so doubles compute what Rust's integers do)
local function weighted(prev, window, elapsed)
  local wms = math.max(math.floor(window / 1000), 1)
  local ems = math.min(math.floor(elapsed / 1000), wms)
  local weight = math.floor((wms - ems) * SCALE / wms)
  return math.ceil(prev * weight / SCALE)
end

