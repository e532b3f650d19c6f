-- follow: declare that a client follows a task's events (or waits for it by them).
-- KEYS[1]  task:<id>
-- ARGV     prefix, task id
-- Effect   sets the record's 'follow' flag, so the task's end is written as a 'done'
--          event (finish_task skips that event for tasks nobody follows and that
--          emitted nothing, to save the ~4 KB a stream costs). A task that ended
--          before anyone followed it and has no stream gets its 'done' event now,
--          expiring with the record, so every follower sees the end the same way
--          (an SSE client reconnects until it has seen it). Does not create a
--          record for an unknown id.
-- Returns  the task's status, or false if there is no such task
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
redis.call('HSET', KEYS[1], 'follow', '1')
local final = {succeeded = true, failed = true, cancelled = true, dead = true, expired = true}
local ek = events_key(ARGV[2])
if final[status] and redis.call('EXISTS', ek) == 0 then
  local finished = redis.call('HGET', KEYS[1], 'finished') or '0'
  redis.call('XADD', ek, '*', 'k', 'done', 'd', cmsgpack.pack({status = status}), 't', finished)
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', ek, ttl) end
end
return status
