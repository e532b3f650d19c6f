-- lease: renew, acquire and release partition leases for one node, in one call.
-- KEYS[1]  lease_tokens (hash '<type>:<p>' -> last fencing token issued)
-- ARGV     prefix, node id, lease_ms, now_ms, then 4 fields per operation:
--          op ('renew' | 'acquire' | 'release'), agent type, partition, token
--          (the token the node holds; '' for acquire)
-- Touches  lease:<type>:<p> (string '<node> <token>', PX lease_ms), lease_tokens,
--          ownership (stream of changes, capped at about 10,000 entries)
-- Rules    renew/release act only on the node's own lease (same node, same
--          token): a lease that expired and went to another node stays theirs.
--          acquire takes a free partition only, with a token larger than any
--          issued before for it, so a late write by an earlier owner is refused.
-- Returns  one integer per operation: renew/release 1 (done) or 0 (not ours any
--          more); acquire the new token, or 0 (someone holds it)
local node, lease_ms, now = ARGV[2], tonumber(ARGV[3]), ARGV[4]
local out = {}

local function log_change(agent_type, p, event, token)
  redis.call('XADD', prefix .. 'ownership', 'MAXLEN', '~', 10000, '*',
    'type', agent_type, 'p', p, 'node', node, 'event', event, 'token', token, 't', now)
end

for base = 5, #ARGV, 4 do
  local op, agent_type, p, token = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local lk = lease_key(agent_type, p)
  local result = 0
  if op == 'acquire' then
    if redis.call('EXISTS', lk) == 0 then
      result = redis.call('HINCRBY', KEYS[1], agent_type .. ':' .. p, 1)
      redis.call('SET', lk, node .. ' ' .. result, 'PX', lease_ms)
      log_change(agent_type, p, 'acquired', result)
    end
  elseif redis.call('GET', lk) == node .. ' ' .. token then
    result = 1
    if op == 'renew' then
      redis.call('PEXPIRE', lk, lease_ms)
    else
      redis.call('DEL', lk)
      log_change(agent_type, p, 'released', token)
    end
  end
  out[#out + 1] = result
end
return out
