"""Helpers for tests that need more than a fixture: RQ's scheduler pass, a Redis dump,
counting round trips, a Redis that fails every pipeline or the writes that record `sent`."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.client
import redis.exceptions
from redis import Redis
from redis.connection import AbstractConnection
from rq.scheduler import RQScheduler
from rq.serializers import JSONSerializer

from app.queues import QUEUE_NAMES


def scheduler_pass(redis: Redis, queues: tuple[str, ...] = QUEUE_NAMES) -> None:
    """One pass of RQ's scheduler (what `rq worker --with-scheduler` runs every second):
    move every due job of the ScheduledJobRegistry onto its queue."""
    scheduler = RQScheduler(list(queues), connection=redis, serializer=JSONSerializer)
    try:
        scheduler.acquire_locks()
        scheduler.enqueue_scheduled_jobs()
        scheduler.release_locks()
    finally:
        # RQScheduler opens a pool of its own (it is built to move to another process)
        # and never closes it: a socket left to the garbage collector is a
        # ResourceWarning, an error under filterwarnings, in whatever test runs then.
        scheduler.connection.connection_pool.disconnect()


@contextmanager
def counting_redis_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Count what redis-py writes to any connection inside the block: one write per
    command or pipeline, so one per round trip. Yields the list it appends to."""
    writes: list[int] = []
    real_send = AbstractConnection.send_packed_command

    def counting(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        writes.append(1)
        real_send(self, *args, **kwargs)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)
    try:
        yield writes
    finally:
        monkeypatch.setattr(AbstractConnection, "send_packed_command", real_send)


@contextmanager
def failing_pipelines(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Inside the block, every redis-py pipeline fails as a reset connection would."""

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise redis.exceptions.ConnectionError("injected: connection reset")

    with monkeypatch.context() as patch:
        patch.setattr(redis.client.Pipeline, "execute", broken)
        yield


@contextmanager
def losing_sent_writes(monkeypatch: pytest.MonkeyPatch, times: int) -> Iterator[list[str]]:
    """Inside the block, the first `times` writes that record a mail `sent` fail as a
    lost connection would, before reaching Redis: whether `deliver` makes the write
    itself or a batching worker carries it in its next pipeline. Yields the mail ids
    whose write was lost, one per loss."""
    from app import status

    lost: list[str] = []
    real_command = Redis.execute_command
    real_execute = redis.client.Pipeline.execute

    def records_sent(args: tuple[Any, ...]) -> bool:
        if args[:2] != ("EVAL", status._FINISH):
            return False
        fields = list(args[12:])  # after EVAL, the script, numkeys, 5 keys, 4 values
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
        return pairs.get("status") == status.SENT

    def lose(args: tuple[Any, ...]) -> None:
        lost.append(args[8])  # the mail id, after the 5 keys
        raise redis.exceptions.ConnectionError("injected: connection lost")

    def command(self: Redis, *args: Any, **options: Any) -> Any:
        if len(lost) < times and records_sent(args):
            lose(args)
        return real_command(self, *args, **options)

    def execute(self: redis.client.Pipeline, *args: Any, **kwargs: Any) -> Any:
        for queued, _options in self.command_stack:
            if len(lost) < times and records_sent(queued):
                lose(queued)
        return real_execute(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Redis, "execute_command", command)
        patch.setattr(redis.client.Pipeline, "execute", execute)
        yield lost


def redis_dump(redis: Redis) -> bytes:
    """Every key and value in Redis, as one blob to search for what must not be there."""
    chunks: list[bytes] = []
    for name in redis.scan_iter(count=1000):
        kind = redis.type(name).decode()
        chunks.append(name)
        if kind == "string":
            chunks.append(redis.get(name) or b"")
        elif kind == "hash":
            for k, v in redis.hgetall(name).items():
                chunks += [k, v]
        elif kind == "list":
            chunks += redis.lrange(name, 0, -1)
        elif kind == "set":
            chunks += list(redis.smembers(name))
        elif kind == "zset":
            chunks += [member for member, _ in redis.zrange(name, 0, -1, withscores=True)]
        elif kind == "stream":
            for _id, fields in redis.xrange(name):
                for k, v in fields.items():
                    chunks += [k, v]
        else:
            raise AssertionError(f"redis_dump: unhandled type {kind} for {name!r}")
    return b"\n".join(chunks)


PROJECT_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def procfile() -> dict[str, str]:
    """The Procfile's process lines, by name."""
    lines: dict[str, str] = {}
    for line in (PROJECT_ROOT / "Procfile").read_text().splitlines():
        name, sep, command = line.partition(":")
        if sep and name.strip() and not name.lstrip().startswith("#"):
            lines[name.strip()] = command.strip()
    return lines


def subprocess_env(**overrides: str) -> dict[str, str]:
    """This test's environment (fixtures included) with the venv's bin first on PATH,
    as a Procfile host or honcho would run a line."""
    environ = dict(os.environ)
    environ["PATH"] = f"{VENV_BIN}{os.pathsep}{environ.get('PATH', '')}"
    environ.pop("PYTEST_CURRENT_TEST", None)
    environ.update(overrides)
    return environ
