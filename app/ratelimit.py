"""MAIL_MAX_PER_SECOND: one send rate shared by every worker process, kept in Redis.

A provider's cap (e.g. 14 mails/s) holds for the whole fleet, so the count lives
in Redis, not in a process: a sliding log (a sorted set of the instants at which
permits were granted) checked and updated by one Lua script, on Redis's clock, so
the workers' clocks do not matter. A worker takes a permit right before each SMTP
send and sleeps, holding its job, until one is free.

The log allows at most `floor(rate)` sends in any window of `1 s + margin` (one
send per `1/rate + margin` seconds below 1/s), so no one-second window the
provider sees holds more than the limit even when network delay varies by up to
the margin between our permit and its receipt.
"""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from redis import Redis

KEY = "mq:ratelimit:smtp"
# Slack for the delay between our permit and the provider's receipt timestamp.
WINDOW_MARGIN = 0.05

# KEYS: the log. ARGV: permits per window, window seconds, a unique member.
# Returns 0 when a permit was taken, else the seconds to wait (as a string).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(window * 1000) + 1000)
  return 0
end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return tostring(tonumber(oldest[2]) + window - now)
"""


def window_for(rate: float) -> tuple[int, float]:
    """(permits, window seconds) that never exceed `rate` in any one-second window."""
    if rate >= 1:
        return math.floor(rate), 1.0 + WINDOW_MARGIN
    return 1, 1.0 / rate + WINDOW_MARGIN


class RateLimiter:
    """Blocks until the fleet-wide send rate allows one more mail."""

    def __init__(self, redis: Redis, rate: float) -> None:
        self.limit, self.window = window_for(rate)
        self._script: Any = redis.register_script(_ACQUIRE)

    def acquire(self) -> float:
        """Take one permit, sleeping as long as needed; return the seconds waited."""
        waited = 0.0
        while True:
            reply = self._script(keys=[KEY], args=[self.limit, self.window, uuid.uuid4().hex])
            wait = float(reply)
            if wait <= 0:
                return waited
            wait = min(max(wait, 0.001), self.window)
            time.sleep(wait)
            waited += wait
