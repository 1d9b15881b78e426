-- settle.lua: settles one reservation (the native API's reserve): the actual cost replaces the
-- estimate in every counter the reservation covers, and the record is gone, in one call.
-- Loaded by store/redis/scripts.rs after common.lua (clock) and adjust.lua (correct).
--
-- KEYS[1]   the reservation's record (apply.lua's "r" operation wrote it)
-- KEYS[2..] the counters it may correct (the subject's tier quotas); a record naming any other
--           key is refused as a script error, and nothing changes
-- ARGV[1]   the time in microseconds, or -1 to read the server's clock (TIME)
-- ARGV[2]   the actual cost
-- Returns   { now, settled (1|0), the estimate (0 when not settled) }; not settled: no such
--           record, it expired (by the script's clock), or it was settled before
--
-- The arithmetic (adjust.lua's `correct`) mirrors decision-core's quota::settle exactly.

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
if delta ~= 0 then
  for _, c in ipairs(covered) do correct(c[1], c[2], c[3], at, delta, now, test_clock) end
end
return { now, 1, est }
