-- admin.lua: the admin API's store calls. Loaded by store/redis/scripts.rs after common.lua and
-- adjust.lua.
--
-- ARGV[1]   the time in microseconds, or -1 for the server's clock
-- ARGV[2]   the operation:
--   "adjust"  KEYS: counters (one hash tag); ARGV[3]: delta; ARGV[4..]: each key's "kind b".
--             A negative delta gives units back (adjust.lua's `grant`), a positive one counts
--             them now (`correct`). Returns { now, 0 }.
--   "forget"  KEYS: keys deleted (one hash tag). Returns { now, how many existed }.
--   "note"    KEYS[1]: the blocks index (a sorted set: address -> until); ARGV[3]: address,
--             ARGV[4]: until (us). Returns { now, 0 }.
--   "unnote"  KEYS[1]: the blocks index; ARGV[3]: address. Returns { now, removed (1|0) }.
--   "list"    KEYS[1]: the blocks index; expired entries dropped. Returns { now, n, then
--             address, until for each }.
--   "keys"    KEYS[1]: the key records (a hash: id -> JSON); ARGV[3]: an HSCAN cursor. Returns
--             { next cursor ("0": done), { id, record, ... } }: a page of about 500.
--   "version" KEYS[2]: the key records' version. Returns { now, version }.
--   "key"     KEYS[1]: the key records; ARGV[3]: id. Returns the record, or nil.
--   "putkey"  KEYS[1]: the key records; ARGV[3]: id, ARGV[4]: the new record, ARGV[5]: "1" when
--             a current record is expected, ARGV[6]: that record; KEYS[2]: their version.
--             Writes only when the current one is the one expected (none, or equal), bumps the
--             version, publishes "keys:<id>". Returns 1 when written, 0 when not.
-- "adjust" and "forget" publish "counters" on CHANGED_CHANNEL: counters went back, which the
-- other instances' over-limit caches must learn.

local now, test_clock = clock(ARGV[1])
local op = ARGV[2]

if op == 'adjust' then
  local delta = tonumber(ARGV[3])
  for i = 1, #KEYS do
    local kind, b = string.match(ARGV[3 + i], '^(%a) (%d+)$')
    if not kind then return redis.error_reply('admin.lua adjust: bad limit ' .. tostring(ARGV[3 + i])) end
    if delta < 0 then grant(KEYS[i], kind, tonumber(b), -delta, now, test_clock)
    else correct(KEYS[i], kind, tonumber(b), now, delta, now, test_clock) end
  end
  redis.call('PUBLISH', CHANGED_CHANNEL, 'counters')
  return { now, 0 }
elseif op == 'forget' then
  local n = redis.call('DEL', unpack(KEYS))
  redis.call('PUBLISH', CHANGED_CHANNEL, 'counters')
  return { now, n }
elseif op == 'note' then
  redis.call('ZADD', KEYS[1], 'GT', tonumber(ARGV[4]), ARGV[3])
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  return { now, 0 }
elseif op == 'unnote' then
  return { now, redis.call('ZREM', KEYS[1], ARGV[3]) }
elseif op == 'list' then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  local all = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local out = { now, #all / 2 }
  for i = 1, #all do out[#out + 1] = all[i] end
  return out
elseif op == 'keys' then
  return redis.call('HSCAN', KEYS[1], ARGV[3], 'COUNT', 500)
elseif op == 'version' then
  return { now, tonumber(redis.call('GET', KEYS[2]) or '0') }
elseif op == 'key' then
  return redis.call('HGET', KEYS[1], ARGV[3])
elseif op == 'putkey' then
  local current = redis.call('HGET', KEYS[1], ARGV[3])
  if ARGV[5] == '1' then
    if current ~= ARGV[6] then return 0 end
  elseif current then
    return 0
  end
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
  redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', CHANGED_CHANNEL, 'keys:' .. ARGV[3])
  return 1
end
return redis.error_reply('admin.lua: unknown operation ' .. tostring(op))
