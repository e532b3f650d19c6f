-- saga: the durable log of a saga and its summary record, changed together (see
-- shoal.coordination.saga). The log is the truth a runner resumes from; the record
-- is what list/show read at a glance (per-step status and task ids included, so a
-- listing never replays logs). One script writes both, so they never disagree.
-- KEYS[1]  saga:<id>      (hash: id, name, status, def, steps, created, updated,
--                          token, step, running, cancel, coordinator, error, and per
--                          step i: s<i> status, t<i> task id, c<i> compensation task,
--                          e<i> its failure, x<i> its compensation's (msgpack))
-- KEYS[2]  saga_log:<id>  (stream: one entry per transition: e event, s step,
--                          t task id, d msgpack detail, n node, at ms)
-- KEYS[3]  sagas          (sorted set: saga id -> created ms, for listing; an id
--                          leaves it only once its record has expired)
-- KEYS[4]  sagas_active   (sorted set: id -> created ms of every saga a runner must
--                          drive: not ended, not stuck in compensation_failed)
-- KEYS[5]  saga_wake      (stream: an entry per saga that needs a runner now)
-- ARGV     prefix (unused), op, retention_ms, then the op's arguments
-- Time     the engine's clock (TIME), for every process alike: `created` is also
--          where a saga's timeout counts from.
-- Terminal statuses: succeeded, compensated, cancelled (they take no more entries and
-- expire after the retention) and compensation_failed (no more entries either, and
-- kept until an operator retries it: op 'retry').
local op, retention = ARGV[2], tonumber(ARGV[3])
local record, log, index, active, wake = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local terminal = {succeeded = true, compensated = true, cancelled = true,
  compensation_failed = true}
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function append(event, step, task, detail, node)
  redis.call('XADD', log, '*', 'e', event, 's', step, 't', task, 'd', detail, 'n', node,
    'at', now)
end

local function wake_runners(id)
  redis.call('XADD', wake, 'MAXLEN', '~', 1000, '*', 'id', id)
end

-- now: the engine's clock (ms), so runners measure timeouts on one clock.
if op == 'now' then return now end

-- create: ARGV[4] id, [5] name, [6] definition (msgpack), [7] number of steps.
-- Returns 1, or 0 if a saga of this id exists.
if op == 'create' then
  if redis.call('EXISTS', record) == 1 then return 0 end
  redis.call('HSET', record, 'id', ARGV[4], 'name', ARGV[5], 'status', 'pending',
    'def', ARGV[6], 'steps', ARGV[7], 'created', now, 'updated', now, 'token', 0,
    'step', -1, 'running', '', 'cancel', '0', 'coordinator', '', 'error', '')
  append('created', '', '', '', '')
  redis.call('ZADD', index, now, ARGV[4])
  redis.call('ZADD', active, now, ARGV[4])
  wake_runners(ARGV[4])
  -- The listing index forgets ids whose record expired (terminal sagas, one
  -- retention after they ended); a bounded look per create.
  local old = redis.call('ZRANGEBYSCORE', index, '-inf', now - retention, 'LIMIT', 0, 50)
  local prefix = string.sub(record, 1, #record - #ARGV[4] - 5)  -- '<prefix>saga:'
  for _, id in ipairs(old) do
    if redis.call('EXISTS', prefix .. 'saga:' .. id) == 0 then redis.call('ZREM', index, id) end
  end
  return 1
end

local status = redis.call('HGET', record, 'status')
if not status then return {'missing', '0', now} end
local cancel = redis.call('HGET', record, 'cancel') or '0'

-- What a step's entry makes of the step in the record: its status, and which of its
-- task fields (t: the step's task, c: its compensation's) takes the entry's task id.
local step_effect = {
  step_submitting = {'running', 't'}, step_started = {'running', 't'},
  step_succeeded = {'succeeded', nil}, step_failed = {'failed', nil},
  step_unknown = {'unknown', nil}, step_not_run = {'pending', 't'},
  compensation_submitting = {'compensating', 'c'}, compensation_started = {'compensating', 'c'},
  compensation_succeeded = {'compensated', nil},
  compensation_failed = {'compensation_failed', nil},
}

-- log: ARGV[4] the runner's fencing token (of its lock on the saga), [5] node,
-- [6] new status ('' keeps it), [7] event, [8] step ('' none), [9] task id,
-- [10] detail, [11] running ('-' keeps it, '' clears it, else the forward step's
-- task id), [12] error text ('' keeps it, '-' clears it).
-- Refused: 'stale' when a runner with a larger token wrote already (a superseded
-- runner stops), 'ended' when the saga ended. Returns {outcome, cancel flag, now}.
if op == 'log' then
  if terminal[status] then return {'ended', cancel, now} end
  local token = tonumber(ARGV[4])
  if token < tonumber(redis.call('HGET', record, 'token') or '0') then
    return {'stale', cancel, now}
  end
  append(ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[5])
  redis.call('HSET', record, 'token', token, 'updated', now, 'coordinator', ARGV[5])
  if ARGV[6] ~= '' then redis.call('HSET', record, 'status', ARGV[6]) end
  if ARGV[8] ~= '' then
    local effect = step_effect[ARGV[7]]
    if effect then
      redis.call('HSET', record, 's' .. ARGV[8], effect[1])
      if effect[2] then redis.call('HSET', record, effect[2] .. ARGV[8], ARGV[9]) end
    end
    -- why a step or its compensation failed (msgpack), for listings
    local event = ARGV[7]
    if event == 'step_failed' or event == 'step_unknown' then
      redis.call('HSET', record, 'e' .. ARGV[8], ARGV[10])
    elseif event == 'compensation_failed' then
      redis.call('HSET', record, 'x' .. ARGV[8], ARGV[10])
    elseif event == 'compensation_submitting' then
      redis.call('HDEL', record, 'x' .. ARGV[8])
    end
    if string.sub(ARGV[7], 1, 5) == 'step_' then redis.call('HSET', record, 'step', ARGV[8]) end
  end
  if ARGV[11] ~= '-' then redis.call('HSET', record, 'running', ARGV[11]) end
  if ARGV[12] == '-' then redis.call('HSET', record, 'error', '')
  elseif ARGV[12] ~= '' then redis.call('HSET', record, 'error', ARGV[12]) end
  if terminal[ARGV[6]] then
    redis.call('HSET', record, 'running', '')
    redis.call('ZREM', active, redis.call('HGET', record, 'id'))
    if ARGV[6] ~= 'compensation_failed' then
      redis.call('PEXPIRE', record, retention)
      redis.call('PEXPIRE', log, retention)
    end
  end
  return {'ok', cancel, now}
end

-- cancel: ask the saga's runner to stop and roll back. Returns {'cancelling', the
-- running forward step's task id or ''}, or {'already_<status>', ''}.
if op == 'cancel' then
  if terminal[status] then return {'already_' .. status, ''} end
  if cancel ~= '1' then
    redis.call('HSET', record, 'cancel', '1', 'updated', now)
    append('cancel_requested', '', '', '', '')
  end
  return {'cancelling', redis.call('HGET', record, 'running') or ''}
end

-- retry: an operator's retry of a saga stuck in compensation_failed: it is
-- compensating again (its failed compensation runs again, then the earlier ones)
-- and a runner picks it up. Returns 'retrying' or 'not_stuck:<status>'.
if op == 'retry' then
  if status ~= 'compensation_failed' then return 'not_stuck:' .. status end
  redis.call('HSET', record, 'status', 'compensating', 'updated', now, 'error', '')
  append('compensation_retry', '', '', '', '')
  local id = redis.call('HGET', record, 'id')
  redis.call('ZADD', active, redis.call('HGET', record, 'created'), id)
  wake_runners(id)
  return 'retrying'
end

return redis.error_reply('saga.lua: unknown op ' .. tostring(op))
