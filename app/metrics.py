"""`GET /metrics`: Prometheus text format, behind the API token.

Counters come from the `mq:stats` hash that workers increment in the same
round trip as each state change (app.status.count), so every worker's mails
add up whichever process is scraped. Gauges are read from RQ's keys: two
pipelined round trips per scrape, whatever the queue sizes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response
from rq import Worker
from rq.job import Job

from app import status
from app.api import require_token
from app.queues import QUEUE_NAMES, get_queue, get_redis, queue_sizes

bp = Blueprint("metrics", __name__)
bp.before_request(require_token)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

COUNTERS = (
    ("sent", "mailqueue_mails_sent_total", "Mails the SMTP server accepted, by template."),
    ("failed", "mailqueue_mails_failed_total", "Mails that failed for good, by template."),
    ("retried", "mailqueue_mails_retried_total", "Delivery retries scheduled, by template."),
    (
        "suppressed",
        "mailqueue_mails_suppressed_total",
        "Mails not sent because every recipient is suppressed, by template.",
    ),
)

GAUGES = (
    ("mailqueue_queue_depth", "Jobs waiting: in the queue, or popped by a worker and not started."),
    ("mailqueue_queue_scheduled", "Jobs deferred (send_at, delay, retry backoff)."),
    ("mailqueue_queue_started", "Jobs being worked on now."),
    ("mailqueue_queue_failed", "Jobs in RQ's failed registry."),
    ("mailqueue_queue_oldest_age_seconds", "Age of the oldest waiting job (0 when empty)."),
)


@bp.get("/metrics")
def metrics() -> Response:
    return Response(render(), content_type=CONTENT_TYPE)


def render() -> str:
    """The whole exposition: counters by template, then per-queue gauges, then workers."""
    redis = get_redis()
    queues = [get_queue(name) for name in QUEUE_NAMES]
    with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(status.STATS_KEY)
        for queue in queues:
            queue_sizes(pipe, queue)
            # RQ appends, and a pop moves a job to the end of the intermediate list: each
            # head is the oldest waiting there.
            pipe.lindex(queue.key, 0)
            pipe.lindex(queue.intermediate_queue_key, 0)
        replies: list[Any] = pipe.execute()
    stats: dict[bytes, bytes] = replies[0]
    gauges: dict[str, list[float]] = {}
    heads: list[str | None] = []
    for i, _queue in enumerate(queues):
        depth, scheduled, started, failed, *waiting = replies[1 + 6 * i : 7 + 6 * i]
        for name, value in (
            ("mailqueue_queue_depth", depth),
            ("mailqueue_queue_scheduled", scheduled),
            ("mailqueue_queue_started", started),
            ("mailqueue_queue_failed", failed),
        ):
            gauges.setdefault(name, []).append(value)
        heads += [Job.key_for(head.decode()) if head else None for head in waiting]
    ages = _oldest_ages(redis, heads)
    gauges["mailqueue_queue_oldest_age_seconds"] = [
        round(max(ages[2 * i], ages[2 * i + 1]), 3) for i in range(len(queues))
    ]

    lines: list[str] = []
    counts: dict[str, dict[str, int]] = {outcome: {} for outcome, _, _ in COUNTERS}
    for raw_field, raw_value in stats.items():
        outcome, _, template = raw_field.decode().partition(":")
        if outcome in counts:
            counts[outcome][template] = int(raw_value)
    for outcome, name, help_text in COUNTERS:
        lines += _family(name, "counter", help_text)
        lines += [_sample(name, {"template": t}, n) for t, n in sorted(counts[outcome].items())]
    for name, help_text in GAUGES:
        lines += _family(name, "gauge", help_text)
        values = zip(queues, gauges[name], strict=True)
        lines += [_sample(name, {"queue": queue.name}, value) for queue, value in values]
    name = "mailqueue_workers"
    lines += _family(name, "gauge", "RQ workers registered with this Redis.")
    lines.append(_sample(name, {}, Worker.count(connection=redis)))
    return "\n".join(lines) + "\n"


def _oldest_ages(redis: Any, job_keys: Iterable[str | None]) -> list[float]:
    """Seconds since each head job was enqueued (0 for an empty queue or a vanished job)."""
    keys = list(job_keys)
    with redis.pipeline(transaction=False) as pipe:
        for key in keys:
            if key:
                pipe.hget(key, "enqueued_at")
        stamps = iter(pipe.execute())
    now = time.time()
    ages = []
    for key in keys:
        raw = next(stamps) if key else None
        ages.append(max(0.0, now - _parse_rq_time(raw)) if raw else 0.0)
    return ages


def _parse_rq_time(raw: bytes) -> float:
    """RQ writes `2024-01-31T12:00:00.123456Z` (UTC)."""
    text = raw.decode().rstrip("Z")
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def _family(name: str, kind: str, help_text: str) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]


def _sample(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {value}"
    rendered = ",".join(f'{key}="{_escape(val)}"' for key, val in labels.items())
    return f"{name}{{{rendered}}} {value}"


def _escape(value: str) -> str:
    """Label values escape backslash, double quote and newline (exposition format)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
