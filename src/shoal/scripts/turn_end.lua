-- turn_end: commit a batch of agent turns, each only if its node still holds the
-- partition's lease (the fencing check that makes a stale owner's write harmless).
-- KEYS[1]  delayed (sorted set of scheduled retries)
-- ARGV     prefix, now_ms, retention_ms, node id, then 14 fields per turn:
--          agent type, partition, lease token, mailbox entry id ('' for none),
--          agent id, state op ('' unchanged | 'set' | 'delete'), state (msgpack),
--          task id ('' for a message), task outcome (as in finish.lua, or 'handback':
--          a draining node stopped it, it is queued again in place), payload,
--          due_ms, reply inbox ('' for none), correlation id, reply status
-- Touches  lease:<type>:<p> (read), state:<type>:<p>, mailbox:<type>:<p> (XDEL:
--          the message is processed), task:<id> and what finishing it touches,
--          the reply inbox, stats (stale_turns:<type>)
-- Rule     all of a turn's effects are written together or not at all: a turn of a
--          node that lost the lease writes nothing, so its message stays in the
--          mailbox for the new owner.
-- Returns  one integer per turn: 1 committed, 0 refused (lease lost)
local now, retention_ms, node = tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local out = {}

local function commit(a)
  local agent_type, p, token = a[1], a[2], a[3]
  if not holds(node, agent_type, p, token) then
    redis.call('HINCRBY', prefix .. 'stats', 'stale_turns:' .. agent_type, 1)
    return 0
  end
  local agent = a[5]
  local sk = prefix .. 'state:' .. agent_type .. ':' .. p
  if a[6] == 'set' then
    redis.call('HSET', sk, agent, a[7])
  elseif a[6] == 'delete' then
    redis.call('HDEL', sk, agent)
  end
  local id = a[8]
  if id ~= '' then
    local tk = task_key(id)
    local r = redis.call('HMGET', tk, 'status', 'token', 'cancel', 'cap', 'reply', 'follow',
      'prio', 'mbox', 'agent')
    if r[1] == 'running' and r[2] == token and a[9] == 'handback' then
      -- a draining node stopped it: queued again where it was (its mailbox entry is
      -- kept, so it keeps its place in the agent's order), the attempt not counted
      redis.call('HINCRBY', tk, 'attempts', -1)
      redis.call('HSET', tk, 'status', 'queued')
    elseif r[1] == 'running' and r[2] == token then
      record_outcome(id, r, a[9], a[10], tonumber(a[11]), now, retention_ms, KEYS[1])
    elseif r[1] then
      redis.call('HINCRBY', tk, 'dups', 1)
    end
  end
  local inbox = a[12]
  if inbox ~= '' then
    redis.call('RPUSH', inbox, a[13] .. ' ' .. a[14] .. ' ' .. a[10])
    if not refreshed[inbox] then
      redis.call('PEXPIRE', inbox, 600000)
      refreshed[inbox] = true
    end
  end
  if a[4] ~= '' then
    redis.call('XDEL', prefix .. 'mailbox:' .. agent_type .. ':' .. p, a[4])
  end
  return 1
end

for base = 5, #ARGV, 14 do
  out[#out + 1] = commit({unpack(ARGV, base, base + 13)})
end
return out
