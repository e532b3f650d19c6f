-- finish: record the outcomes of a batch of attempts and acknowledge their entries.
-- KEYS[1]  delayed (sorted set of scheduled retries)
-- ARGV     prefix, group, now_ms, retention_ms, then 8 fields per outcome:
--          queue, entry id, task id, attempt, fencing token, outcome, payload, due_ms
--          outcome: 'ok' (payload = msgpack result), 'retry' (payload = msgpack
--          ErrorInfo, due_ms = when to run again), 'dead' / 'failed' (payload =
--          ErrorInfo), 'cancelled', 'requeue' (a stopping node hands the task
--          back: queued again at once, this attempt not counted)
-- Touches  queue streams (XACK + XDEL: acknowledged entries are trimmed at once,
--          one call per stream for the whole batch), task:<id>, events:<id>,
--          reply inbox, delayed, dlq:<cap>
-- Rule     the first recorded result wins: an outcome whose fencing token is not
--          the task's current one, or for a task no longer running (finished
--          elsewhere, cancelled while queued, re-run after a takeover), is refused
--          and only counted as a duplicate in the record ('dups') and in the
--          namespace's stats hash ('duplicates:<capability>').
--          A task whose cancellation was requested while running ends 'cancelled'.
-- Returns  the number of outcomes recorded (duplicates excluded)
local group = ARGV[2]
local now = tonumber(ARGV[3])
local retention_ms = tonumber(ARGV[4])
local recorded = 0
local acks = {}  -- queue -> entry ids

-- Errors are kept as err:<n>, numbered across redrives, so no round overwrites
-- another's (the ErrorInfo inside names its attempt).
local function history_field(tk)
  return 'err:' .. redis.call('HINCRBY', tk, 'nerr', 1)
end

local function schedule(tk, id, due)
  redis.call('HSET', tk, 'status', 'scheduled', 'due', due)
  redis.call('ZADD', KEYS[1], due, id)
end

local function apply(id, attempt, token, outcome, payload, due)
  local tk = task_key(id)
  -- status, token, cancel, cap, reply, follow, prio
  local r = redis.call('HMGET', tk, 'status', 'token', 'cancel', 'cap', 'reply', 'follow', 'prio')
  if not r[1] then return end
  if r[1] ~= 'running' or r[2] ~= token then
    redis.call('HINCRBY', tk, 'dups', 1)
    redis.call('HINCRBY', prefix .. 'stats', 'duplicates:' .. (r[4] or '?'), 1)
    return
  end
  recorded = recorded + 1
  local rec = {r[5], r[6]}
  if r[3] == '1' or outcome == 'cancelled' then
    finish_task(id, 'cancelled', now, retention_ms, rec, '', {})
  elseif outcome == 'ok' then
    finish_task(id, 'succeeded', now, retention_ms, rec, payload, {'result', payload})
  elseif outcome == 'requeue' then
    -- handed back by a draining node: queued again at once, attempt not counted
    redis.call('HINCRBY', tk, 'attempts', -1)
    redis.call('HSET', tk, 'status', 'queued')
    redis.call('XADD', queue_key(r[4], r[7]), '*', 'id', id)
  elseif outcome == 'retry' then
    redis.call('HSET', tk, 'error', payload, history_field(tk), payload)
    schedule(tk, id, due)
  else
    local status = 'failed'
    if outcome == 'dead' then status = 'dead' end
    finish_task(id, status, now, retention_ms, rec, payload,
      {'error', payload, history_field(tk), payload})
    if status == 'dead' then
      local dk = dlq_key(r[4])
      redis.call('XADD', dk, 'MINID', '~', now - retention_ms, '*', 'id', id, 't', now)
      redis.call('PEXPIRE', dk, retention_ms)
    end
  end
end

for base = 5, #ARGV, 8 do
  local q = ARGV[base]
  local ids = acks[q]
  if not ids then
    ids = {}
    acks[q] = ids
  end
  ids[#ids + 1] = ARGV[base + 1]
  apply(ARGV[base + 2], ARGV[base + 3], ARGV[base + 4], ARGV[base + 5], ARGV[base + 6],
    tonumber(ARGV[base + 7]))
end
for q, ids in pairs(acks) do
  redis.call('XACK', q, group, unpack(ids))
  redis.call('XDEL', q, unpack(ids))
end
return recorded
