-- services: the service registry and the shared health of its instances.
-- KEYS[1]  service:<name> (hash: instance id -> msgpack record), for routing only:
--          every key below shares the control group's tag, so one slot
-- ARGV     prefix, op, service name, then the op's arguments (below)
-- Touches  service:<name>, service_ttl:<name> (sorted set: instance id -> expiry,
--          engine ms; static instances are absent), service_health:<name> (hash:
--          instance id -> JSON health record), services (set of names); publishes
--          the service's
--          name on the shard channel services_changed whenever what a caller's
--          view shows changes (membership, a record, probe or breaker state,
--          passive degradation) — never for a heartbeat that changes nothing.
-- Clock    the engine's (TIME): registrants' and callers' clocks disagree.
--
-- The health record (JSON, short names; absent = a fresh closed breaker):
--   b  breaker: 'closed' | 'open' | 'half_open'     o  when it opened (ms)
--   h  when it went half-open (ms)                   t  trial calls handed out
--   w  start of the current window (ms)              c, f  calls, failures in it
--   pc, pf  calls, failures of the previous window   k  consecutive failures
--   d  1 when passive health says degraded (error rate over the window)
--   wl the window's length (ms), as the last outcome's caller gave it
--   p  probe verdict: 'up' | 'down' ('' = never probed)
--   pk probe streak: +n successes or -n failures in a row
local name = ARGV[3]
local op = ARGV[2]
local service_key = prefix .. 'service:' .. name
local ttl_key = prefix .. 'service_ttl:' .. name
local health_key = prefix .. 'service_health:' .. name
local names_key = prefix .. 'services'
local channel = prefix .. 'services_changed'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function changed()
  redis.call('SPUBLISH', channel, name)
end

local function fresh_health(now)
  return {b = 'closed', o = 0, h = 0, t = 0, w = now, c = 0, f = 0, pc = 0, pf = 0,
          k = 0, d = 0, wl = 0, p = '', pk = 0}
end

local function load_health(id, now)
  local raw = redis.call('HGET', health_key, id)
  if raw then return cjson.decode(raw), raw end
  return fresh_health(now), false
end

local function save_health(id, health)
  local raw = cjson.encode(health)
  redis.call('HSET', health_key, id, raw)
  return raw
end

-- What a caller's view shows of a health record: a change of any of these is
-- published, a change of counters alone is not.
local function visible(health)
  return health.b .. '|' .. health.d .. '|' .. health.p
end

-- Roll the window forward: the previous window's counts are kept (they weigh in
-- while the current window fills, so the rate slides rather than jumps).
local function roll(health, now, window)
  local age = now - health.w
  if age >= window then
    if age >= 2 * window then
      health.pc, health.pf = 0, 0
    else
      health.pc, health.pf = health.c, health.f
    end
    health.c, health.f = 0, 0
    health.w = now - (age % window)
  end
end

-- Calls and failures over the last `window`: the current window's plus the
-- share of the previous one that still overlaps it.
local function windowed(health, now, window)
  local overlap = 1 - (now - health.w) / window
  if overlap < 0 then overlap = 0 end
  return health.c + health.pc * overlap, health.f + health.pf * overlap
end

local function reap(now)
  local expired = redis.call('ZRANGEBYSCORE', ttl_key, '-inf', now)
  if #expired == 0 then return 0 end
  for _, id in ipairs(expired) do
    redis.call('HDEL', service_key, id)
    redis.call('HDEL', health_key, id)
    redis.call('ZREM', ttl_key, id)
  end
  if redis.call('HLEN', service_key) == 0 then redis.call('SREM', names_key, name) end
  changed()
  return #expired
end

