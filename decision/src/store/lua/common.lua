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

-- Corrects the counter `key` (kind "b", "s" or "f"; `b` its interval or window) by `delta`
-- units, for an amount counted at `at`: decision-core's quota::settle, mirrored exactly. An
-- overrun (delta > 0) is counted now even past the limit; a refund goes back to the window the
-- amount was counted in, never below zero (nor a bucket past full), and nothing once that
-- window is gone.
local function correct(key, kind, b, at, delta, now, test_clock)
  local more = math.abs(delta)
  local st = read_state(key)
  local nxt, expires
  if kind == 'b' then
    local tat = st and st[1] or now
    -- at most 2^52 microseconds at once (quota::LUA_EXACT), where doubles are still exact
    if delta > 0 then nxt = math.max(tat, now) + math.min(more, math.floor(4503599627370496 / b)) * b
    elseif tat > now then nxt = math.max(tat - more * b, now) end
    if nxt then nxt, expires = { nxt, 0, 0 }, nxt end
  elseif kind == 's' then
    local start, prev, cur = roll(st, b, now)
    local counted = at - at % b
    if delta > 0 then nxt = { start, prev, cur + more }
    elseif counted == start then nxt = { start, prev, math.max(cur - more, 0) }
    elseif counted + b == start then nxt = { start, math.max(prev - more, 0), cur } end
    expires = start + 2 * b
  elseif kind == 'f' then
    local start = now - now % b
    local cur = 0
    if st and st[1] >= start then cur = st[3] end
    if delta > 0 then nxt = { start, 0, cur + more }
    elseif at - at % b == start then nxt = { start, 0, math.max(cur - more, 0) } end
    expires = start + b
  end
  if nxt then write_state(key, kind, nxt, expires, now, test_clock) end
end

-- What an admin change announces, so that every instance forgets the refusals its over-limit
-- cache remembers (store/redis/mod.rs subscribes).
local CHANGED_CHANNEL = 'pc:changed'

-- Gives `amount` units of the counter `key` back now (the admin API's grant):
-- decision-core's quota::grant, mirrored exactly. A bucket refilled (never past full); a
-- window's count lowered from the current window first, then the previous one, never below
-- zero.
local function grant(key, kind, b, amount, now, test_clock)
  local st = read_state(key)
  if not st then return end
  local nxt, expires
  if kind == 'b' then
    if st[1] > now then
      nxt = { math.max(st[1] - amount * b, now), 0, 0 }
      expires = nxt[1]
    end
  elseif kind == 's' then
    local aligned = now - now % b
    if st[1] == aligned or st[1] + b == aligned or st[1] > aligned then
      local start, prev, cur = roll(st, b, now)
      local from_cur = math.min(amount, cur)
      local from_prev = math.min(amount - from_cur, prev)
      nxt, expires = { start, prev - from_prev, cur - from_cur }, start + 2 * b
    end
  elseif kind == 'f' then
    local start = now - now % b
    if st[1] >= start then
      nxt, expires = { start, 0, math.max(st[3] - amount, 0) }, start + b
    end
  end
  if nxt then write_state(key, kind, nxt, expires, now, test_clock) end
end
