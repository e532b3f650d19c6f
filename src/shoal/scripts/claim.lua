-- claim: take over the tasks a dead node had started in one key group.
-- KEYS[1]  delayed (declared so the script routes to the group's slot)
-- ARGV     prefix (the group's), dead node id, now_ms, consumer group, retention_ms,
--          died_error (msgpack ErrorInfo "node died while running"), capabilities
--          of the dead node ('a,b,c')
-- Touches  queue:<cap>:<prio> (XPENDING of the dead consumer, XACK/XDEL, XADD,
--          XGROUP DELCONSUMER), task:<id>, events:<id>, reply inboxes, dlq:<cap>
-- Effect   every entry the dead node had started is acknowledged and its task, if
--          still running there: re-queued (the attempt it used counts, with the
--          error "node died while running" in its history) or, at max_attempts,
--          moved to the dead-letter stream with that reason. A task whose
--          cancellation was asked ends 'cancelled'.
-- Once     entries are acknowledged as they are taken over, so running this again
--          (a second survivor, or the sweep after a reaper died half way) finds
--          nothing left to do.
-- Returns  {requeued ids, dead-lettered ids}
local id, now = ARGV[2], tonumber(ARGV[3])
local group, retention_ms, died_error = ARGV[4], tonumber(ARGV[5]), ARGV[6]
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

for cap in string.gmatch(ARGV[7], '[^,]+') do
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
