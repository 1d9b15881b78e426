-- traffic.lua: one upstream's concurrency slots, queue and circuit breaker, changed atomically
-- with the Redis server's clock. Loaded by store/redis.rs with include_str!, after common.lua
-- (clock, weighted), and run by EVALSHA (reloaded on NOSCRIPT).
-- It mirrors MemoryStore::admit_now / complete_now and decision-core's
-- traffic.rs (Breaker::gate, Breaker::record, mean_hold) line for line; the conformance suite
-- runs the same scenarios on both stores.
--
-- KEYS[1]  slots:   sorted set, member = lease id ("l" or "p" + 32 hex), score = its expiry (us)
-- KEYS[2]  queue:   sorted set, member = waiter id, score = its deadline (us); FIFO by deadline,
--                   since every waiter of an upstream waits the same queue_timeout
-- KEYS[3]  breaker: string "mode until start total errors prev_total prev_errors hold
--                   alimit asince atotal aerrors aslow" (the adaptive limit and its interval)"
-- ARGV[1]  "admit" | "leave" | "complete"
-- ARGV[2]  the time in microseconds, or -1 to read the server's clock (TIME); only tests pass one
-- admit:    ARGV[3] lease (32 hex)  ARGV[4] waiter  ARGV[5] returning (0|1)  ARGV[6] limit
--           ARGV[7] queue_size  ARGV[8] queue_timeout  ARGV[9] lease_ttl
--           ARGV[10] breaker (0|1)  ARGV[11] threshold (basis points)  ARGV[12] min_requests
--           ARGV[13] window  ARGV[14] reset_timeout
--           ARGV[15] adaptive (0|1)  ARGV[16] min_limit  ARGV[17] decrease (basis points)
--           ARGV[18] increase  ARGV[19] interval  ARGV[20] error_rate (basis points)
--           ARGV[21] latency threshold (us)
--   returns { code, a, b, c, in_use, queued, mode, limit }: code 0 granted (a: probe 0|1),
--           1 wait, 2 queue full (a, b, c: in_use, queued, mean hold), 3 breaker open (a: retry
--           after); limit: the concurrency limit in force
-- leave:    ARGV[3] waiter; it leaves the queue, and a slot granted under its id (`l` or `p`
--           and the id) is freed uncounted (its request was cancelled); returns { 1 }
-- renew:    ARGV[3] lease id  ARGV[4] lease_ttl; a lease still held expires lease_ttl from now;
--           returns { 1 } when it was held, { 0 } when it had expired, was never granted, or is
--           the half-open breaker's probe (never renewed: the breaker waits on its outcome)
-- complete: ARGV[3] lease id  ARGV[4] error (0|1)  ARGV[5] lease_ttl  ARGV[6..10] as admit's
--           ARGV[10..14]  ARGV[11] latency (us)  ARGV[12..18] as admit's ARGV[15..21]
--           ARGV[19] the configured concurrency limit;
--           returns { released (0|1), in_use, queued, mode, limit }
-- A release (and a waiter leaving) is announced on the channel `pc:traffic:freed` with the
-- upstream's key, so waiters at every instance look again at once.
-- Releasing is idempotent, and only a released lease's outcome counts for the breaker, so a
-- completion that comes late (its lease expired) or twice, or a forged one, changes nothing.
--
-- Why here: every instance of the fleet must see one limit and one breaker; two instances never
-- both take the half-open probe, since the gate and the grant are one script.

local BASIS = 10000
local op = ARGV[1]
local now, test_clock = clock(ARGV[2])
local slots, queue, bkey = KEYS[1], KEYS[2], KEYS[3]

-- a key lives `us` microseconds (at least a minute under a test clock, as Redis expires keys
-- by its own clock)
local function expire(key, us)
  local ms = math.floor(us / 1000) + 1000
  if test_clock then ms = math.max(ms, 60000) end
  redis.call('PEXPIRE', key, ms)
end

