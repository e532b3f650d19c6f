-- follow: declare that a client follows a task's events (or waits for it by them).
-- KEYS[1]  task:<id>
-- ARGV     prefix
-- Effect   sets the record's 'follow' flag, so the task's end is written as a 'done'
--          event (finish_task skips that event for tasks nobody follows and that
--          emitted nothing, to save the ~4 KB a stream costs). Does not create a
--          record for an unknown id.
-- Returns  the task's status, or false if there is no such task
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return false end
redis.call('HSET', KEYS[1], 'follow', '1')
return status
