-- Shared helpers, prepended to every Shoal script by shoal.scripts.
-- Every key is built from the namespace prefix (ARGV[1]) so all keys of a
-- namespace share its hash tag, shoal:{ns}:, and one hash slot on Cluster.

local prefix = ARGV[1]

local function task_key(id) return prefix .. 'task:' .. id end
local function events_key(id) return prefix .. 'events:' .. id end
local function queue_key(cap, prio) return prefix .. 'queue:' .. cap .. ':' .. prio end
local function dlq_key(cap) return prefix .. 'dlq:' .. cap end
local function lease_key(agent_type, p) return prefix .. 'lease:' .. agent_type .. ':' .. p end

-- Whether `node` holds the partition's lease with `token` (each lease read once
-- per script call: a batch's turns share it).
local leases = {}
local function holds(node, agent_type, p, token)
  local lk = lease_key(agent_type, p)
  if leases[lk] == nil then leases[lk] = redis.call('GET', lk) or false end
  return leases[lk] == node .. ' ' .. token
end

-- Queue a task: a capability task into its capability's stream, a task addressed
-- to an agent ('mbox' and 'agent' set in its record) into that agent's mailbox.
local function enqueue(id, cap, prio, mbox, agent)
  if mbox and mbox ~= '' then
    redis.call('XADD', mbox, '*', 'k', 'task', 'i', id, 'a', agent)
  else
    redis.call('XADD', queue_key(cap, prio), '*', 'id', id)
  end
end

-- A capability's max_attempts and timeout, read once per script call.
local defaults = {}
local function capability_defaults(cap)
  local d = defaults[cap]
  if not d then
    d = redis.call('HMGET', prefix .. 'capability:' .. cap, 'max_attempts', 'timeout')
    defaults[cap] = d
  end
  return d
end

-- Inbox keys whose TTL this script already refreshed (once per key per call).
local refreshed = {}

-- Record the end of a task. `extra` holds field/value pairs to store with it
-- (the result or the error). Then:
--  * the record (and its event stream) expire after the retention period;
--  * the submitter's inbox gets '<id> <status> <result or error>', so a waiting
--    client learns the outcome without another round trip;
--  * a terminal 'done' event is appended to the event stream only if the stream
--    exists or a client follows the task ('follow' flag): a stream costs ~4 KB,
--    too much to create for every task just to say it ended.
-- `rec` = {reply, follow} as read by the caller; `payload` = result or error bytes.
local function finish_task(id, status, now, retention_ms, rec, payload, extra)
  local tk = task_key(id)
  -- Times come from the writers' clocks, which may step backwards or disagree
  -- between machines; a record's times never go backwards all the same.
  local t = redis.call('HMGET', tk, 'created', 'started')
  local finished = math.max(now, tonumber(t[2] or t[1] or now))
  redis.call('HSET', tk, 'status', status, 'finished', finished, unpack(extra))
  redis.call('PEXPIRE', tk, retention_ms)
  local ek = events_key(id)
  if rec[2] == '1' or redis.call('EXISTS', ek) == 1 then
    redis.call('XADD', ek, '*', 'k', 'done', 'd', cmsgpack.pack({status = status}), 't', now)
    redis.call('PEXPIRE', ek, retention_ms)
  end
  local reply = rec[1]
  if reply and reply ~= '' then
    redis.call('RPUSH', reply, id .. ' ' .. status .. ' ' .. (payload or ''))
    if not refreshed[reply] then
      -- A live client pops its inbox as entries arrive; the TTL only clears the
      -- inbox of a client that went away, so it is short (10 minutes).
      redis.call('PEXPIRE', reply, 600000)
      refreshed[reply] = true
    end
  end
end

-- Errors are kept as err:<n>, numbered across redrives, so no round overwrites
-- another's (the ErrorInfo inside names its attempt).
local function history_field(tk)
  return 'err:' .. redis.call('HINCRBY', tk, 'nerr', 1)
end

-- Record the outcome of a running task's attempt (the caller checked it may).
-- r = {status, token, cancel, cap, reply, follow, prio, mbox, agent} as read by
-- the caller; outcome as in finish.lua; delayed = the delayed set's key.
local function record_outcome(id, r, outcome, payload, due, now, retention_ms, delayed)
  local tk = task_key(id)
  local rec = {r[5], r[6]}
  if r[3] == '1' or outcome == 'cancelled' then
    finish_task(id, 'cancelled', now, retention_ms, rec, '', {})
  elseif outcome == 'ok' then
    finish_task(id, 'succeeded', now, retention_ms, rec, payload, {'result', payload})
  elseif outcome == 'requeue' then
    -- handed back by a draining node: queued again at once, attempt not counted
    redis.call('HINCRBY', tk, 'attempts', -1)
    redis.call('HSET', tk, 'status', 'queued')
    enqueue(id, r[4], r[7], r[8], r[9])
  elseif outcome == 'retry' then
    redis.call('HSET', tk, 'error', payload, history_field(tk), payload)
    redis.call('HSET', tk, 'status', 'scheduled', 'due', due)
    redis.call('ZADD', delayed, due, id)
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