-- tells every instance that a slot of this upstream may be free, so their waiters look again
-- at once (channel `pc:traffic:freed`, message: the upstream's key)
local function announce()
  local up = string.match(slots, '{up:(%x+)}')
  if up then redis.call('PUBLISH', 'pc:traffic:freed', up) end
end

if op == 'leave' then
  local left = redis.call('ZREM', queue, ARGV[3]) + redis.call('ZREM', slots, 'l' .. ARGV[3], 'p' .. ARGV[3])
  if left > 0 then announce() end
  return { 1 }
end

if op == 'renew' then
  -- a half-open probe is one request, judged when it completes: its lease is not renewed
  if string.sub(ARGV[3], 1, 1) == 'p' then return { 0 } end
  local held = redis.call('ZSCORE', slots, ARGV[3])
  if held and tonumber(held) > now then
    local ttl = tonumber(ARGV[4])
    redis.call('ZADD', slots, 'XX', now + ttl, ARGV[3])
    -- the set outlives its latest lease: this one now
    expire(slots, ttl)
    return { 1 }
  end
  return { 0 }
end

-- breaker state
local b = { 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0 }
local raw = redis.call('GET', bkey)
if raw then
  local i = 1
  for n in string.gmatch(raw, '%d+') do
    b[i] = tonumber(n)
    i = i + 1
  end
end
local mode, until_, start, total, errors, ptotal, perrors, hold = b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8]
local alimit, asince, atotal, aerrors, aslow = b[9], b[10], b[11], b[12], b[13]
local function save(ttl)
  redis.call('SET', bkey, string.format('%d %d %d %d %d %d %d %d %d %d %d %d %d', mode, until_, start, total, errors,
    ptotal, perrors, hold, alimit, asince, atotal, aerrors, aslow))
  expire(bkey, ttl)
end

-- the concurrency limit in force: AdaptiveState::effective
local function effective(max, adaptive)
  if not adaptive or alimit == 0 then return max end
  return math.min(alimit, max)
end

redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
redis.call('ZREMRANGEBYSCORE', queue, '-inf', now)

if op == 'admit' then
  local lease, waiter, returning = ARGV[3], ARGV[4], ARGV[5] == '1'
  local limit, qsize, qtimeout, ttl = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local has_breaker = ARGV[10] == '1'
  local reset = tonumber(ARGV[14])
  local window = tonumber(ARGV[13])
  limit = effective(limit, ARGV[15] == '1')
  -- the gate: 0 pass, 1 probe, 2 refuse
  local gate, retry = 0, 0
  local nmode, nuntil = mode, until_
  if has_breaker then
    if mode == 1 and now < until_ then
      gate, retry = 2, until_ - now
    elseif mode == 2 and until_ ~= 0 and now < until_ then
      gate, retry = 2, math.min(until_ - now, reset)
    elseif mode == 1 or mode == 2 then
      gate, nmode, nuntil = 1, 2, now + ttl
    end
  end
  local in_use = redis.call('ZCARD', slots)
  local queued = redis.call('ZCARD', queue)
  if gate == 2 then
    if returning then
      redis.call('ZREM', queue, waiter)
      queued = redis.call('ZCARD', queue)
    end
    return { 3, retry, 0, 0, in_use, queued, mode, limit }
  end
  local my_turn = true
  if queued > 0 then
    local head = redis.call('ZRANGE', queue, 0, 0)[1]
    my_turn = returning and head == waiter
  end
  if in_use < limit and my_turn then
    local probe = gate == 1
    local id = (probe and 'p' or 'l') .. lease
    redis.call('ZADD', slots, now + ttl, id)
    expire(slots, ttl)
    if returning then
      redis.call('ZREM', queue, waiter)
      queued = redis.call('ZCARD', queue)
    end
    if probe then
      mode, until_ = nmode, nuntil
      save(math.max(2 * window, reset + ttl))
    end
    return { 0, probe and 1 or 0, 0, 0, redis.call('ZCARD', slots), queued, mode, limit }
  end
  if returning then
    return { 1, in_use, queued, hold, in_use, queued, mode, limit }
  end
  if queued < qsize or redis.call('ZSCORE', queue, waiter) then
    redis.call('ZADD', queue, now + qtimeout, waiter)
    expire(queue, qtimeout)
    queued = redis.call('ZCARD', queue)
    return { 1, in_use, queued, hold, in_use, queued, mode, limit }
  end
  return { 2, in_use, queued, hold, in_use, queued, mode, limit }
