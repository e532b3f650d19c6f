-- ratelimit: take `cost` tokens from one token bucket, on the engine's clock.
-- KEYS[1]  the bucket: ratelimit:<name>:<key> (hash: tokens, ts)
-- ARGV     prefix (as for every script; unused here), rate (tokens per second),
--          burst (the bucket's size), cost (tokens), and optionally the op:
--          'take' (the default): take exactly `cost` tokens or none;
--          'upto': take as many whole tokens as there are, up to `cost` (at least
--                  one, or none and refused): a caller that may use several;
--          'give': put `cost` tokens back (taken earlier and not used), never
--                  filling the bucket past `burst`;
-- Touches  KEYS[1] only
-- Model    the bucket holds up to `burst` tokens and gains `rate` a second. A
--          missing key is a full bucket, so a bucket is only stored while it is
--          short of full: its PEXPIRE is the time it takes to refill, after which
--          it is full again anyway and the key vanishes (idle buckets cost nothing).
--          A 'give' that fills it deletes the key for the same reason.
-- Clock    the engine's (TIME), not the callers': every gateway process shares the
--          bucket, and their clocks disagree. 'ts' never goes backwards, so a
--          clock stepped back (a failover to a replica) grants no tokens twice.
-- Writes   only when tokens are taken or given: a refused call changes nothing
--          (the refill is a function of 'ts'), so a flood of refused requests
--          costs no writes.
-- Returns  {allowed (tokens taken: 1 for 'take', 1..cost for 'upto', 0 when
--          refused or for 'give'), tokens left (string), seconds until `cost`
--          tokens ('upto': one token) are there (string; '0' when allowed)} —
--          strings, because Lua numbers come back from a script truncated to integers.
local rate, burst, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local op = ARGV[5] or 'take'
local key = KEYS[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000  -- ms, with fraction

local stored = redis.call('HMGET', key, 'tokens', 'ts')
local tokens, ts = tonumber(stored[1]), tonumber(stored[2])
if tokens == nil or ts == nil then
  tokens, ts = burst, now
end
if now > ts then
  tokens = tokens + (now - ts) * rate / 1000
  ts = now
end
tokens = math.min(burst, tokens)  -- a burst smaller than the last call's applies at once

local function store()
  if tokens >= burst then
    redis.call('DEL', key)  -- full: the same as no key
    return
  end
  redis.call('HSET', key, 'tokens', tostring(tokens), 'ts', tostring(ts))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) * 1000 / rate))
end

if op == 'give' then
  tokens = math.min(burst, tokens + cost)
  store()
  return {0, tostring(tokens), '0'}
end

local taken = cost
if op == 'upto' then
  taken = math.min(cost, math.floor(tokens))
  if taken < 1 then
    return {0, tostring(tokens), tostring((1 - tokens) / rate)}
  end
elseif tokens < cost then
  return {0, tostring(tokens), tostring((cost - tokens) / rate)}
end
tokens = tokens - taken  -- taken >= 1: the bucket is short of full
store()
return {op == 'upto' and taken or 1, tostring(tokens), '0'}
