-- ratewindow: admit `cost` calls into a sliding window log, on the engine's clock.
-- KEYS[1]  the window: ratewindow:<name>:<key> (sorted set: one member per admitted
--          call, scored by its engine time in ms)
-- ARGV     prefix (as for every script; unused here), limit (calls per window),
--          window (ms), cost (calls this one counts for)
-- Touches  KEYS[1] only
-- Model    exact: a call is admitted only if, with it, no more than `limit` calls
--          fall within the last `window` ms. Calls older than the window are trimmed
--          on every call; the key expires one window after the last admitted call.
-- Members  "<ms>-<n>" where n is the count after trimming plus i: two calls in the
--          same microsecond see different counts (the first one added to it), so
--          members never collide.
-- Returns  {allowed (1 or 0), calls left in the window (string), seconds until
--          `cost` more calls fit (string; '0' when allowed)}
local limit, window, cost = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local key = KEYS[1]
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000  -- ms, with fraction

redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)  -- a call counts for `window`
local count = redis.call('ZCARD', key)
if count + cost > limit then
  -- `cost` calls fit once the (count + cost - limit) oldest have left the window.
  local oldest = redis.call('ZRANGE', key, count + cost - limit - 1, count + cost - limit - 1,
    'WITHSCORES')
  local wait = (tonumber(oldest[2]) + window - now) / 1000
  return {0, tostring(limit - count), tostring(math.max(wait, 0.001))}
end
local stamp = string.format('%.3f', now)
for i = 1, cost do
  redis.call('ZADD', key, now, stamp .. '-' .. (count + i))
end
redis.call('PEXPIRE', key, math.ceil(window))
return {1, tostring(limit - count - cost), '0'}
