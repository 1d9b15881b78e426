-- settle.lua: settles one reservation (the native API's reserve): the actual cost replaces the
-- estimate in every counter the reservation covers, and the record is gone, in one call.
-- Loaded by store/redis/scripts.rs after common.lua (clock, read_state, write_state, roll).
--
-- KEYS[1]   the reservation's record (apply.lua's "r" operation wrote it)
-- KEYS[2..] the counters it may correct (the subject's tier quotas); a record naming any other
--           key is refused as a script error, and nothing changes
-- ARGV[1]   the time in microseconds, or -1 to read the server's clock (TIME)
-- ARGV[2]   the actual cost
-- Returns   { now, settled (1|0), the estimate (0 when not settled) }; not settled: no such
--           record, it expired (by the script's clock), or it was settled before
--
-- The arithmetic mirrors decision-core's quota::settle exactly: an overrun is counted now even
-- past the limit; a refund goes back to the window the estimate was counted in, never below
-- zero (nor a bucket past full), and nothing once that window is gone.

local now, test_clock = clock(ARGV[1])
local actual = tonumber(ARGV[2])

local rec = redis.call('HGETALL', KEYS[1])
if #rec == 0 then return { now, 0, 0 } end
local f = {}
for i = 1, #rec, 2 do f[rec[i]] = rec[i + 1] end
local at, untl, est, n = tonumber(f['at']), tonumber(f['until']), tonumber(f['cost']), tonumber(f['n'])
if not (at and untl and est and n) then
  return redis.error_reply('reservation record ' .. KEYS[1] .. ' is unreadable')
end

local covered = {}
for j = 1, n do
  local key = f['k' .. j]
  local kind, a, b = string.match(f['l' .. j] or '', '^(%a) (%d+) (%d+)$')
  local declared = false
  for k = 2, #KEYS do
    if KEYS[k] == key then declared = true end
  end
  if not (declared and kind) then
    return redis.error_reply('reservation record ' .. KEYS[1] .. ' names an undeclared key or limit')
  end
  covered[j] = { key, kind, tonumber(b) }
end

redis.call('DEL', KEYS[1])
if untl <= now then return { now, 0, 0 } end

local delta = actual - est
local more = math.abs(delta)
if delta ~= 0 then
  for _, c in ipairs(covered) do
    local key, kind, b = c[1], c[2], c[3]
    local st = read_state(key)
    local nxt, expires
    if kind == 'b' then
      local tat = st and st[1] or now
      if delta > 0 then nxt = math.max(tat, now) + more * b
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
end
return { now, 1, est }
