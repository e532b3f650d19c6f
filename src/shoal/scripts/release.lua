-- release: move due scheduled tasks (delays and retry back-offs) into their queues.
-- KEYS[1]  delayed (sorted set: task id -> due ms)
-- ARGV     prefix, now_ms, limit
-- Touches  delayed, task:<id>, queue:<cap>:<prio> or the task's mailbox
-- Safety   ZREM inside the script makes each release happen once, whichever node
--          runs it and however many run it at the same time. A task cancelled
--          meanwhile is dropped from the set and not queued. Released tasks bypass
--          the queue bound: they were accepted when submitted.
-- Returns  {released count, next due ms or -1}
local now = tonumber(ARGV[2])
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local released = 0
for _, id in ipairs(due) do
  redis.call('ZREM', KEYS[1], id)
  local tk = task_key(id)
  local rec = redis.call('HMGET', tk, 'status', 'cap', 'prio', 'mbox', 'agent')
  if rec[1] == 'scheduled' then
    redis.call('HSET', tk, 'status', 'queued')
    redis.call('HDEL', tk, 'due')
    enqueue(id, rec[2], rec[3], rec[4], rec[5])
    released = released + 1
  end
end
local nxt = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #nxt == 0 then return {released, -1} end
return {released, tonumber(nxt[2])}
