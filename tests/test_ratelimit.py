"""MAIL_MAX_PER_SECOND: the fleet-wide limiter against a real Redis.

Two workers sharing it end to end are in tests/faults/test_rate_limit.py.
"""

from __future__ import annotations

import time

import pytest
from flask import Flask
from redis import Redis

from app.ratelimit import KEY, WINDOW_MARGIN, RateLimiter, window_for
from app.smtp import get_mailer


@pytest.mark.parametrize(
    ("rate", "permits", "window"),
    [(14, 14, 1.0), (14.9, 14, 1.0), (1, 1, 1.0), (0.5, 1, 2.0), (0.25, 1, 4.0)],
)
def test_window_never_exceeds_the_rate(rate: float, permits: int, window: float) -> None:
    assert window_for(rate) == (permits, pytest.approx(window + WINDOW_MARGIN))


def test_permits_are_shared_by_every_limiter(redis_client: Redis) -> None:
    first, second = RateLimiter(redis_client, 4), RateLimiter(redis_client, 4)
    started = time.monotonic()
    waits = [limiter.acquire() for limiter in (first, second, first, second)]
    assert waits == [0.0] * 4
    assert time.monotonic() - started < 0.5
    waited = second.acquire()  # the fifth in the window waits for the first to leave it
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed <= 1.0 + WINDOW_MARGIN + 0.3
    assert waited > 0.5
    assert redis_client.zcard(KEY) <= 4
    assert 0 < redis_client.pttl(KEY) <= 3000  # the log cleans itself up


def test_no_limit_no_redis_round_trip(app: Flask, redis_client: Redis) -> None:
    assert app.config["MAIL_MAX_PER_SECOND"] is None
    assert get_mailer(app)._rate is None
