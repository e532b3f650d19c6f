-- events: append task events, refusing those of a stale attempt.
-- KEYS[1]  delayed (declared so the script routes to the namespace's slot)
-- ARGV     prefix, then 5 fields per event: task id, fencing token, kind, data, at_ms
-- Touches  task:<id> (read: token), events:<id>
-- Rule     an event whose token is not the task's current one comes from an attempt
--          that was superseded (its node was declared dead, or it was handed back):
--          it is dropped, so a follower never sees two runs interleaved.
-- Returns  the number of events refused
local refused = 0
local tokens = {}
for base = 2, #ARGV, 5 do
  local id = ARGV[base]
  local current = tokens[id]
  if current == nil then
    current = redis.call('HGET', task_key(id), 'token') or ''
    tokens[id] = current
  end
  if current == ARGV[base + 1] then
    redis.call('XADD', events_key(id), '*', 'k', ARGV[base + 2], 'd', ARGV[base + 3],
      't', ARGV[base + 4])
  else
    refused = refused + 1
  end
end
return refused
