-- submit: accept a batch of tasks atomically per task.
-- KEYS[1]  delayed (sorted set; declared so the script routes to the namespace's slot)
-- ARGV     prefix, now_ms, retention_ms, default_queue_max, then 12 fields per task:
--          id, capability, priority, args, max_attempts, timeout, deadline_ms,
--          due_ms (0 = now), idempotency key, reply inbox key, parent id, traceparent
-- Touches  task:<id> (hash), queue:<cap>:<prio> (stream), idem:<key> (string),
--          capability:<cap> (hash, read: queue_max)
-- Returns  one {id, outcome} per task; outcome 'new', 'dup' (idempotency key seen,
--          id is the existing task) or 'full' (queue at its bound, nothing written)
local now = tonumber(ARGV[2])
local retention_ms = tonumber(ARGV[3])
local default_qmax = tonumber(ARGV[4])
local out = {}

local function submit_one(base)
  local id, cap, prio = ARGV[base], ARGV[base + 1], ARGV[base + 2]
  local idem = ARGV[base + 8]
  if idem ~= '' then
    local existing = redis.call('GET', prefix .. 'idem:' .. idem)
    if existing then return {existing, 'dup'} end
  end
  local q = queue_key(cap, prio)
  local qmax = tonumber(redis.call('HGET', prefix .. 'capability:' .. cap, 'queue_max') or default_qmax)
  if redis.call('XLEN', q) >= qmax then return {id, 'full'} end
  local due = tonumber(ARGV[base + 7])
  local status = 'queued'
  if due > now then status = 'scheduled' end
  local tk = task_key(id)
  redis.call('HSET', tk, 'cap', cap, 'prio', prio, 'args', ARGV[base + 3], 'status', status,
    'attempts', 0, 'max_att', ARGV[base + 4], 'timeout', ARGV[base + 5],
    'deadline', ARGV[base + 6], 'created', now, 'reply', ARGV[base + 9],
    'parent', ARGV[base + 10], 'trace', ARGV[base + 11], 'idem', idem)
  if status == 'scheduled' then
    redis.call('HSET', tk, 'due', due)
    redis.call('ZADD', KEYS[1], due, id)
  else
    redis.call('XADD', q, '*', 'id', id)
  end
  if idem ~= '' then
    redis.call('SET', prefix .. 'idem:' .. idem, id, 'PX', retention_ms)
  end
  return {id, 'new'}
end

local n = (#ARGV - 4) / 12
for i = 0, n - 1 do
  out[#out + 1] = submit_one(5 + i * 12)
end
return out
