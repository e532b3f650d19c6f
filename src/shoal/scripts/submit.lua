-- submit: accept a batch of tasks for one capability with the same options.
-- KEYS[1]  delayed (sorted set; declared so the script routes to the namespace's slot)
-- ARGV     prefix, now_ms, retention_ms, default_queue_max,
--          capability, priority, max_attempts, timeout, deadline_ms, due_ms (0 = now),
--          reply inbox key, parent id, idempotency key (single-task batches only),
--          mailbox key and agent id (both '' for a capability task),
--          submitted_by (the gateway API key id that submitted it, '' for none),
--          then 3 fields per task: id, args (msgpack), traceparent
--          A task addressed to an agent goes into its partition's mailbox (bounded
--          by default_queue_max) instead of the capability's queue.
-- Touches  task:<id> (hash), queue:<cap>:<prio> (stream), delayed (due tasks),
--          idem:<key> (string), capability:<cap> (hash, read: queue_max),
--          stats (resubmits: calls that wrote nothing new), tasks (the group's
--          index of task ids for listing: a sorted set ordered by member, since ids
--          start with their creation time in hex; ids older than the retention
--          period are trimmed here)
-- Returns  {accepted, existing}: the first `accepted` tasks were queued (fewer than
--          the batch means the queue reached its bound: the rest were not written);
--          `existing` is the id of the task an idempotency key already named (then
--          nothing was written), else ''.
-- Retry    a task id that exists already is skipped and counted as accepted, so a
--          client may re-send a batch whose reply it lost (the ids are its own).
local now = tonumber(ARGV[2])
local retention_ms = tonumber(ARGV[3])
local cap, prio = ARGV[5], ARGV[6]
local due = tonumber(ARGV[10])
local idem = ARGV[13]

-- A call that writes nothing (an idempotency key found its task, or a re-sent batch
-- whose tasks all exist) still counts itself: the write puts this connection at the
-- end of the replication stream, so a WAIT after it (ack_replicas) covers the tasks
-- that an earlier call wrote — not only this connection's (empty) writes.
local function count_resubmit()
  redis.call('HINCRBY', prefix .. 'stats', 'resubmits', 1)
end

if idem ~= '' then
  local existing = redis.call('GET', prefix .. 'idem:' .. idem)
  if existing then
    count_resubmit()
    return {0, existing}
  end
end

local mbox, agent = ARGV[14], ARGV[15]
local q = queue_key(cap, prio)
local qmax = tonumber(redis.call('HGET', prefix .. 'capability:' .. cap, 'queue_max') or ARGV[4])
if mbox ~= '' then
  q = mbox
  qmax = tonumber(ARGV[4])
end
local room = qmax - redis.call('XLEN', q)

local status = 'queued'
if due > now then status = 'scheduled' end
-- The fields every task of the batch shares; empty options are not stored.
local common = {'cap', cap, 'prio', prio, 'status', status, 'attempts', 0, 'created', now}
local optional = {'max_att', 7, 'timeout', 8, 'deadline', 9, 'reply', 11, 'parent', 12, 'idem', 13,
  'mbox', 14, 'agent', 15, 'by', 16}
for i = 1, #optional, 2 do
  local value = ARGV[optional[i + 1]]
  if value ~= '' then
    common[#common + 1] = optional[i]
    common[#common + 1] = value
  end
end
if status == 'scheduled' then
  common[#common + 1] = 'due'
  common[#common + 1] = due
end
local n = #common

local accepted, written = 0, false
for base = 17, #ARGV, 3 do
  if room <= 0 then break end
  local id = ARGV[base]
  if redis.call('EXISTS', task_key(id)) == 0 then
    common[n + 1], common[n + 2] = 'args', ARGV[base + 1]
    common[n + 3], common[n + 4] = 'trace', ARGV[base + 2]
    redis.call('HSET', task_key(id), unpack(common))
    redis.call('ZADD', prefix .. 'tasks', 0, id)
    if status == 'scheduled' then
      redis.call('ZADD', KEYS[1], due, id)
    else
      enqueue(id, cap, prio, mbox, agent)
    end
    room = room - 1
    written = true
  end
  accepted = accepted + 1
end
if not written and accepted > 0 then count_resubmit() end
if written then
  redis.call('ZREMRANGEBYLEX', prefix .. 'tasks', '-', '(' .. string.format('%012x', now - retention_ms))
end
if idem ~= '' and accepted == 1 then
  redis.call('SET', prefix .. 'idem:' .. idem, ARGV[17], 'PX', retention_ms)
end
return {accepted, ''}
