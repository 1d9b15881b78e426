-- common.lua: put before apply.lua, traffic.lua and settle.lua (store/redis/scripts.rs
-- concatenates them), so the scripts read the clock, and read, roll and write quota states, the
-- same way, and compute the sliding weight with one function: quota::weighted in decision-core,
-- mirrored here exactly.

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


-- A quota state as apply.lua stores it: "tat" (a bucket), "until" (a flag) or "start prev cur"
-- (a window), read as { a, b, c }; false when absent or unreadable.
local function read_state(key)
  local v = redis.call('GET', key)
  if not v then return false end
  local a, b, c = string.match(v, '^(%d+) ?(%d*) ?(%d*)$')
  if not a then return false end
  return { tonumber(a), tonumber(b) or 0, tonumber(c) or 0 }
end

-- Stores a state of `kind` ("b", "k": one number; "s", "f": three) until `expires` (in
-- microseconds, by the script's clock); a test's clock is not the one Redis expires keys by,
-- so under one a key lives at least a minute.
local function write_state(key, kind, st, expires, now, test_clock)
  local v
  if kind == 'b' or kind == 'k' then v = string.format('%d', st[1])
  else v = string.format('%d %d %d', st[1], st[2], st[3]) end
  local ttl = math.max(math.ceil((expires - now) / 1000), 1)
  if test_clock then ttl = math.max(ttl, 60000) end
  redis.call('SET', key, v, 'PX', ttl)
end

-- A sliding window's state moved to the window `now` falls in (window `b`): the same window,
-- the next one (the current count becomes the previous), a state from the future (a clock
-- behind the one that wrote it) kept as it is, or anything older forgotten.
local function roll(st, b, now)
  local aligned = now - now % b
  if st then
    if st[1] == aligned then return st[1], st[2], st[3]
    elseif st[1] + b == aligned then return aligned, st[3], 0
    elseif st[1] > aligned then return st[1], st[2], st[3] end
  end
  return aligned, 0, 0
end
