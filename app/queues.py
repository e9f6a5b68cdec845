"""Redis and RQ queues: one connection pool per app, kept in `app.extensions`.

Jobs are stored with RQ's JSON serializer, so nothing is ever unpickled from
Redis. Short socket timeouts make the web process fail fast (503) when Redis
is down instead of hanging a request.

With REDIS_SENTINELS set, every process's client finds the master through the
sentinels (redis-py's SentinelConnectionPool) and asks again after a failover;
a write that must survive one (an accepted mail, a `sent` record) is confirmed
by REDIS_MIN_REPLICAS replicas with WAIT before it counts (`replicate`,
docs/sentinel.md).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import rq.job
import rq.queue
import rq.registry
import rq.serializers
import rq.worker.base
from flask import Flask, current_app
from redis import Redis
from redis.backoff import ExponentialBackoff
from redis.client import Pipeline
from redis.connection import Connection, SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from app.errors import ConfigError, NotReplicatedError

MAIL_QUEUE = "mail"
MAIL_HIGH_QUEUE = "mail-high"
MAIL_BULK_QUEUE = "mail-bulk"
DIGEST_QUEUE = "digests"
# Mail lanes: a mail's `priority` -> its queue (docs/api.md, "Priority lanes").
PRIORITIES = {"high": MAIL_HIGH_QUEUE, "normal": MAIL_QUEUE, "bulk": MAIL_BULK_QUEUE}
DEFAULT_PRIORITY = "normal"
MAIL_QUEUES = tuple(PRIORITIES.values())
# Every queue, in the order a worker serves them (the Procfile's worker line): strictly
# highest first, digests (due at a local hour) ahead of bulk mail.
QUEUE_NAMES = (MAIL_HIGH_QUEUE, MAIL_QUEUE, DIGEST_QUEUE, MAIL_BULK_QUEUE)

EXTENSION = "mailqueue.redis"

# Idle workers block on this list, not on a queue: a blocking pop waits on one key, and
# a worker blocked on its highest lane would not see work arrive on the others (nor would
# two idle workers share a burst: the first to poll would claim all of it). Every push of
# jobs onto a queue by this app rings it (ring), one entry a job up to DOORBELL_CAP; an
# entry only wakes a worker, which then claims across all lanes (app/scripts.py, claim),
# so a lost or extra entry costs a wait of POLL_SECONDS or one empty claim, never a job.
DOORBELL = "mq:doorbell"
DOORBELL_CAP = 32


def ring(pipe: Any, jobs: int = 1) -> None:
    """Queue on `pipe` the wake-up of up to `jobs` idle workers (DOORBELL)."""
    pipe.lpush(DOORBELL, *["1"] * max(1, min(jobs, DOORBELL_CAP)))
    pipe.ltrim(DOORBELL, 0, DOORBELL_CAP - 1)


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


# How long a write waits for its replicas (WAIT's timeout): short, so that without a
# replica send_email answers QueueUnavailableError (503) promptly rather than hanging.
REPLICA_WAIT_MS = 1000
# Under Sentinel: while the master is unreachable (a failover), each command tries again
# a few times, 0.1 s, 0.2 s, 0.4 s apart, then raises: the web side answers 503 within
# about a second, and a worker's or scheduler's loop retries on its own.
SENTINEL_RETRY = Retry(ExponentialBackoff(cap=0.4, base=0.1), 3)
SENTINEL_SOCKET_TIMEOUT = 1.0


class ReplicatedPipeline(Pipeline):
    """A Pipeline whose execute() returns only once `wait_replicas` replicas have its
    writes (set by `replicate`; 0: a plain pipeline). WAIT counts the writes of the
    connection it runs on and returns at once inside MULTI or a script, so it runs
    after EXEC on the connection execute() used, held until then. A pipeline that
    WATCHed (an idempotency key's claim) already holds its connection: that one."""

    min_replicas = 0
    wait_replicas = 0
    _held: Connection | None = None

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        if self.wait_replicas <= 0 or not self.command_stack:
            return super().execute(raise_on_error)
        needed, self.wait_replicas = self.wait_replicas, 0
        if self.connection is None:
            self.connection = self.connection_pool.get_connection()
        conn = self._held = self.connection
        try:
            replies = super().execute(raise_on_error)
            try:
                conn.send_command("WAIT", needed, REPLICA_WAIT_MS)
                acked = int(conn.read_response())
            except Exception:
                conn.disconnect()
                raise
            if acked < needed:
                raise NotReplicatedError(
                    f"{acked} of {needed} replicas confirmed the write within "
                    f"{REPLICA_WAIT_MS} ms (REDIS_MIN_REPLICAS)"
                )
            return replies
        finally:
            self._held = None
            self.connection_pool.release(conn)

    def reset(self) -> None:  # type: ignore[override]  # Pipeline.reset, not RESET
        if self._held is not None and self.connection is self._held:
            self.connection = None  # execute() releases it, after its WAIT
        super().reset()


class AppRedis(Redis):
    """A Redis client whose pipelines can wait for replicas (`replicate`)."""

    min_replicas = 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> ReplicatedPipeline:
        pipe = ReplicatedPipeline(
            self.connection_pool, self.response_callbacks, transaction, shard_hint
        )
        pipe.min_replicas = self.min_replicas
        return pipe


def replicate(pipe: Any) -> None:
    """Make `pipe`'s execute() return only once REDIS_MIN_REPLICAS replicas have its
    writes, else raise NotReplicatedError (a redis ConnectionError): for the writes a
    failover must not lose, an accepted mail and a `sent` record. No-op at 0."""
    if isinstance(pipe, ReplicatedPipeline):
        pipe.wait_replicas = pipe.min_replicas


def min_replicas(config: Mapping[str, Any]) -> int:
    """REDIS_MIN_REPLICAS, or its default: 1 with REDIS_SENTINELS, else 0."""
    value = config.get("REDIS_MIN_REPLICAS")
    if value is None:
        return 1 if config.get("REDIS_SENTINELS") else 0
    return int(value)


def connect(url: str, *, socket_timeout: float | None = 5.0) -> AppRedis:
    """A Redis client that gives up quickly when the server is unreachable."""
    client = AppRedis.from_url(
        url,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        health_check_interval=30,
    )
    assert isinstance(client, AppRedis)
    return client


def connect_sentinel(
    url: str,
    sentinels: list[tuple[str, int]],
    master: str,
    *,
    sentinel_password: str | None = None,
    socket_timeout: float | None = 5.0,
) -> AppRedis:
    """A client of the master the sentinels name, found again after a failover. `url`
    gives the database, credentials and TLS (its host is ignored)."""
    kwargs = parse_url(url)
    for key in ("host", "port", "path"):
        kwargs.pop(key, None)
    tls = kwargs.pop("connection_class", None) is SSLConnection
    ssl_kwargs = {k: v for k, v in kwargs.items() if k.startswith("ssl_")}
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs={
            "password": sentinel_password,
            "socket_timeout": SENTINEL_SOCKET_TIMEOUT,
            "socket_connect_timeout": SENTINEL_SOCKET_TIMEOUT,
            "ssl": tls,
            **ssl_kwargs,
        },
    )
    client: AppRedis = sentinel.master_for(
        master,
        redis_class=AppRedis,
        ssl=tls,
        socket_connect_timeout=2.0,
        socket_timeout=socket_timeout,
        health_check_interval=30,
        retry=SENTINEL_RETRY,
        **kwargs,
    )
    return client


