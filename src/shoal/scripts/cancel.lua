-- cancel: cancel a task wherever it is.
-- KEYS[1]  delayed
-- ARGV     prefix, task id, now_ms, retention_ms, cancel channel
-- Touches  task:<id>, delayed, events:<id>, reply inbox; publishes on the channel
-- Effect   scheduled or queued: ends 'cancelled' at once (a queued entry left in the
--          stream is skipped by fetch). running: marks 'cancel' and publishes the
--          id; the node running it cancels the handler and records 'cancelled'.
-- Returns  'cancelled', 'cancelling', 'missing', or 'already_<status>' for a task
--          that had ended before (e.g. 'already_succeeded')
local id, now, retention_ms = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local tk = task_key(id)
local r = redis.call('HMGET', tk, 'status', 'reply', 'follow')
local status = r[1]
if not status then return 'missing' end
if status == 'scheduled' or status == 'queued' then
  redis.call('ZREM', KEYS[1], id)
  redis.call('HDEL', tk, 'due')
  finish_task(id, 'cancelled', now, retention_ms, {r[2], r[3]}, '', {})
  return 'cancelled'
end
if status == 'running' then
  redis.call('HSET', tk, 'cancel', '1')
  redis.call('SPUBLISH', ARGV[5], id)  -- a shard channel of the task's slot
  return 'cancelling'
end
return 'already_' .. status
