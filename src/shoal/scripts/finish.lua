-- finish: record the outcomes of a batch of attempts and acknowledge their entries.
-- KEYS[1]  delayed (sorted set of scheduled retries)
-- ARGV     prefix, group, now_ms, retention_ms, then 7 fields per outcome:
--          queue, entry id, task id, attempt, outcome, payload, due_ms
--          outcome: 'ok' (payload = msgpack result), 'retry' (payload = msgpack
--          ErrorInfo, due_ms = when to run again), 'dead' / 'failed' (payload =
--          ErrorInfo), 'cancelled', 'requeue' (a stopping node hands the task
--          back: queued again at once, this attempt not counted)
-- Touches  queue streams (XACK + XDEL: acknowledged entries are trimmed at once),
--          task:<id>, events:<id>, reply inbox, delayed, dlq:<cap>
-- Rule     the first recorded result wins: an outcome for a task that is no longer
--          running this attempt (finished elsewhere, cancelled while queued, or
--          re-run after a takeover) only counts a duplicate in the record ('dups').
--          A task whose cancellation was requested while running ends 'cancelled'.
-- Returns  the number of outcomes recorded (duplicates excluded)
local group = ARGV[2]
local now = tonumber(ARGV[3])
local retention_ms = tonumber(ARGV[4])
local recorded = 0

local function record_error(tk, attempt, payload)
  redis.call('HSET', tk, 'error', payload, 'err:' .. attempt, payload)
end

local function apply(q, eid, id, attempt, outcome, payload, due)
  redis.call('XACK', q, group, eid)
  redis.call('XDEL', q, eid)
  local tk = task_key(id)
  local rec = redis.call('HMGET', tk, 'status', 'attempts', 'cancel', 'cap')
  if not rec[1] then return end
  if rec[1] ~= 'running' or rec[2] ~= attempt then
    redis.call('HINCRBY', tk, 'dups', 1)
    return
  end
  recorded = recorded + 1
  if rec[3] == '1' or outcome == 'cancelled' then
    finish_task(id, 'cancelled', now, retention_ms)
  elseif outcome == 'requeue' then
    redis.call('HINCRBY', tk, 'attempts', -1)
    redis.call('HSET', tk, 'status', 'scheduled', 'due', now)
    redis.call('ZADD', KEYS[1], now, id)
  elseif outcome == 'ok' then
    redis.call('HSET', tk, 'result', payload)
    finish_task(id, 'succeeded', now, retention_ms)
  elseif outcome == 'retry' then
    record_error(tk, attempt, payload)
    redis.call('HSET', tk, 'status', 'scheduled', 'due', due)
    redis.call('ZADD', KEYS[1], due, id)
  elseif outcome == 'dead' then
    record_error(tk, attempt, payload)
    finish_task(id, 'dead', now, retention_ms)
    redis.call('XADD', dlq_key(rec[4]), 'MINID', '~', now - retention_ms, '*', 'id', id, 't', now)
    redis.call('PEXPIRE', dlq_key(rec[4]), retention_ms)
  else
    record_error(tk, attempt, payload)
    finish_task(id, 'failed', now, retention_ms)
  end
end

for base = 5, #ARGV, 7 do
  apply(ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4],
    ARGV[base + 5], tonumber(ARGV[base + 6]))
end
return recorded
