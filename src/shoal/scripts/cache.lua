-- cache: the engine level of the two-level cache (see shoal.coordination.cache).
-- KEYS     cache:<name>:<key> entries (string: a 1-byte format header, then the
--          msgpack value, zlib-compressed when the header is 1; PX the entry's ttl).
--          For load, fill, renew and release: KEYS[1] the entry, KEYS[2] its fill
--          lease cache_fill:<name>:<key> (string: the filling holder's id, PX).
-- ARGV     prefix (unused), op, then the op's arguments (below)
-- Channel  cache_changed (a shard channel in the same slot): every write publishes
--          one message naming the writer, the cache and the keys, in the same
--          script, so a process that reads the new value afterwards is already
--          behind the invalidation on its subscription. The message is
--          "<seq> <msgpack [writer, cache, keys]>".
-- Seq      cache_seq (string, built from the prefix: same slot): every write takes
--          the next number, every read returns the current one, so a process can
--          tell whether an invalidation it hears came before or after its read.
local op = ARGV[2]
local seq_key = prefix .. 'cache_seq'

local function announce(channel, message)
  local seq = redis.call('INCR', seq_key)
  redis.call('SPUBLISH', channel, seq .. ' ' .. message)
  return seq
end

local function put(key, value, ttl_ms)
  if ttl_ms > 0 then
    redis.call('SET', key, value, 'PX', ttl_ms)
  else
    redis.call('SET', key, value)
  end
end

-- get: the seq, then the entries' values and ms to live, flat: {seq, v1, pttl1,
-- v2, pttl2, ...} (false and 0 for a missing entry; pttl -1: no expiry).
if op == 'get' then
  local out = {tonumber(redis.call('GET', seq_key) or '0')}
  for i, key in ipairs(KEYS) do
    local value = redis.call('GET', key)
    out[2 * i] = value
    out[2 * i + 1] = value and redis.call('PTTL', key) or 0
  end
  return out
end

-- set: ARGV[3] channel, [4] message, [5] ttl ms (0: none), [6..] one value per key.
-- Returns the write's seq.
if op == 'set' then
  local ttl_ms = tonumber(ARGV[5])
  for i, key in ipairs(KEYS) do put(key, ARGV[5 + i], ttl_ms) end
  return announce(ARGV[3], ARGV[4])
end

-- delete: ARGV[3] channel, [4] message. Returns {how many entries existed, seq}.
if op == 'delete' then
  local n = redis.call('DEL', unpack(KEYS))
  return {n, announce(ARGV[3], ARGV[4])}
end

local entry, lease = KEYS[1], KEYS[2]

-- load: ARGV[3] holder, [4] lease ms. {value, pttl, 0, seq} when the entry
-- exists; else {false, 0, 1, seq} when the caller now holds the fill lease (it
-- computes the value), or {false, ms left on the other holder's lease, 0, seq}.
if op == 'load' then
  local seq = tonumber(redis.call('GET', seq_key) or '0')
  local value = redis.call('GET', entry)
  if value then return {value, redis.call('PTTL', entry), 0, seq} end
  if redis.call('SET', lease, ARGV[3], 'NX', 'PX', tonumber(ARGV[4])) then
    return {false, 0, 1, seq}
  end
  return {false, math.max(redis.call('PTTL', lease), 0), 0, seq}
end

-- fill: ARGV[3] channel, [4] message, [5] ttl ms, [6] value, [7] holder. Stores the
-- computed value and ends the holder's lease; the message wakes the waiters.
if op == 'fill' then
  put(entry, ARGV[6], tonumber(ARGV[5]))
  if redis.call('GET', lease) == ARGV[7] then redis.call('DEL', lease) end
  return announce(ARGV[3], ARGV[4])
end

-- renew: ARGV[3] holder, [4] lease ms. 1 if the holder still held the lease.
if op == 'renew' then
  if redis.call('GET', lease) ~= ARGV[3] then return 0 end
  redis.call('PEXPIRE', lease, tonumber(ARGV[4]))
  return 1
end

-- release: ARGV[3] channel, [4] message, [5] holder. The holder's computation
-- failed: the lease ends at once and the message wakes a waiter to take over.
if op == 'release' then
  if redis.call('GET', lease) ~= ARGV[5] then return 0 end
  redis.call('DEL', lease)
  announce(ARGV[3], ARGV[4])
  return 1
end

return redis.error_reply('cache: unknown op ' .. tostring(op))
