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

local function apply(id, attempt, token, outcome, payload, due)
  local tk = task_key(id)
  local r = redis.call('HMGET', tk, 'status', 'token', 'cancel', 'cap', 'reply', 'follow', 'prio',
    'mbox', 'agent')
  if not r[1] then return end
  if r[1] ~= 'running' or r[2] ~= token then
    redis.call('HINCRBY', tk, 'dups', 1)
    redis.call('HINCRBY', prefix .. 'stats', 'duplicates:' .. (r[4] or '?'), 1)
    return
  end
  recorded = recorded + 1
  record_outcome(id, r, outcome, payload, due, now, retention_ms, KEYS[1])
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
