"""The mail record's Lua scripts (app/status.py sends them): each changes a record, its
lease, the failed index, the stats and the attachment bytes in one atomic step.

Kept apart from app/status.py so that the record's Python API and what runs inside
Redis each read in one place (and neither module grows past a screenful or two).
Imports only app/scripts.py's suppression step: it sits below app/status.py.
"""

from __future__ import annotations

from app.scripts import HELD_RECIPIENTS

# KEYS: record, lease. ARGV: field/value pairs. Never creates a purged record.
UPDATE_IF_EXISTS = """
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
  return 1
end
return 0
"""

# KEYS: record, lease, suppression list. ARGV: lease seconds, now, TTL for a created record
# (0: none), then the field/value pairs of a record to create when it is missing (optional).
# A `go` also returns the record's suppressed recipients (HELD_RECIPIENTS).
BEGIN_ATTEMPT = (
    """
if redis.call('EXISTS', KEYS[1]) == 0 then
  if #ARGV < 4 then return {'missing', false} end
  redis.call('HSET', KEYS[1], unpack(ARGV, 4))
  if tonumber(ARGV[3]) > 0 then redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3])) end
end
if redis.call('HGET', KEYS[1], 'status') == 'sent' then
  return {'sent', redis.call('HGETALL', KEYS[1])}
end
if not redis.call('SET', KEYS[2], '1', 'NX', 'EX', tonumber(ARGV[1])) then
  return {'busy', redis.call('HGETALL', KEYS[1])}
end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'status', 'sending', 'updated_at', ARGV[2])
"""
    + HELD_RECIPIENTS
    + """
return {'go', redis.call('HGETALL', KEYS[1]), held}
"""
)

# KEYS: record, lease, failed index, stats, attachment bytes. ARGV: mail id, retention TTL,
# failed-at timestamp ('' unless failed: then in the failed index, else out of it), stats
# counter to increment ('' for none), then the field/value pairs. Never re-creates a purged
# record. The attachment bytes go: the mail is sent or has failed for good.
FINISH = """
redis.call('DEL', KEYS[2], KEYS[5])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
end
if ARGV[3] ~= '' then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
else
  redis.call('ZREM', KEYS[3], ARGV[1])
end
if ARGV[4] ~= '' then redis.call('HINCRBY', KEYS[4], ARGV[4], 1) end
return 1
"""

# KEYS: record, lease, failed index, stats, attachment bytes. ARGV: status, reason, now, ttl,
# now as a timestamp.
# Final states are never overwritten: `sent` is the de-duplication mark.
SETTLE_IF_LIVE = """
local current = redis.call('HGET', KEYS[1], 'status')
if not current or current == 'sent' or current == 'failed' then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'last_error', ARGV[2], 'updated_at', ARGV[3])
local template = redis.call('HGET', KEYS[1], 'template') or ''
if ARGV[1] == 'failed' then
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
  redis.call('ZADD', KEYS[3], ARGV[5], redis.call('HGET', KEYS[1], 'id'))
  redis.call('DEL', KEYS[5])
  redis.call('HINCRBY', KEYS[4], 'failed:' .. template, 1)
else
  redis.call('HINCRBY', KEYS[4], 'retried:' .. template, 1)
end
return {template, redis.call('HGET', KEYS[1], 'attempts') or '0'}
"""