-- A degraded instance gets calls only when no healthy one is left, so its window
-- may never fill again: once two windows passed without an outcome, the verdict
-- lapses and the instance is tried again (and degraded again if it still errs).
local function lapse_degraded(now)
  local healths = redis.call('HGETALL', health_key)
  for i = 1, #healths, 2 do
    local health = cjson.decode(healths[i + 1])
    if health.d == 1 and (health.wl or 0) > 0 and now - health.w >= 2 * health.wl then
      health.d, health.c, health.f, health.pc, health.pf, health.w = 0, 0, 0, 0, 0, now
      redis.call('HSET', health_key, healths[i], cjson.encode(health))
      changed()
    end
  end
end

-- put: register, update or heartbeat. ARGV[4] id, ARGV[5] record, ARGV[6] ttl ms
-- (0 = static), ARGV[7] mode: 'create' (store the record, creating the instance
-- if missing), 'update' (store it only if the instance exists), 'beat' (only
-- restart the TTL of an existing instance: the record stays as it is, so a
-- heartbeat never undoes a status an operator set meanwhile). Returns 1, or 0 if
-- the instance does not exist and the mode does not create it.
if op == 'put' then
  local id, record, ttl, mode = ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7]
  local now = now_ms()
  local stored = redis.call('HGET', service_key, id)
  if not stored and mode ~= 'create' then return 0 end
  if mode == 'beat' then
    if redis.call('ZSCORE', ttl_key, id) then redis.call('ZADD', ttl_key, now + ttl, id) end
    return 1
  end
  if ttl > 0 then
    redis.call('ZADD', ttl_key, now + ttl, id)
  else
    redis.call('ZREM', ttl_key, id)
  end
  if stored ~= record then
    redis.call('HSET', service_key, id, record)
    redis.call('SADD', names_key, name)
    changed()
  end
  return 1
end

-- deregister: ARGV[4] id. Returns 1 if it was registered.
if op == 'deregister' then
  local id = ARGV[4]
  local removed = redis.call('HDEL', service_key, id)
  redis.call('HDEL', health_key, id)
  redis.call('ZREM', ttl_key, id)
  if redis.call('HLEN', service_key) == 0 then redis.call('SREM', names_key, name) end
  if removed == 1 then changed() end
  return removed
end

-- read: the service as a view needs it, after dropping expired instances.
-- Returns {engine ms, {id, record, ...}, {id, health JSON, ...}, {id, expiry, ...}}.
if op == 'read' then
  local now = now_ms()
  reap(now)
  lapse_degraded(now)
  return {now, redis.call('HGETALL', service_key), redis.call('HGETALL', health_key),
          redis.call('ZRANGE', ttl_key, 0, -1, 'WITHSCORES')}
end

