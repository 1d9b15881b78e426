-- common.lua: put before apply.lua, traffic.lua, settle.lua and admin.lua (store/redis/scripts.rs
-- concatenates them), so the scripts read the clock, and read, roll and write quota states, the
-- same way, and compute the sliding weight with one function: quota::weighted in decision-core,
-- mirrored here exactly. A state travels as three numbers, never as a table: every table a
-- script builds is garbage Redis's Lua collects, and a decision is one script call.

local SCALE = 100000
-- math's functions as locals (a global lookup each use otherwise), named apart from the names
-- the scripts after this one use for their own values (traffic.lua has a local `max`)
local math_floor, math_ceil, math_max, math_min = math.floor, math.ceil, math.max, math.min

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
  local wms = math_max(math_floor(window / 1000), 1)
  local ems = math_min(math_floor(elapsed / 1000), wms)
  local weight = math_floor((wms - ems) * SCALE / wms)
  return math_ceil(prev * weight / SCALE)
end

-- A quota state as apply.lua stores it: "tat" (a bucket), "until" (a flag) or "start prev cur"
-- (a window), read as a, b, c (b and c 0 for one number); nil when absent or unreadable.
local function read_state(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  local a, b, c = string.match(v, '^(%d+) ?(%d*) ?(%d*)$')
  if not a then return nil end
  return tonumber(a), tonumber(b) or 0, tonumber(c) or 0
end

-- Stores a state of `kind` ("b", "k": one number, a; "s", "f": three, a b c) until `expires` (in
-- microseconds, by the script's clock); a test's clock is not the one Redis expires keys by,
-- so under one a key lives at least a minute.
local function write_state(key, kind, a, b, c, expires, now, test_clock)
  local v
  if kind == 'b' or kind == 'k' then v = string.format('%d', a)
  else v = string.format('%d %d %d', a, b, c) end
  local ttl = math_max(math_ceil((expires - now) / 1000), 1)
  if test_clock then ttl = math_max(ttl, 60000) end
  redis.call('SET', key, v, 'PX', ttl)
end

-- A sliding window's state (a, b, c as read_state gives it, or nil) moved to the window `now`
-- falls in (window `w`): the same window, the next one (the current count becomes the
-- previous), a state from the future (a clock behind the one that wrote it) kept as it is, or
-- anything older forgotten. Returns start, prev, cur.
local function roll(a, b, c, w, now)
  local aligned = now - now % w
  if a then
    if a == aligned then return a, b, c
    elseif a + w == aligned then return aligned, c, 0
    elseif a > aligned then return a, b, c end
  end
  return aligned, 0, 0
end
