-- reap: declare a silent node dead and take its work over, once.
-- KEYS[1]  nodes (sorted set: node id -> last heartbeat ms)
-- ARGV     prefix, dead node id, now_ms, cutoff_ms (heartbeats older are dead),
--          group, retention_ms, died_error (msgpack ErrorInfo "node died while running"),
--          force ('1': the caller knows the node is gone — a restart under its name
--          found its pid dead — so its heartbeat's age does not matter)
-- Touches  nodes, dead_nodes, node:<id>, hosts:<cap>, active:<id>, agent_hosts:<type>,
--          queue:<cap>:<prio> (XPENDING of the dead consumer, XACK/XDEL, XADD, XGROUP DELCONSUMER), task:<id>,
--          events:<id>, reply inboxes, dlq:<cap>
-- Once     the node's entry in `nodes` is removed here, so of all survivors running
--          this script for the same node exactly one does the work; a node that
--          heartbeated again after the cutoff is left alone.
-- Effect   every entry the dead node had started is acknowledged and its task, if
--          still running there: re-queued (the attempt it used counts, with the
--          error "node died while running" in its history) or, at max_attempts,
--          moved to the dead-letter stream with that reason. A task whose
--          cancellation was asked ends 'cancelled'.
-- Returns  {requeued ids, dead-lettered ids}, or false if there was nothing to do
local id, now, cutoff = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local group, retention_ms, died_error = ARGV[5], tonumber(ARGV[6]), ARGV[7]
local nk = prefix .. 'node:' .. id
local score = redis.call('ZSCORE', KEYS[1], id)
if not score then return false end
if ARGV[8] ~= '1' then
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

local requeued, buried = {}, {}

local function take_over(q, eid, cap, prio)
  local entry = redis.call('XRANGE', q, eid, eid)
  redis.call('XACK', q, group, eid)
  redis.call('XDEL', q, eid)
  if #entry == 0 then return end
  local tid = entry[1][2][2]
  local tk = task_key(tid)
  local r = redis.call('HMGET', tk, 'status', 'node', 'attempts', 'max_att', 'cancel',
    'reply', 'follow')
  if r[1] ~= 'running' or r[2] ~= id then return end
  local err_field = 'err:' .. redis.call('HINCRBY', tk, 'nerr', 1)
  if r[5] == '1' then
    finish_task(tid, 'cancelled', now, retention_ms, {r[6], r[7]}, '', {})
  elseif tonumber(r[3]) >= tonumber(r[4] or '3') then
    finish_task(tid, 'dead', now, retention_ms, {r[6], r[7]}, died_error,
      {'error', died_error, err_field, died_error})
    local dk = dlq_key(cap)
    redis.call('XADD', dk, 'MINID', '~', now - retention_ms, '*', 'id', tid, 't', now)
    redis.call('PEXPIRE', dk, retention_ms)
    buried[#buried + 1] = tid
  else
    redis.call('HSET', tk, 'status', 'queued', 'error', died_error, err_field, died_error)
    redis.call('XADD', q, '*', 'id', tid)
    requeued[#requeued + 1] = tid
  end
end

local caps = redis.call('HGET', nk, 'capabilities') or ''
for cap in string.gmatch(caps, '[^,]+') do
  redis.call('ZREM', prefix .. 'hosts:' .. cap, id)
  for _, prio in ipairs({'high', 'normal', 'low'}) do
    local q = queue_key(cap, prio)
    if redis.call('EXISTS', q) == 1 then
      local pending = redis.call('XPENDING', q, group, '-', '+', 100000, id)
      for _, p in ipairs(pending) do take_over(q, p[1], cap, prio) end
      redis.call('XGROUP', 'DELCONSUMER', q, group, id)
    end
  end
end
return {requeued, buried}
