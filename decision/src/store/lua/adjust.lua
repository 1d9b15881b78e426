-- adjust.lua: put after common.lua and before settle.lua and admin.lua (store/redis/scripts.rs
-- concatenates them): a counter corrected after the fact (a reservation settled, an admin's
-- adjustment) or given units back (an admin's grant), with decision-core's quota::settle and
-- quota::grant mirrored exactly. Apart from common.lua so that the scripts on the decision path
-- (apply.lua, traffic.lua) do not make these functions on every call.

-- Corrects the counter `key` (kind "b", "s" or "f"; `w` its interval or window) by `delta`
-- units, for an amount counted at `at`: decision-core's quota::settle, mirrored exactly. An
-- overrun (delta > 0) is counted now even past the limit; a refund goes back to the window the
-- amount was counted in, never below zero (nor a bucket past full), and nothing once that
-- window is gone.
local function correct(key, kind, w, at, delta, now, test_clock)
  local more = math.abs(delta)
  local s1, s2, s3 = read_state(key)
  local n1, n2, n3, expires
  if kind == 'b' then
    local tat = s1 or now
    -- at most 2^52 microseconds at once (quota::LUA_EXACT), where doubles are still exact
    if delta > 0 then n1 = math_max(tat, now) + math_min(more, math_floor(4503599627370496 / w)) * w
    elseif tat > now then n1 = math_max(tat - more * w, now) end
    if n1 then n2, n3, expires = 0, 0, n1 end
  elseif kind == 's' then
    local start, prev, cur = roll(s1, s2, s3, w, now)
    local counted = at - at % w
    if delta > 0 then n1, n2, n3 = start, prev, cur + more
    elseif counted == start then n1, n2, n3 = start, prev, math_max(cur - more, 0)
    elseif counted + w == start then n1, n2, n3 = start, math_max(prev - more, 0), cur end
    expires = start + 2 * w
  elseif kind == 'f' then
    local start = now - now % w
    local cur = 0
    if s1 and s1 >= start then cur = s3 end
    if delta > 0 then n1, n2, n3 = start, 0, cur + more
    elseif at - at % w == start then n1, n2, n3 = start, 0, math_max(cur - more, 0) end
    expires = start + w
  end
  if n1 then write_state(key, kind, n1, n2, n3, expires, now, test_clock) end
end

-- What an admin change announces, so that every instance forgets the refusals its over-limit
-- cache remembers (store/redis/mod.rs subscribes).
local CHANGED_CHANNEL = 'pc:changed'

-- Gives `amount` units of the counter `key` back now (the admin API's grant):
-- decision-core's quota::grant, mirrored exactly. A bucket refilled (never past full); a
-- window's count lowered from the current window first, then the previous one, never below
-- zero.
local function grant(key, kind, w, amount, now, test_clock)
  local s1, s2, s3 = read_state(key)
  if not s1 then return end
  local n1, n2, n3, expires
  if kind == 'b' then
    if s1 > now then
      n1, n2, n3 = math_max(s1 - amount * w, now), 0, 0
      expires = n1
    end
  elseif kind == 's' then
    local aligned = now - now % w
    if s1 == aligned or s1 + w == aligned or s1 > aligned then
      local start, prev, cur = roll(s1, s2, s3, w, now)
      local from_cur = math_min(amount, cur)
      local from_prev = math_min(amount - from_cur, prev)
      n1, n2, n3, expires = start, prev - from_prev, cur - from_cur, start + 2 * w
    end
  elseif kind == 'f' then
    local start = now - now % w
    if s1 >= start then
      n1, n2, n3, expires = start, 0, math_max(s3 - amount, 0), start + w
    end
  end
  if n1 then write_state(key, kind, n1, n2, n3, expires, now, test_clock) end
end
