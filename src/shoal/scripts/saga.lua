-- saga: the durable log of a saga and its summary record, changed together (see
-- shoal.coordination.saga). The log is the truth a coordinator resumes from; the
-- record is what list/show read at a glance. One script writes both, so they
-- never disagree.
-- KEYS[1]  saga:<id>      (hash: id, name, status, def, created, updated, token,
--                          step, running, cancel, coordinator, error)
-- KEYS[2]  saga_log:<id>  (stream: one entry per transition: e event, s step,
--                          t task id, d msgpack detail, n node, at ms)
-- KEYS[3]  sagas          (sorted set: saga id -> created ms; trimmed to retention)
-- ARGV     prefix (unused), op, now_ms, retention_ms, then the op's arguments
-- Terminal statuses: succeeded, compensated, cancelled, compensation_failed; a saga
-- that reached one takes no more entries, and expires after the retention.
local op, now, retention = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local record, log, index = KEYS[1], KEYS[2], KEYS[3]
local terminal = {succeeded = true, compensated = true, cancelled = true,
  compensation_failed = true}

local function append(event, step, task, detail, node)
  redis.call('XADD', log, '*', 'e', event, 's', step, 't', task, 'd', detail, 'n', node,
    'at', now)
end

-- create: ARGV[5] id, [6] name, [7] definition (msgpack), [8] number of steps.
-- Returns 1, or 0 if a saga of this id exists.
if op == 'create' then
  if redis.call('EXISTS', record) == 1 then return 0 end
  redis.call('HSET', record, 'id', ARGV[5], 'name', ARGV[6], 'status', 'pending',
    'def', ARGV[7], 'steps', ARGV[8], 'created', now, 'updated', now, 'token', 0,
    'step', -1, 'running', '', 'cancel', '0', 'coordinator', '', 'error', '')
  append('created', '', '', '', '')
  redis.call('ZADD', index, now, ARGV[5])
  redis.call('ZREMRANGEBYSCORE', index, '-inf', now - retention)
  return 1
end

local status = redis.call('HGET', record, 'status')
if not status then return {'missing', '0'} end

-- log: ARGV[5] the coordinator's fencing token, [6] new status ('' keeps it),
-- [7] event, [8] step ('' none), [9] task id, [10] detail, [11] node,
-- [12] running ('-' keeps it, '' clears it, else the forward step's task id),
-- [13] error text ('' keeps it).
-- Refused ('stale') when a later coordinator (a larger token) wrote already: a
-- superseded run stops. Returns {'ok'|'stale'|'ended', cancel flag}.
if op == 'log' then
  local cancel = redis.call('HGET', record, 'cancel') or '0'
  if terminal[status] then return {'ended', cancel} end
  local token = tonumber(ARGV[5])
  if token < tonumber(redis.call('HGET', record, 'token') or '0') then
    return {'stale', cancel}
  end
  append(ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11])
  redis.call('HSET', record, 'token', token, 'updated', now)
  if ARGV[6] ~= '' then redis.call('HSET', record, 'status', ARGV[6]) end
  if ARGV[8] ~= '' then redis.call('HSET', record, 'step', ARGV[8]) end
  if ARGV[12] ~= '-' then redis.call('HSET', record, 'running', ARGV[12]) end
  if ARGV[13] ~= '' then redis.call('HSET', record, 'error', ARGV[13]) end
  if terminal[ARGV[6]] then
    redis.call('HSET', record, 'running', '')
    redis.call('PEXPIRE', record, retention)
    redis.call('PEXPIRE', log, retention)
  end
  return {'ok', cancel}
end

-- coordinator: ARGV[5] the coordinator task's id (set once, by the starter).
if op == 'coordinator' then
  redis.call('HSET', record, 'coordinator', ARGV[5])
  return {'ok', '0'}
end

-- cancel: ask the coordinator to stop and roll back. Returns {'cancelling', the
-- running forward step's task id or ''}, or {'already_<status>', ''}.
if op == 'cancel' then
  if terminal[status] then return {'already_' .. status, ''} end
  if redis.call('HGET', record, 'cancel') ~= '1' then
    redis.call('HSET', record, 'cancel', '1', 'updated', now)
    append('cancel_requested', '', '', '', '')
  end
  return {'cancelling', redis.call('HGET', record, 'running') or ''}
end

return redis.error_reply('saga.lua: unknown op ' .. tostring(op))
