-- Shared helpers, prepended to every Shoal script by shoal.scripts.
-- Every key is built from the namespace prefix (ARGV[1]) so all keys of a
-- namespace share its hash tag, shoal:{ns}:, and one hash slot on Cluster.

local prefix = ARGV[1]

local function task_key(id) return prefix .. 'task:' .. id end
local function events_key(id) return prefix .. 'events:' .. id end
local function queue_key(cap, prio) return prefix .. 'queue:' .. cap .. ':' .. prio end
local function dlq_key(cap) return prefix .. 'dlq:' .. cap end

-- Record the end of a task: status, finish time, retention TTL on the record and
-- its events, a terminal 'done' event, and a wake-up in the submitter's inbox.
-- The inbox entry carries the outcome ('<id> <status> <result or error bytes>'),
-- so a waiting client needs no further round trip to read it.
local function finish_task(id, status, now, retention_ms)
  local tk = task_key(id)
  redis.call('HSET', tk, 'status', status, 'finished', now)
  redis.call('HDEL', tk, 'due')
  redis.call('PEXPIRE', tk, retention_ms)
  local ek = events_key(id)
  redis.call('XADD', ek, '*', 'k', 'done', 'd', cmsgpack.pack({status = status}), 't', now)
  redis.call('PEXPIRE', ek, retention_ms)
  local rec = redis.call('HMGET', tk, 'reply', 'result', 'error')
  local reply = rec[1]
  if reply and reply ~= '' then
    local payload = rec[3] or ''
    if status == 'succeeded' then payload = rec[2] or '' end
    redis.call('RPUSH', reply, id .. ' ' .. status .. ' ' .. payload)
    redis.call('PEXPIRE', reply, retention_ms)
  end
end
