"""Preview: a subscriber's next digest rendered from what is pending, claiming nothing."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from app.digests.claims import _decode_items
from app.digests.message import DIGEST_TEMPLATE, digest_context
from app.digests.periods import DAILY, OFF, _aware, _same_kind
from app.digests.subscribers import Subscriber, claimed_key, items_key, sub_key
from app.digests.validation import normalize_email
from app.errors import (
    SubscriberNotFoundError,
)
from app.mail import RenderedEmail, render_email
from app.queues import get_redis


@dataclass
class Preview:
    email: str
    period: str
    due: datetime | None
    subject: str
    items: int
    rendered: RenderedEmail


def preview(email: str, now: datetime | None = None) -> Preview:
    """Render a subscriber's next digest from what is pending, claiming nothing."""
    address = normalize_email(email)
    redis = get_redis()
    raw: Any = redis.hgetall(sub_key(address))
    if not raw:
        raise SubscriberNotFoundError(address)
    subscriber = Subscriber.from_redis(address, raw)
    with redis.pipeline(transaction=False) as pipe:
        if subscriber.claimed:
            pipe.lrange(claimed_key(address, subscriber.claimed), 0, -1)
        pipe.lrange(items_key(address), 0, -1)
        lists = pipe.execute()
    items = [item for chunk in lists for item in _decode_items(chunk)]
    schedule = subscriber.schedule
    if schedule.frequency == OFF:
        period, due = replace(schedule, frequency=DAILY).period_of(_aware(now)), None
    elif subscriber.claimed and _same_kind(subscriber.claimed, schedule.period_of(_aware(now))):
        period, due = subscriber.claimed, schedule.due_at(subscriber.claimed)
    else:
        period, due_at = schedule.next_send(_aware(now), *subscriber.marks())
        due = due_at
    context = digest_context(subscriber, period, items)
    return Preview(
        email=address,
        period=period,
        due=due,
        subject=context["subject"],
        items=len(items),
        rendered=render_email(DIGEST_TEMPLATE, **context),
    )