-- outcome: call outcomes of one instance, for its breaker and passive health.
-- ARGV[4] id, [5] successes, [6] failures, [7] consecutive failures that open,
-- [8] failure rate that opens, [9] minimum calls for a rate, [10] window ms,
-- [11] error rate that marks the instance degraded, [12] '1' if these outcomes
-- are of trial calls let through a half-open breaker, [13] the failures in a row
-- that end the batch (the caller knows its outcomes' order; the engine does not).
-- Returns the health record (JSON) after the update.
if op == 'outcome' then
  local id = ARGV[4]
  if redis.call('HEXISTS', service_key, id) == 0 then return false end
  local oks, fails = tonumber(ARGV[5]), tonumber(ARGV[6])
  local threshold, rate, min_calls = tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
  local window, degrade_rate, trial = tonumber(ARGV[10]), tonumber(ARGV[11]), ARGV[12] == '1'
  local trailing = tonumber(ARGV[13])
  local now = now_ms()
  local health, raw = load_health(id, now)
  local before = visible(health)
  roll(health, now, window)
  health.wl = window
  health.c = health.c + oks + fails
  health.f = health.f + fails
  if oks == 0 then
    health.k = health.k + fails  -- the streak goes on
  else
    health.k = trailing  -- a success in the batch ended it; the failures after count
  end
  local calls, failed = windowed(health, now, window)
  local failing_rate = 0
  if calls >= min_calls then failing_rate = failed / calls end
  if health.b == 'half_open' and trial then
    if fails > 0 then
      health.b, health.o, health.t = 'open', now, 0
    elseif oks > 0 then
      health.b, health.t, health.k = 'closed', 0, 0
      health.c, health.f, health.pc, health.pf, health.w = 0, 0, 0, 0, now
      failing_rate = 0
    end
  elseif health.b == 'closed' then
    if health.k >= threshold or (calls >= min_calls and failing_rate >= rate) then
      health.b, health.o, health.t = 'open', now, 0
    end
  end
  -- outcomes of calls started before the breaker opened change nothing more
  if failing_rate >= degrade_rate then
    health.d = 1
  elseif calls < min_calls or failing_rate < degrade_rate / 2 then
    health.d = 0  -- hysteresis: a rate hovering at the line does not flap
  end
  local saved = save_health(id, health)
  if visible(health) ~= before then changed() end
  return saved
end

-- allow: may a call go to an instance whose breaker is not closed? ARGV[4] id,
-- [5] recovery ms (open -> half-open after it), [6] trial calls allowed at once
-- while half-open, [7] how long trials may be out before they are given up
-- (their callers died) and new ones handed out: at least a call's timeout.
-- Returns {1 or 0, health JSON}.
if op == 'allow' then
  local id, recovery, trials = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
  local trial_ms = math.max(recovery, tonumber(ARGV[7]))
  local now = now_ms()
  local health, raw = load_health(id, now)
  if health.b == 'closed' then return {1, raw or cjson.encode(health)} end
  local before = visible(health)
  if health.b == 'open' and now >= health.o + recovery then
    health.b, health.h, health.t = 'half_open', now, 0
  elseif health.b == 'half_open' and now >= health.h + trial_ms then
    health.h, health.t = now, 0  -- the trials handed out never reported: new ones
  end
  local allowed = 0
  if health.b == 'half_open' and health.t < trials then
    health.t = health.t + 1
    allowed = 1
  end
  local saved = save_health(id, health)
  if visible(health) ~= before then changed() end
  return {allowed, saved}
end

-- probe: one active probe's result. ARGV[4] id, [5] '1' ok / '0' failed,
-- [6] fall (failures in a row -> down), [7] rise (successes in a row -> up).
-- Returns the verdict ('up', 'down', or '' while undecided on a new instance).
if op == 'probe' then
  local id, ok = ARGV[4], ARGV[5] == '1'
  local fall, rise = tonumber(ARGV[6]), tonumber(ARGV[7])
  if redis.call('HEXISTS', service_key, id) == 0 then return false end
  local now = now_ms()
  local health = load_health(id, now)
  local before = visible(health)
  if ok then
    if health.pk < 0 then health.pk = 0 end
    health.pk = health.pk + 1
    if health.p ~= 'up' and (health.p == '' or health.pk >= rise) then health.p = 'up' end
  else
    if health.pk > 0 then health.pk = 0 end
    health.pk = health.pk - 1
    if health.p ~= 'down' and -health.pk >= fall then health.p = 'down' end
  end
  save_health(id, health)
  if visible(health) ~= before then changed() end
  return health.p
end

-- unprobe: probing of the service stopped: forget every probe verdict (a 'down'
-- would otherwise keep an instance out of rotation for good).
if op == 'unprobe' then
  local healths = redis.call('HGETALL', health_key)
  local forgot = false
  for i = 1, #healths, 2 do
    local health = cjson.decode(healths[i + 1])
    if health.p ~= '' or health.pk ~= 0 then
      forgot = forgot or health.p ~= ''
      health.p, health.pk = '', 0
      redis.call('HSET', health_key, healths[i], cjson.encode(health))
    end
  end
  if forgot then changed() end
  return 1
end

return redis.error_reply('services: unknown op ' .. op)