def connect_app(config: Mapping[str, Any], *, socket_timeout: float | None = 5.0) -> AppRedis:
    """The client `config` describes: through REDIS_SENTINELS if set, else REDIS_URL."""
    url = config["REDIS_URL"]
    sentinels = config.get("REDIS_SENTINELS")
    if sentinels:
        client = connect_sentinel(
            url,
            sentinels,
            config.get("REDIS_SENTINEL_MASTER") or "mymaster",
            sentinel_password=config.get("REDIS_SENTINEL_PASSWORD"),
            socket_timeout=socket_timeout,
        )
    else:
        client = connect(url, socket_timeout=socket_timeout)
    client.min_replicas = min_replicas(config)
    return client


def route_rq_cli_to_the_app_redis() -> None:
    """`rq worker` checks for `rq suspend` before it builds the worker class, on a client
    it makes from REDIS_URL alone; under Sentinel that host is not the master (and may
    not exist). Give RQ's CLI the client the app's settings describe instead."""
    import rq.cli.helpers

    from app.config import from_environ

    original = rq.cli.helpers.get_redis_from_config

    def get_redis_from_config(settings: Any, connection_class: Any = Redis) -> Any:
        if settings is os.environ and os.environ.get("REDIS_SENTINELS"):
            try:
                return connect_app(from_environ(os.environ))
            except ConfigError as err:
                raise SystemExit(f"mailqueue worker not started: {err}") from err
        return original(settings, connection_class)

    if getattr(original, "__module__", "") != __name__:
        rq.cli.helpers.get_redis_from_config = get_redis_from_config


class _State:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.queues: dict[str, Queue] = {}


def init_app(app: Flask) -> None:
    """Create the app's Redis client (no connection is made until first use)."""
    app.extensions[EXTENSION] = _State(connect_app(app.config))


def _state(app: Flask | None = None) -> _State:
    target: Any = app or current_app
    state: _State = target.extensions[EXTENSION]
    return state


def get_redis(app: Flask | None = None) -> Redis:
    """The app's Redis client."""
    return _state(app).redis


class RingingQueue(Queue):
    """An RQ Queue whose pushes (RQ's enqueue, a retry without delay) ring DOORBELL."""

    def push_job_id(self, job_id: str, pipeline: Any = None, at_front: bool = False) -> None:
        super().push_job_id(job_id, pipeline=pipeline, at_front=at_front)
        if pipeline is not None:
            ring(pipeline)
        else:
            with self.connection.pipeline(transaction=False) as pipe:
                ring(pipe)
                pipe.execute()


def get_queue(name: str = MAIL_QUEUE, app: Flask | None = None) -> Queue:
    """A cached Queue, so RQ's per-queue lookups (server version) happen once."""
    state = _state(app)
    queue = state.queues.get(name)
    if queue is None:
        queue = RingingQueue(name, connection=state.redis, serializer=JSONSerializer)
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