end

if op == 'complete' then
  local lease, is_error, ttl = ARGV[3], ARGV[4] == '1', tonumber(ARGV[5])
  local has_breaker = ARGV[6] == '1'
  local threshold, min_requests = tonumber(ARGV[7]), math.max(tonumber(ARGV[8]), 1)
  local window, reset = math.max(tonumber(ARGV[9]), 1), tonumber(ARGV[10])
  local latency = tonumber(ARGV[11])
  local adaptive = ARGV[12] == '1'
  local amin, adecrease, aincrease = tonumber(ARGV[13]), tonumber(ARGV[14]), tonumber(ARGV[15])
  local ainterval, arate, alatency = tonumber(ARGV[16]), tonumber(ARGV[17]), tonumber(ARGV[18])
  local max = tonumber(ARGV[19])
  local expiry = redis.call('ZSCORE', slots, lease)
  if not expiry then
    return { 0, redis.call('ZCARD', slots), redis.call('ZCARD', queue), mode, effective(max, adaptive) }
  end
  redis.call('ZREM', slots, lease)
  local held = math.max(now - math.max(tonumber(expiry) - ttl, 0), 0)
  if hold == 0 then hold = held else hold = hold - math.floor(hold / 8) + math.floor(held / 8) end
  if has_breaker then
    local probe = string.sub(lease, 1, 1) == 'p'
    if mode == 2 and probe then
      if is_error then
        mode, until_, start, total, errors, ptotal, perrors = 1, now + reset, 0, 0, 0, 0, 0
      else
        mode, until_, start, total, errors, ptotal, perrors = 0, 0, 0, 0, 0, 0, 0
      end
    elseif mode == 0 then
      local aligned = now - (now % window)
      if start ~= aligned then
        if start + window == aligned then
          ptotal, perrors, start, total, errors = total, errors, aligned, 0, 0
        elseif start < aligned then
          ptotal, perrors, start, total, errors = 0, 0, aligned, 0, 0
        end
      end
      total = total + 1
      if is_error then errors = errors + 1 end
      local elapsed = math.max(now - start, 0)
      local t = weighted(ptotal, window, elapsed) + total
      local e = weighted(perrors, window, elapsed) + errors
      if is_error and t >= min_requests and e * BASIS >= threshold * t then
        mode, until_, start, total, errors, ptotal, perrors = 1, now + reset, 0, 0, 0, 0, 0
      end
    end
  end
  if adaptive then
    -- AdaptiveState::record
    if asince == 0 then asince = now end
    if now >= asince + ainterval then
      local current = effective(max, true)
      local unhealthy = atotal > 0 and (aerrors * BASIS > arate * atotal or aslow * 100 > atotal)
      if unhealthy then
        alimit = math.min(math.max(math.floor(current * adecrease / BASIS), amin), max)
      else
        alimit = math.min(current + aincrease, max)
      end
      asince, atotal, aerrors, aslow = now, 0, 0, 0
    end
    atotal = atotal + 1
    if is_error then aerrors = aerrors + 1 end
    if latency > alatency then aslow = aslow + 1 end
  end
  save(math.max(2 * window, reset + ttl, 2 * ainterval))
  announce()
  return { 1, redis.call('ZCARD', slots), redis.call('ZCARD', queue), mode, effective(max, adaptive) }
end

return redis.error_reply('traffic.lua: unknown operation ' .. tostring(op))
