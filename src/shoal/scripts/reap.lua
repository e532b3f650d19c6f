-- reap: declare a silent node dead, once (control keys; claim.lua then takes its
-- started tasks over in each key group).
-- KEYS[1]  nodes (sorted set: node id -> last heartbeat ms)
-- ARGV     prefix (control), dead node id, now_ms, cutoff_ms (heartbeats older are
--          dead), force ('1': the caller knows the node is gone — a restart under
--          its name found its pid dead — so its heartbeat's age does not matter)
-- Touches  nodes, dead_nodes, node:<id>, hosts:<cap>, active:<id>, agent_hosts:<type>
-- Once     the node's entry in `nodes` is removed here, so of all survivors running
--          this script for the same node exactly one declares it dead; a node that
--          heartbeated again after the cutoff is left alone.
-- Returns  the dead node's capabilities ('a,b,c'), or false if it was not reaped
local id, now, cutoff = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local nk = prefix .. 'node:' .. id
local score = redis.call('ZSCORE', KEYS[1], id)
if not score then return false end
if ARGV[5] ~= '1' then
  -- A node is judged by the longer of the reaper's dead_after and its own.
  local theirs = tonumber(redis.call('HGET', nk, 'dead_after') or '0') or 0
  if theirs > 0 then cutoff = math.min(cutoff, now - theirs * 1000) end
  if tonumber(score) > cutoff then return false end
end
redis.call('ZREM', KEYS[1], id)
redis.call('HSET', nk, 'state', 'dead', 'died', now)
redis.call('PEXPIRE', nk, 3600000)
redis.call('ZADD', prefix .. 'dead_nodes', now, id)
redis.call('ZREMRANGEBYSCORE', prefix .. 'dead_nodes', '-inf', now - 3600000)
-- Its agents are no longer active anywhere (their partitions' leases expire by
-- themselves; survivors acquire them then).
redis.call('DEL', prefix .. 'active:' .. id)
for agent_type in string.gmatch(redis.call('HGET', nk, 'agent_types') or '', '[^,]+') do
  redis.call('ZREM', prefix .. 'agent_hosts:' .. agent_type, id)
end

local caps = redis.call('HGET', nk, 'capabilities') or ''
for cap in string.gmatch(caps, '[^,]+') do
  redis.call('ZREM', prefix .. 'hosts:' .. cap, id)
end
return caps
