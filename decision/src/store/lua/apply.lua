-- apply.lua: applies one plan of quota operations atomically, all-or-nothing over the enforced
-- ones, with the Redis server's clock. Loaded by store/redis.rs with include_str!, after
-- common.lua (clock, weighted), and run by EVALSHA (reloaded on NOSCRIPT).
--
-- KEYS[i]   the counter key of operation i
-- ARGV[1]   the time in microseconds, or -1 to read the server's clock (TIME); only tests pass one
--           (and then keys live at least a minute, since Redis expires them by its own clock)
-- ARGV[2]   1: store the new states when every enforced operation allows; 0: only check (a plan
--           that Redis Cluster splits by slot is checked in every slot before it counts in any)
-- ARGV[3 + 5(i-1) .. 7 + 5(i-1)]   operation i:
--           kind   "b" token bucket (GCRA) | "s" sliding-window counter | "f" fixed window
--                  | "k" flag (an address block: cost 0 checks it, cost 1 raises it)
--                  | "r" reservation (always allowed; when the plan commits, a hash at its key:
--                    at, until, cost (the estimate), n, and k1..kn / l1..ln, the key and
--                    "kind a b" of the n operations right before it, which settle.lua corrects)
--           a      bucket: burst;           windows: limit;       flag: 0;  reservation: n
--           b      bucket: interval (us);   windows: window (us); flag and reservation: duration (us)
--           cost   hits this request counts
--           shadow 1: counted and reported, never refusing the plan; 0: enforced
-- Returns   { now, committed (1|0; 0 when only checking), then for each operation: allowed (1|0), s1, s2, s3 }
--           where s1..s3 is the state the operation saw: bucket { tat, 0, 0 }, window
--           { start, prev, cur }, or { -1, 0, 0 } for none. The caller recomputes the whole verdict
--           (remaining, reset, retry-after) from it with decision-core's quota::check, so this
--           script only has to agree on `allowed` and on the state it stores.
--
-- Why here: one round trip per decision, and one clock for the whole fleet, so instances with
-- skewed clocks still agree. The arithmetic mirrors decision-core/src/quota.rs exactly: every
-- number is an integer below 2^53 (microseconds since the epoch, counts, and the sliding weight
-- in milliseconds and units of 1e-5), so doubles compute what Rust's integers do.
-- State is a string: "tat" for a bucket, "until" for a flag, "start prev cur" for a window. Every key expires when
-- its state would be forgotten anyway: a bucket at its TAT, a sliding window two windows after
-- its start, a fixed window one window after.

local now, test_clock = clock(ARGV[1])
local store = ARGV[2] == '1'
local n = #KEYS

-- The states this plan has already changed, by key (a plan may name a key twice): only a plan
-- of more than one operation needs them. Otherwise a state is three numbers (read_state's
-- a, b, c), so a one-operation plan builds two tables: its reply and its list of writes.
local pending = n > 1 and {} or nil
local function load(key)
  if pending then
    local p = pending[key]
    if p ~= nil then return p[1], p[2], p[3] end
  end
  return read_state(key)
end

-- the reply: { now, committed }, then four values per operation (sized by the constructor for
-- the usual one)
local out = n == 1 and { now, 0, 0, 0, 0, 0 } or { now, 0 }
-- the writes a commit makes, six values each: key, kind, a, b, c, expires
local writes, nw = {}, 0
local reservations
local commit = true

for i = 1, n do
  local base = 3 + 5 * (i - 1)
  local kind, a, b = ARGV[base], tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local cost, shadow = tonumber(ARGV[base + 3]), ARGV[base + 4] == '1'
  local key = KEYS[i]
  local s1, s2, s3
  if kind ~= 'r' then s1, s2, s3 = load(key) end
  local o = 4 * i - 1
  if s1 then
    out[o], out[o + 1], out[o + 2], out[o + 3] = 0, s1, s2, s3
  else
    out[o], out[o + 1], out[o + 2], out[o + 3] = 0, -1, 0, 0
  end
  -- ok: allowed; n1..n3: the state after it (or the state as it stays); expires: when to forget it
  local ok, n1, n2, n3, expires
  if kind == 'b' then
    local stored = s1 or now
    local tat = math_max(stored, now)
    local new_tat = tat + cost * b
    ok = new_tat - now <= a * b
    if ok then n1, n2, n3, expires = new_tat, 0, 0, new_tat
    elseif s1 then n1, n2, n3 = s1, s2, s3
    else n1, n2, n3 = stored, 0, 0 end
  elseif kind == 's' then
    local start, prev, cur = roll(s1, s2, s3, b, now)
    local elapsed = math_min(math_max(now - start, 0), b)
    local estimate = weighted(prev, b, elapsed) + cur
    ok = estimate + cost <= a
    if ok then n1, n2, n3, expires = start, prev, cur + cost, start + 2 * b
    elseif s1 then n1, n2, n3 = s1, s2, s3
    else n1, n2, n3 = start, prev, cur end
  elseif kind == 'r' then
    -- a reservation: always allowed; its record is written when the plan commits
    ok = true
    reservations = reservations or {}
    reservations[#reservations + 1] = { key, i, a, b, cost }
  elseif kind == 'k' then
    local untl = s1 or 0
    if cost == 0 then
      ok = untl <= now
      n1, n2, n3, expires = untl, 0, 0, untl
    else
      ok = true
      n1, n2, n3 = math_max(untl, now + b), 0, 0
      expires = n1
    end
  else
    local start = now - now % b
    local cur = 0
    if s1 and s1 >= start then cur = s3 end
    ok = cur + cost <= a
    if ok then n1, n2, n3, expires = start, 0, cur + cost, start + b
    elseif s1 then n1, n2, n3 = s1, s2, s3
    else n1, n2, n3 = start, 0, cur end
  end
  if pending and kind ~= 'r' then pending[key] = { n1, n2, n3 } end
  if ok then
    out[o] = 1
    -- a reservation is written below; a flag checked (cost 0) changes nothing
    if kind ~= 'r' and not (kind == 'k' and cost == 0) then
      writes[nw + 1], writes[nw + 2], writes[nw + 3], writes[nw + 4], writes[nw + 5], writes[nw + 6] =
        key, kind, n1, n2, n3, expires
      nw = nw + 6
    end
  elseif not shadow then
    commit = false
  end
end

if commit and store then
  out[2] = 1
  for w = 1, nw, 6 do
    write_state(writes[w], writes[w + 1], writes[w + 2], writes[w + 3], writes[w + 4], writes[w + 5], now, test_clock)
  end
  if reservations then
    for _, r in ipairs(reservations) do
      -- the record: when, until when, the estimate, and each covered operation's key and limit
      local key, at, covers, ttl, cost = r[1], r[2], r[3], r[4], r[5]
      local fields = { 'at', now, 'until', now + ttl, 'cost', cost, 'n', covers }
      for j = 1, covers do
        local o = at - covers - 1 + j
        local base = 3 + 5 * (o - 1)
        fields[#fields + 1] = 'k' .. j
        fields[#fields + 1] = KEYS[o]
        fields[#fields + 1] = 'l' .. j
        fields[#fields + 1] = ARGV[base] .. ' ' .. ARGV[base + 1] .. ' ' .. ARGV[base + 2]
      end
      redis.call('HSET', key, unpack(fields))
      local ms = math_max(math_ceil(ttl / 1000), 1)
      if test_clock then ms = math_max(ms, 60000) end
      redis.call('PEXPIRE', key, ms)
    end
  end
end
return out
