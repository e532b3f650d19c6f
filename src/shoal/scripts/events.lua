-- events: append task events, refusing those of a stale attempt.
-- KEYS[1]  delayed (declared so the script routes to the namespace's slot)
-- ARGV     prefix, then 5 fields per event: task id, fencing token, kind, data, at_ms
-- Touches  task:<id> (read: token; usage.<name> counters), events:<id>
-- Rule     an event whose token is not the task's current one comes from an attempt
--          that was superseded (its node was declared dead, or it was handed back):
--          it is dropped, so a follower never sees two runs interleaved.
-- Usage    kind 'usage' is no event: its data (msgpack list name, value, name, value
--          ... as strings) is added to the record's usage.<name> counters (HINCRBY),
--          whatever the token — a superseded attempt's spending was real — but only
--          while the record exists (never recreating an expired one); a counter
--          that would overflow is refused, not raised (it would stall the recorder).
-- Returns  the number of events refused
local refused = 0
local tokens = {}

local function add_usage(id, data)
  local tk = task_key(id)
  if redis.call('EXISTS', tk) == 0 then return false end
  local fields = cmsgpack.unpack(data)
  local ok = true
  for i = 1, #fields, 2 do
    local reply = redis.pcall('HINCRBY', tk, 'usage.' .. fields[i], fields[i + 1])
    if type(reply) == 'table' and reply.err then ok = false end
  end
  return ok
end

local function add_event(id, token, kind, data, at)
  local current = tokens[id]
  if current == nil then
    current = redis.call('HGET', task_key(id), 'token') or ''
    tokens[id] = current
  end
  if current ~= token then return false end
  redis.call('XADD', events_key(id), '*', 'k', kind, 'd', data, 't', at)
  return true
end

for base = 2, #ARGV, 5 do
  local id, kind, data = ARGV[base], ARGV[base + 2], ARGV[base + 3]
  local written
  if kind == 'usage' then
    written = add_usage(id, data)
  else
    written = add_event(id, ARGV[base + 1], kind, data, ARGV[base + 4])
  end
  if not written then refused = refused + 1 end
end
return refused
