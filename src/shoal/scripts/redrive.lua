-- redrive: put dead-lettered tasks back into their queues with fresh attempts.
-- KEYS[1]  dlq:<cap>
-- ARGV     prefix, now_ms, then pairs of (dlq entry id, task id)
-- Touches  dlq:<cap>, task:<id>, queue:<cap>:<prio> or the task's mailbox, events:<id>
-- Effect   the record keeps its error history (err:<n> fields, numbered across
--          rounds) and its events; the attempt counter restarts, a deadline is
--          dropped, record and events no longer expire while queued, and a
--          'redriven' event marks the new start in the event stream.
-- Returns  the ids redriven (entries whose task is gone or no longer dead are removed)
local now = tonumber(ARGV[2])
local out = {}
for i = 3, #ARGV, 2 do
  local eid, id = ARGV[i], ARGV[i + 1]
  redis.call('XDEL', KEYS[1], eid)
  local tk = task_key(id)
  local rec = redis.call('HMGET', tk, 'status', 'cap', 'prio', 'mbox', 'agent')
  if rec[1] == 'dead' then
    local reply = redis.call('HGET', tk, 'reply')
    if reply and reply ~= '' then
      -- tell a client still waiting that its wait now goes through the event stream
      redis.call('RPUSH', reply, id .. ' redriven ')
    end
    redis.call('HSET', tk, 'status', 'queued', 'attempts', 0, 'reply', '')
    -- a deadline that made sense for the first run would expire it at once
    redis.call('HDEL', tk, 'finished', 'error', 'started', 'node', 'cancel', 'deadline')
    redis.call('PERSIST', tk)
    redis.call('XADD', events_key(id), '*', 'k', 'redriven', 'd', cmsgpack.pack({at = now}), 't', now)
    redis.call('PERSIST', events_key(id))
    enqueue(id, rec[2], rec[3], rec[4], rec[5])
    out[#out + 1] = id
  end
end
return out
