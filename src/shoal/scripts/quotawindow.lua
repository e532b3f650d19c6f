-- quotawindow: a weighted sliding window log per limit, on the engine's clock: the
-- cluster-wide quotas of a model provider (see shoal.llm.quota).
-- KEYS     three per limit (every key of one provider shares the control tag: one
--          slot on a Cluster): the log (sorted set: request id -> engine ms when it
--          was admitted), the amounts (hash: request id -> what it counts for) and
--          the total (string: the sum of the amounts in the log)
-- ARGV     prefix (as for every script; unused here), op, request id, window (ms),
--          then per limit its quota and:
--          'admit':  the amount to count (the estimate; 1 for requests). Admitted
--                    only if every limit has room (total + amount <= quota), then
--                    counted on each; otherwise counted on none. An id already
--                    counted is admitted again without counting twice.
--          'settle': the amount it really was, and 1 (refund) or 0 (never lower
--                    it): an entry still in the window is set to it, so the total
--                    changes by (new - old) in the request's own window; an entry
--                    that has left it changes nothing.
-- Touches  KEYS only
-- Model    exact: an admission never makes the amounts counted within the last
--          `window` ms exceed the quota. Entries older than the window are trimmed
--          on every call (amortised O(expired)); every key expires one window
--          after the last write, when every entry would have left anyway.
-- Returns  'admit':  {1, 0, room left on the first limit (string)} when admitted,
--                    else {0, index of the first limit without room (1-based),
--                    seconds until the oldest entries leaving make room (string;
--                    a lower bound when more than MAX_WALK entries must leave)}
--          'settle': {1 when the entry was still counted, else 0, 0, '0'}
local MAX_WALK = 1000
local CHUNK = 500
local op, id, window = ARGV[2], ARGV[3], tonumber(ARGV[4])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000  -- ms, with fraction
local limits = #KEYS / 3

local function keys_of(i)
  return KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
end

-- drop the entries that left the window, and their amounts from the total
local function trim(log, amounts, total_key)
  local total = tonumber(redis.call('GET', total_key) or '0')
  local trimmed = false
  while true do
    local old = redis.call('ZRANGEBYSCORE', log, '-inf', now - window, 'LIMIT', 0, CHUNK)
    if #old == 0 then break end
    local counted = redis.call('HMGET', amounts, unpack(old))
    for j = 1, #old do
      total = total - (tonumber(counted[j]) or 0)
    end
    redis.call('ZREM', log, unpack(old))
    redis.call('HDEL', amounts, unpack(old))
    trimmed = true
    if #old < CHUNK then break end
  end
  if redis.call('EXISTS', log) == 0 then
    redis.call('DEL', amounts, total_key)  -- an empty log holds nothing
    return 0
  end
  if trimmed then  -- kept even when this call admits nothing
    total = math.max(total, 0)
    redis.call('SET', total_key, tostring(total), 'KEEPTTL')
  end
  return total
end

-- seconds until `need` of the amounts have left the window (oldest first)
local function wait_for(log, amounts, need)
  local freed, walked, score = 0, 0, nil
  while walked < MAX_WALK do
    local oldest = redis.call('ZRANGE', log, walked, walked + CHUNK - 1, 'WITHSCORES')
    if #oldest == 0 then break end
    for j = 1, #oldest, 2 do
      score = tonumber(oldest[j + 1])
      freed = freed + (tonumber(redis.call('HGET', amounts, oldest[j])) or 0)
      walked = walked + 1
      if freed >= need or walked >= MAX_WALK then
        return math.max((score + window - now) / 1000, 0.001)
      end
    end
  end
  if score == nil then return 0.001 end
  return math.max((score + window - now) / 1000, 0.001)
end

local function touch(log, amounts, total_key, total)
  local ttl = math.ceil(window)
  redis.call('SET', total_key, tostring(total), 'PX', ttl)
  redis.call('PEXPIRE', log, ttl)
  redis.call('PEXPIRE', amounts, ttl)
end

if op == 'settle' then
  local log, amounts, total_key = keys_of(1)
  local total = trim(log, amounts, total_key)
  local old = tonumber(redis.call('HGET', amounts, id))
  if old == nil then
    return {0, 0, '0'}
  end
  local used, refund = tonumber(ARGV[6]), ARGV[7] == '1'
  local new = used
  if not refund then new = math.max(old, used) end
  total = total + new - old
  redis.call('HSET', amounts, id, tostring(new))
  touch(log, amounts, total_key, total)
  return {1, 0, '0'}
end

-- 'admit': every limit must have room, or none is counted
local totals = {}
for i = 1, limits do
  local log, amounts, total_key = keys_of(i)
  local quota, amount = tonumber(ARGV[3 + 2 * i]), tonumber(ARGV[4 + 2 * i])
  local total = trim(log, amounts, total_key)
  if redis.call('HEXISTS', amounts, id) == 1 then
    amount = 0  -- counted already (a retried admission)
  end
  if amount > quota then
    return {0, i, '-1'}  -- never fits
  end
  if total + amount > quota then
    return {0, i, tostring(wait_for(log, amounts, total + amount - quota))}
  end
  totals[i] = total
end
for i = 1, limits do
  local log, amounts, total_key = keys_of(i)
  local total = totals[i]
  if redis.call('HEXISTS', amounts, id) == 0 then
    local amount = tonumber(ARGV[4 + 2 * i])
    redis.call('ZADD', log, now, id)
    redis.call('HSET', amounts, id, tostring(amount))
    total = total + amount
  end
  touch(log, amounts, total_key, total)
  totals[i] = total
end
return {1, 0, tostring(tonumber(ARGV[5]) - totals[1])}
