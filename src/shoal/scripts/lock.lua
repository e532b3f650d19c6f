-- lock: a lock with fencing tokens (see shoal.coordination.lock).
-- KEYS[1]  lock:<name>       (string "<token> <holder>", PX the lock's ttl)
-- KEYS[2]  lock_fence:<name> (string: the last token handed out; never expires)
-- KEYS[3]  lock_wake:<name>  (list: one wake-up for the waiters, pushed on release)
-- ARGV     prefix (unused), op, then the op's arguments (below)
-- Tokens   INCR of lock_fence in the same script that sets the holder, so the
--          tokens of successive holders strictly increase, whatever the clocks.
-- Values   "<token> <holder> <nonce>": unique per acquisition (token and nonce):
--          renew and release compare the whole value, and a holder that lost the
--          lock (expired, then taken) can neither extend nor delete the next one.
local op = ARGV[2]
local lock, fence, wake = KEYS[1], KEYS[2], KEYS[3]

-- acquire: ARGV[3] the holder's id and the acquisition's nonce ("<holder> <nonce>"),
-- [4] ttl ms.
-- Returns {1, token} when taken, {0, ms until the holder's lease expires}.
if op == 'acquire' then
  local ttl = redis.call('PTTL', lock)
  if ttl ~= -2 then return {0, math.max(ttl, 0)} end
  local token = redis.call('INCR', fence)
  redis.call('SET', lock, token .. ' ' .. ARGV[3], 'PX', tonumber(ARGV[4]))
  return {1, token}
end

-- renew: ARGV[3] the holder's value, [4] ttl ms. Returns 1 if still held.
if op == 'renew' then
  if redis.call('GET', lock) ~= ARGV[3] then return 0 end
  redis.call('PEXPIRE', lock, tonumber(ARGV[4]))
  return 1
end

-- release: ARGV[3] the holder's value. Returns 1 if it was held and is now free;
-- then one waiter is woken (a stale wake-up only costs a waiter one look).
if op == 'release' then
  if redis.call('GET', lock) ~= ARGV[3] then return 0 end
  redis.call('DEL', lock, wake)
  redis.call('RPUSH', wake, '1')
  redis.call('PEXPIRE', wake, 10000)
  return 1
end

-- abandon: ARGV[3] "<holder> <nonce>" of an acquire whose caller was cancelled
-- while the script ran: if that acquire took the lock, free it (and wake a waiter),
-- as nobody would ever release or renew it. Returns 1 if it was freed.
if op == 'abandon' then
  local value = redis.call('GET', lock)
  local suffix = ' ' .. ARGV[3]
  if not value or string.sub(value, -#suffix) ~= suffix then return 0 end
  redis.call('DEL', lock, wake)
  redis.call('RPUSH', wake, '1')
  redis.call('PEXPIRE', wake, 10000)
  return 1
end

-- wake: a waiter gave up and may have taken the wake-up meant for the next one:
-- if the lock is free, push one. Returns 1 if it pushed.
if op == 'wake' then
  if redis.call('EXISTS', lock) == 1 then return 0 end
  redis.call('RPUSH', wake, '1')
  redis.call('PEXPIRE', wake, 10000)
  return 1
end

return redis.error_reply('lock: unknown op ' .. tostring(op))
