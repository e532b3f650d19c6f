-- fetch: read up to `count` new entries for a node, highest priority first, and
-- start them: mark each task running, count the attempt, return what the node needs.
-- KEYS     the queue streams to read, in priority order (all in the namespace's slot)
-- ARGV     prefix, group, consumer (node id), count, now_ms, retention_ms,
--          expired_error (msgpack ErrorInfo recorded for tasks past their deadline),
--          then optionally n and n pairs capability, budget: at most `budget` tasks
--          of that capability start (its concurrency limit or rate; shoal.admission)
-- Touches  queue streams (XREADGROUP, XACK/XDEL of skipped entries), task:<id>,
--          capability:<cap> (read: max_attempts, timeout; a max_attempts taken from
--          it is marked max_att_d and read again at the next attempt), events:<id> and the
--          reply inbox of tasks that expire here
-- Skips    entries whose task is gone, no longer queued (cancelled; duplicate entry)
--          or past its deadline (recorded as 'expired' and never run)
-- Returns  {started, consumed, last_ids}: started is a list of
--          {queue, entry id, task id, capability, args, attempt, max_attempts,
--          timeout, parent, traceparent, fencing token, submitted_by}; consumed counts entries read (skipped
--          included); last_ids (only when nothing was read) holds each stream's
--          last generated id, so the node can block on XREAD from exactly there.
local group, consumer = ARGV[2], ARGV[3]
local remaining = tonumber(ARGV[4])
local now = tonumber(ARGV[5])
local retention_ms = tonumber(ARGV[6])
local expired_error = ARGV[7]
local started, consumed = {}, 0
local budgets = {}
for i = 1, tonumber(ARGV[8] or '0') do
  budgets[ARGV[7 + 2 * i]] = tonumber(ARGV[8 + 2 * i])
end

local function drop(q, eid)
  redis.call('XACK', q, group, eid)
  redis.call('XDEL', q, eid)
end

local function start(q, eid, id)
  local tk = task_key(id)
  -- status, deadline, cap, max_att, timeout, args, parent, trace, reply, follow, created,
  -- max_att_d ('1': max_att is the capability's default, written by an earlier attempt),
  -- by (the API key id it is charged to)
  local r = redis.call('HMGET', tk, 'status', 'deadline', 'cap', 'max_att', 'timeout',
    'args', 'parent', 'trace', 'reply', 'follow', 'created', 'max_att_d', 'by')
  if r[1] ~= 'queued' then drop(q, eid); return end
  if r[2] and tonumber(r[2]) < now then
    finish_task(id, 'expired', now, retention_ms, {r[9], r[10]}, expired_error,
      {'error', expired_error})
    drop(q, eid)
    return
  end
  local max_att, timeout = r[4], r[5]
  -- a default is read again at every attempt, so a live change of the capability's
  -- max_attempts reaches tasks already under way; a task's own option stays
  if r[12] == '1' then max_att = nil end
  -- never before it was created, even if this node's clock is behind the client's
  local started_at = math.max(now, tonumber(r[11] or now))
  local fields = {'status', 'running', 'started', started_at, 'node', consumer}
  if not max_att or not timeout then
    -- options the task left open take the capability's defaults; written to the
    -- record so its status shows them
    local d = capability_defaults(r[3])
    if not max_att then
      max_att = d[1] or '3'
      fields[#fields + 1], fields[#fields + 2] = 'max_att', max_att
      fields[#fields + 1], fields[#fields + 2] = 'max_att_d', '1'
    end
    if not timeout then
      timeout = d[2] or ''
      if timeout ~= '' then fields[#fields + 1], fields[#fields + 2] = 'timeout', timeout end
    end
  end
  local attempt = redis.call('HINCRBY', tk, 'attempts', 1)
  -- The fencing token grows with every delivery (attempts can go back down when a
  -- draining node hands a task back; the token never does). Outcomes and events
  -- carrying an older token are refused.
  local token = redis.call('HINCRBY', tk, 'token', 1)
  redis.call('HSET', tk, unpack(fields))
  started[#started + 1] = {q, eid, id, r[3], r[6], attempt, max_att, timeout,
    r[7] or '', r[8] or '', token, r[13] or ''}
  remaining = remaining - 1
  return true
end

for _, q in ipairs(KEYS) do
  if remaining <= 0 then break end
  -- the capability: the key is <prefix>queue:<capability>:<priority>
  local cap = string.match(string.sub(q, #prefix + 1), '^queue:(.+):[^:]+$')
  local count = math.min(remaining, budgets[cap] or remaining)
  if count > 0 then
    local res = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count, 'STREAMS', q, '>')
    if res then
      for _, entry in ipairs(res[1][2]) do
        consumed = consumed + 1
        if start(q, entry[1], entry[2][2]) and budgets[cap] then
          budgets[cap] = budgets[cap] - 1
        end
      end
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
