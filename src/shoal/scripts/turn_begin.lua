-- turn_begin: start addressed tasks read from a partition's mailbox.
-- ARGV     prefix, now_ms, retention_ms, expired_error (msgpack ErrorInfo), node id,
--          then 4 fields per task: agent type, partition, lease token, task id
-- Touches  task:<id>, capability:<cap> (read), events:<id>/reply inbox/dlq of
--          tasks that end here
-- Rules    only the partition's lease holder starts its tasks (else 'stale').
--          A task runs if it is queued, or if it is 'running' under an older lease
--          token: its node died mid-turn and this is the re-delivery (attempt
--          counted; on its last attempt it is dead-lettered instead, as a task
--          whose node died). Cancelled-while-running ends 'cancelled'; past its
--          deadline ends 'expired'; anything else (finished, cancelled) is skipped.
--          Running under this node's current token means this call is a repeat
--          (its reply was lost): it runs again, the attempt not counted twice.
-- Returns  per task {verdict, capability, args, attempt, max_attempts, timeout,
--          parent, traceparent, submitted_by}; verdict 'run', 'skip' or 'stale'
local now, retention_ms, expired_error, node = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local died = cmsgpack.pack({type = 'shoal.errors.NodeDied',
  message = 'node died while running the task', traceback = '', attempt = 0, node = '', at = now})
local out = {}

local function begin(agent_type, p, token, id)
  if not holds(node, agent_type, p, token) then return {'stale'} end
  local tk = task_key(id)
  local r = redis.call('HMGET', tk, 'status', 'deadline', 'cap', 'max_att', 'timeout', 'args',
    'parent', 'trace', 'reply', 'follow', 'created', 'token', 'cancel', 'attempts', 'prio',
    'mbox', 'agent', 'node', 'by')
  local rec = {r[9], r[10]}
  if r[1] == 'running' and r[12] == token and r[18] == node then
    -- already started by this very turn: the reply was lost and the call repeated
    -- (a connection retry); start it again without counting another attempt
    return {'run', r[3], r[6], tonumber(r[14]), r[4], r[5] or '', r[7] or '', r[8] or '',
      r[19] or ''}
  end
  local redelivered = r[1] == 'running' and tonumber(r[12] or '0') < tonumber(token)
  if r[1] ~= 'queued' and not redelivered then return {'skip'} end
  if r[13] == '1' then
    finish_task(id, 'cancelled', now, retention_ms, rec, '', {})
    return {'skip'}
  end
  if r[2] and tonumber(r[2]) < now and not redelivered then
    finish_task(id, 'expired', now, retention_ms, rec, expired_error, {'error', expired_error})
    return {'skip'}
  end
  local d = capability_defaults(r[3])
  local max_att = r[4] or d[1] or '3'
  local timeout = r[5] or d[2] or ''
  if redelivered and tonumber(r[14] or '0') >= tonumber(max_att) then
    record_outcome(id, {r[1], r[12], r[13], r[3], r[9], r[10], r[15], r[16], r[17]}, 'dead',
      died, 0, now, retention_ms, prefix .. 'delayed')
    return {'skip'}
  end
  if redelivered then
    -- the attempt its dead node used counts, with that reason in the error history
    redis.call('HSET', tk, 'error', died, history_field(tk), died)
  end
  local attempt = redis.call('HINCRBY', tk, 'attempts', 1)
  local started = math.max(now, tonumber(r[11] or now))
  redis.call('HSET', tk, 'status', 'running', 'started', started, 'node', node, 'token', token,
    'max_att', max_att)
  return {'run', r[3], r[6], attempt, max_att, timeout, r[7] or '', r[8] or '', r[19] or ''}
end

for base = 6, #ARGV, 4 do
  out[#out + 1] = begin(ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3])
end
return out
