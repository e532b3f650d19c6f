-- config: live configuration, versioned (see shoal.coordination.config).
-- KEYS[1]  live_config         (hash: setting key -> "<version>\n<at ms>\n<by>\n<JSON>")
-- KEYS[2]  live_config_version (string: the last version handed out; INCR, never reset)
-- KEYS[3]  live_config_history (stream: key, version, op, value, by, at; capped)
-- ARGV     prefix, op, then the op's arguments (below)
-- Version  one INCR per change in the same script as the write, so versions are
--          unique, strictly increasing, and a reader of the hash and the counter
--          together (op 'read') sees them agree.
-- Announce SPUBLISH live_config_changed "<version> <key>" (a shard channel of the
--          control slot: a script may publish to it on a Cluster).
-- Times    the engine's clock (TIME), the same for every writer.
local op = ARGV[2]
local values, counter, history = KEYS[1], KEYS[2], KEYS[3]
local channel = ARGV[1] .. 'live_config_changed'

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function version_of(record)
  if not record then return 0 end
  return tonumber(string.match(record, '^(%d+)\n'))
end

-- Record a change: the history entry (capped at `keep`) and the announcement.
local function change(key, version, kind, value, by, at, keep)
  redis.call('XADD', history, 'MAXLEN', '=', keep, '*', 'key', key, 'version', version,
    'op', kind, 'value', value, 'by', by, 'at', at)
  redis.call('SPUBLISH', channel, version .. ' ' .. key)
end

-- set: ARGV[3] key, [4] JSON value, [5] by, [6] history length, [7] expected
-- version ('' = any; '0' = the key must be unset). Returns {1, version, at} or,
-- when the expected version does not match, {0, the current version}.
if op == 'set' then
  local key = ARGV[3]
  local current = version_of(redis.call('HGET', values, key))
  if ARGV[7] ~= '' and tonumber(ARGV[7]) ~= current then return {0, current} end
  local version, at = redis.call('INCR', counter), now_ms()
  redis.call('HSET', values, key, version .. '\n' .. at .. '\n' .. ARGV[5] .. '\n' .. ARGV[4])
  change(key, version, 'set', ARGV[4], ARGV[5], at, ARGV[6])
  return {1, version, at}
end

-- delete: ARGV[3] key, [4] by, [5] history length, [6] expected version ('' = any).
-- Returns {1, version of the deletion}, {0, 0} if unset, {0, current} on a mismatch.
if op == 'delete' then
  local key = ARGV[3]
  local current = version_of(redis.call('HGET', values, key))
  if current == 0 then return {0, 0} end
  if ARGV[6] ~= '' and tonumber(ARGV[6]) ~= current then return {0, current} end
  local version, at = redis.call('INCR', counter), now_ms()
  redis.call('HDEL', values, key)
  change(key, version, 'delete', '', ARGV[4], at, ARGV[5])
  return {1, version}
end

-- read: {version, {key, record, key, record, ...}}, one consistent snapshot.
if op == 'read' then
  return {tonumber(redis.call('GET', counter) or '0'), redis.call('HGETALL', values)}
end

return redis.error_reply('config: unknown op ' .. tostring(op))
