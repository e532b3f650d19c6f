-- fetch: read up to `count` new entries for a node, highest priority first, and
-- start them: mark each task running, count the attempt, return what the node needs.
-- KEYS     the queue streams to read, in priority order (all in the namespace's slot)
-- ARGV     prefix, group, consumer (node id), count, now_ms, retention_ms,
--          expired_error (msgpack ErrorInfo recorded for tasks past their deadline)
-- Touches  queue streams (XREADGROUP, XACK/XDEL of skipped entries), task:<id>,
--          capability:<cap> (read: max_attempts, timeout), events:<id> and the
--          reply inbox of tasks that expire here
-- Skips    entries whose task is gone, no longer queued (cancelled; duplicate entry)
--          or past its deadline (recorded as 'expired' and never run)
-- Returns  {started, consumed, last_ids}: started is a list of
--          {queue, entry id, task id, capability, args, attempt, max_attempts,
--          timeout, parent, traceparent}; consumed counts entries read (skipped
--          included); last_ids (only when nothing was read) holds each stream's
--          last generated id, so the node can block on XREAD from exactly there.
local group, consumer = ARGV[2], ARGV[3]
local remaining = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local retention_ms = tonumber(ARGV[6])
local expired_error = ARGV[7]
local started, consumed = {}, 0

local function drop(q, eid)
  redis.call('XACK', q, group, eid)
  redis.call('XDEL', q, eid)
end

-- A task option left empty takes the capability's default (published by nodes),
-- and the resolved value is written to the record so status shows it.
local function resolve(tk, field, cap, cap_field, default)
  local v = redis.call('HGET', tk, field)
  if v and v ~= '' then return v end
  v = redis.call('HGET', prefix .. 'capability:' .. cap, cap_field) or default
  redis.call('HSET', tk, field, v)
  return v
end

local function start(q, eid, id)
  local tk = task_key(id)
  local rec = redis.call('HMGET', tk, 'status', 'deadline', 'cap')
  if rec[1] ~= 'queued' then drop(q, eid); return end
  if rec[2] and rec[2] ~= '' and tonumber(rec[2]) < now then
    redis.call('HSET', tk, 'error', expired_error)
    finish_task(id, 'expired', now, retention_ms)
    drop(q, eid)
    return
  end
  local cap = rec[3]
  local max_att = resolve(tk, 'max_att', cap, 'max_attempts', '3')
  local timeout = resolve(tk, 'timeout', cap, 'timeout', '')
  local attempt = redis.call('HINCRBY', tk, 'attempts', 1)
  redis.call('HSET', tk, 'status', 'running', 'started', now, 'node', consumer)
  local more = redis.call('HMGET', tk, 'args', 'parent', 'trace')
  started[#started + 1] = {q, eid, id, cap, more[1], attempt, max_att, timeout, more[2], more[3]}
  remaining = remaining - 1
end

for _, q in ipairs(KEYS) do
  if remaining <= 0 then break end
  local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', remaining, 'STREAMS', q, '>')
  if res then
    for _, entry in ipairs(res[1][2]) do
      consumed = consumed + 1
      start(q, entry[1], entry[2][2])
    end
  end
end

local last_ids = {}
if consumed == 0 then
  for i, q in ipairs(KEYS) do
    last_ids[i] = '0-0'
    if redis.call('EXISTS', q) == 1 then
      local info = redis.call('XINFO', 'STREAM', q)
      for j = 1, #info, 2 do
        if info[j] == 'last-generated-id' then last_ids[i] = info[j + 1] end
      end
    end
  end
end
return {started, consumed, last_ids}
