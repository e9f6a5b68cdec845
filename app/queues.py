"""Redis and RQ queues: one connection pool per app, kept in `app.extensions`.

Jobs are stored with RQ's JSON serializer, so nothing is ever unpickled from
Redis. Short socket timeouts make the web process fail fast (503) when Redis
is down instead of hanging a request.
"""

from __future__ import annotations

import functools
from typing import Any

import rq.job
import rq.queue
import rq.registry
import rq.serializers
import rq.worker.base
from flask import Flask, current_app
from redis import Redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

MAIL_QUEUE = "mail"
DIGEST_QUEUE = "digests"
QUEUE_NAMES = (MAIL_QUEUE, DIGEST_QUEUE)

EXTENSION = "mailqueue.redis"


def _remember_resolved_serializers() -> None:
    """RQ checks its serializer against a runtime-checkable Protocol every time it
    builds a Job, Queue or registry, several times per mail: ~19 µs each on Python
    3.11 (3.6% of a worker's Python time). The answer depends only on the serializer
    given, so each is checked once; an unhashable one is checked every time, as before."""
    original = rq.serializers.resolve_serializer
    remembered = functools.lru_cache(maxsize=32)(original)

    def resolve_serializer(serializer: Any = None) -> Any:
        try:
            return remembered(serializer)
        except TypeError:  # unhashable
            return original(serializer)

    for module in (rq.job, rq.queue, rq.registry, rq.worker.base):
        if getattr(module, "resolve_serializer", None) is original:
            module.resolve_serializer = resolve_serializer  # type: ignore[attr-defined]


_remember_resolved_serializers()


def connect(url: str, *, socket_timeout: float | None = 5.0) -> Redis:
    """A Redis client that gives up quickly when the server is unreachable."""
    return Redis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        health_check_interval=30,
    )


class _State:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.queues: dict[str, Queue] = {}


def init_app(app: Flask) -> None:
    """Create the app's Redis client (no connection is made until first use)."""
    app.extensions[EXTENSION] = _State(connect(app.config["REDIS_URL"]))


def _state(app: Flask | None = None) -> _State:
    target: Any = app or current_app
    state: _State = target.extensions[EXTENSION]
    return state


def get_redis(app: Flask | None = None) -> Redis:
    """The app's Redis client."""
    return _state(app).redis


def get_queue(name: str = MAIL_QUEUE, app: Flask | None = None) -> Queue:
    """A cached Queue, so RQ's per-queue lookups (server version) happen once."""
    state = _state(app)
    queue = state.queues.get(name)
    if queue is None:
        queue = Queue(name, connection=state.redis, serializer=JSONSerializer)
        state.queues[name] = queue
    return queue


# KEYS: a queue and its intermediate list: the jobs waiting in both.
_WAITING = "return redis.call('LLEN', KEYS[1]) + redis.call('LLEN', KEYS[2])"

# What queue_sizes() reads for a queue, in this order.
SIZE_NAMES = ("queued", "scheduled", "started", "failed")


def queue_sizes(pipe: Any, queue: Queue) -> None:
    """Queue on `pipe` the four SIZE_NAMES counts of `queue`: plain LLEN/ZCARD, never
    RQ's `.count`/`get_job_count()`, whose registry cleanup would let a web process
    settle abandoned jobs without the worker's record keeping. `queued` counts the
    jobs a worker popped but has not started too (up to 15 a worker claims in a batch
    of mail jobs, app/leanworker.py, wait there behind the one it runs)."""
    pipe.eval(_WAITING, 2, queue.key, queue.intermediate_queue_key)
    pipe.zcard(queue.scheduled_job_registry.key)
    pipe.zcard(queue.started_job_registry.key)
    pipe.zcard(queue.failed_job_registry.key)


class JSONJob(Job):
    """A Job that always reads and writes its data as JSON.

    For rq-scheduler, which has no serializer argument and builds its jobs with
    its job class's default (pickle), which AppWorker would refuse to read.
    """

    def __init__(
        self, id: str | None = None, connection: Redis | None = None, serializer: Any = None
    ):
        super().__init__(id=id, connection=connection, serializer=JSONSerializer)
