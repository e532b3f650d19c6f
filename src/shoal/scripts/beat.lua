-- beat: a node's heartbeat (sent from its heartbeat thread).
-- KEYS[1]  nodes (sorted set: node id -> last heartbeat ms)
-- ARGV     prefix, node id, now_ms, then field/value pairs of the node's load
--          (in_flight, free, cpu, rss, completed, ...)
-- Touches  nodes, node:<id>, hosts:<capability> for each capability it hosts,
--          agent_hosts:<type> for each agent type it hosts
-- Effect   records the heartbeat unless the node was declared dead meanwhile
--          (node:<id> state 'dead'): a node must not come back silently after a
--          survivor took its work over; it learns it was fenced and re-registers.
-- Returns  'ok', or 'dead' (nothing written)
local id, now = ARGV[2], tonumber(ARGV[3])
local nk = prefix .. 'node:' .. id
local info = redis.call('HMGET', nk, 'state', 'capabilities', 'agent_types')
if info[1] == 'dead' then return 'dead' end
if not info[1] then return 'unknown' end
redis.call('ZADD', KEYS[1], now, id)
for cap in string.gmatch(info[2] or '', '[^,]+') do
  redis.call('ZADD', prefix .. 'hosts:' .. cap, now, id)
end
for agent_type in string.gmatch(info[3] or '', '[^,]+') do
  redis.call('ZADD', prefix .. 'agent_hosts:' .. agent_type, now, id)
end
local fields = {'heartbeat', now}
for i = 4, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', nk, unpack(fields))
return 'ok'
