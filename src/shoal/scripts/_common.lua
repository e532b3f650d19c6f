-- Shared helpers, prepended to every Shoal script by shoal.scripts.
-- Every key is built from the namespace prefix (ARGV[1]) so all keys of a
-- namespace share its hash tag, shoal:{ns}:, and one hash slot on Cluster.

local prefix = ARGV[1]

local function task_key(id) return prefix .. 'task:' .. id end
local function events_key(id) return prefix .. 'events:' .. id end
local function queue_key(cap, prio) return prefix .. 'queue:' .. cap .. ':' .. prio end
local function dlq_key(cap) return prefix .. 'dlq:' .. cap end

-- Inbox keys whose TTL this script already refreshed (once per key per call).
local refreshed = {}

-- Record the end of a task. `extra` holds field/value pairs to store with it
-- (the result or the error). Then:
--  * the record (and its event stream) expire after the retention period;
--  * the submitter's inbox gets '<id> <status> <result or error>', so a waiting
--    client learns the outcome without another round trip;
--  * a terminal 'done' event is appended to the event stream only if the stream
--    exists or a client follows the task ('follow' flag): a stream costs ~4 KB,
--    too much to create for every task just to say it ended.
-- `rec` = {reply, follow} as read by the caller; `payload` = result or error bytes.
local function finish_task(id, status, now, retention_ms, rec, payload, extra)
  local tk = task_key(id)
  -- Times come from the writers' clocks, which may step backwards or disagree
  -- between machines; a record's times never go backwards all the same.
  local t = redis.call('HMGET', tk, 'created', 'started')
  local finished = math.max(now, tonumber(t[2] or t[1] or now))
  redis.call('HSET', tk, 'status', status, 'finished', finished, unpack(extra))
  redis.call('PEXPIRE', tk, retention_ms)
  local ek = events_key(id)
  if rec[2] == '1' or redis.call('EXISTS', ek) == 1 then
    redis.call('XADD', ek, '*', 'k', 'done', 'd', cmsgpack.pack({status = status}), 't', now)
    redis.call('PEXPIRE', ek, retention_ms)
  end
  local reply = rec[1]
  if reply and reply ~= '' then
    redis.call('RPUSH', reply, id .. ' ' .. status .. ' ' .. (payload or ''))
    if not refreshed[reply] then
      -- A live client pops its inbox as entries arrive; the TTL only clears the
      -- inbox of a client that went away, so it is short (10 minutes).
      redis.call('PEXPIRE', reply, 600000)
      refreshed[reply] = true
    end
  end
end
