-- send: append a message to an agent's mailbox unless the mailbox is full.
-- KEYS[1]  mailbox:<type>:<p>
-- ARGV     (unused), bound (most entries the mailbox may hold), then field/value pairs
-- Returns  the entry id, or false when the mailbox is at its bound (nothing written)
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[2]) then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
