"""Real processes for the fault suite: the Procfile's worker line as a subprocess,
a private redis-server (AOF), an in-process aiosmtpd, and the figures they produce.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from flask import Flask
from redis import Redis

from app import PROJECT_ROOT, create_app
from app.config import SPEC, from_environ
from app.queues import MAIL_QUEUES, connect_app
from tests.servers import RedisServer, SMTPServer, wait_until

# Short intervals keep each scenario to seconds (defaults: README, "Reliability").
FAST_SETTINGS = {
    "MAIL_RETRY_INTERVALS": "1,1,2,2,2,3,3",
    "WORKER_MAINTENANCE_INTERVAL": "5",
    "MAIL_JOB_TIMEOUT": "5",
    "MAIL_TIMEOUT": "1",
}


def procfile_command(name: str) -> str:
    """The command of one Procfile line, exactly as written there."""
    for line in (PROJECT_ROOT / "Procfile").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.partition(":")[2].strip()
    raise LookupError(f"no {name}: line in the Procfile")


@dataclass
class Worker:
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal_group(self, signum: int) -> None:
        """Signal the worker and its scheduler child, as a host stopping a dyno does."""
        with suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Deployment:
    """One scenario's world: Redis with AOF, an SMTP server, workers, and an app."""

    workdir: Path
    settings: dict[str, str]
    redis_server: RedisServer = field(init=False)
    smtp: SMTPServer = field(init=False)
    workers: list[Worker] = field(default_factory=list)

    def __post_init__(self) -> None:
        redis_settings = self.start_redis()
        self.smtp = SMTPServer().start()
        self.env = {
            **redis_settings,
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_PORT": str(self.smtp.port),
            "MAIL_DEFAULT_SENDER": "Fault Suite <noreply@example.com>",
            "PUBLIC_URL": "https://mail.example.com",
            "SECRET_KEY": "fault-suite",
            "API_TOKEN": "fault-suite-token",
            **FAST_SETTINGS,
            **self.settings,
        }
        self.app: Flask = create_app(from_environ(self.env))
        self.redis: Redis = connect_app(from_environ(self.env))

    def start_redis(self) -> dict[str, str]:
        """Start this world's Redis; return the settings that reach it."""
        self.redis_server = RedisServer(appendonly=True).start()
        return {"REDIS_URL": self.redis_server.url}

    # -- processes ------------------------------------------------------------------

    def start_worker(self, wait: bool = True) -> Worker:
        """Run the Procfile's `worker:` line, in its own process group."""
        env = {k: v for k, v in os.environ.items() if k not in SPEC}
        env.update(self.env)
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        log = self.workdir / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", "-c", "exec " + procfile_command("worker")],
                cwd=self.workdir,  # no developer .env
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(process, log)
        self.workers.append(worker)
        if wait and not wait_until(lambda: self.worker_key(worker) is not None, timeout=20):
            raise AssertionError(f"worker did not start:\n{worker.tail()}")
        return worker

    def worker_key(self, worker: Worker) -> bytes | None:
        for key in self.redis_call(lambda r: r.smembers("rq:workers")) or ():
            if self.redis_call(lambda r, k=key: r.hget(k, "pid")) == str(worker.pid).encode():
                return bytes(key)
        return None

    def current_job(self, worker: Worker) -> str | None:
        key = self.worker_key(worker)
        job = self.redis_call(lambda r: r.hget(key, "current_job")) if key else None
        return job.decode() if job else None

    def in_flight(self, worker: Worker) -> set[str]:
        """The mail jobs `worker` is running: its executions in the started registry."""
        key = self.worker_key(worker)
        if key is None:
            return set()
        name = key.decode().removeprefix("rq:worker:").encode()
        members = [m for q in MAIL_QUEUES for m in self.redis.zrange(f"rq:wip:{q}", 0, -1)]
        return {
            member.decode().split(":", 1)[0]
            for member in members
            if self.redis.hget(b"rq:execution:" + member, "worker_name") == name
        }

    def smtp_down(self) -> None:
        """Stop the SMTP server: connections are refused."""
        self.smtp.stop()

    def smtp_up(self) -> None:
        """Listen again on the same port, with the same handler (what it received is kept)."""
        self.smtp.controller = Controller(
            self.smtp.handler, hostname="127.0.0.1", port=self.smtp.port, ready_timeout=10
        )
        self.smtp.controller.start()

    def redis_call(self, call: Any) -> Any:
        try:
            return call(self.redis)
        except Exception:
            return None

    def stop(self) -> None:
        for worker in self.workers:
            worker.signal_group(signal.SIGKILL)
            if worker.process.poll() is None:
                worker.process.wait(timeout=10)
        self.redis.close()
        self.smtp.stop()
        self.redis_server.cleanup()

    # -- mail ----------------------------------------------------------------------

    def send(self, count: int, prefix: str = "user", **kwargs: Any) -> list[str]:
        from app.mail import send_email

        with self.app.app_context():
            return [
                send_email(f"{prefix}{i}@example.com", f"Mail {i}", "test", **kwargs).id
                for i in range(count)
            ]

    def message_id(self, mail_id: str) -> str:
        return f"<{mail_id}@example.com>"

    def received(self) -> Counter[str]:
        return Counter(m.message_id for m in self.smtp.messages)

    def wait_delivered(self, ids: list[str], timeout: float) -> float:
        """Seconds until every mail in `ids` reached the server (or AssertionError)."""
        started = time.monotonic()
        wanted = {self.message_id(i) for i in ids}
        if not wait_until(lambda: wanted <= set(self.received()), timeout=timeout, interval=0.05):
            missing = wanted - set(self.received())
            logs = "\n---\n".join(w.tail() for w in self.workers)
            raise AssertionError(f"{len(missing)} of {len(ids)} not delivered:\n{logs}")
        return time.monotonic() - started

    def tally(self, ids: list[str], may_repeat: set[str] | None = None) -> tuple[int, int]:
        """(lost, duplicated) by Message-ID, and nothing received that was not sent.

        With `may_repeat` (the mails in flight when the fault hit: accepted, maybe, but
        not yet recorded), a duplicate of any other mail, or a third copy of one, fails.
        """
        counts = self.received()
        wanted = {self.message_id(i) for i in ids}
        assert set(counts) <= wanted, "the server received mail nobody sent"
        lost = sum(1 for m in wanted if counts[m] == 0)
        duplicated = sum(n - 1 for n in counts.values() if n > 1)
        if may_repeat is not None:
            allowed = {self.message_id(i) for i in may_repeat}
            repeated = {m: n for m, n in counts.items() if n > 1}
            assert set(repeated) <= allowed, f"duplicates of mails not in flight: {repeated}"
            assert all(n == 2 for n in repeated.values()), f"sent 3 times or more: {repeated}"
        return lost, duplicated

    def status_of(self, mail_id: str) -> str:
        from app import status

        record = status.load(self.redis, mail_id)
        return record.status if record else "missing"

    def settle_quietly(self, seconds: float) -> None:
        """Give late duplicates a chance to show up before counting."""
        time.sleep(seconds)


# The worker settings the fault scenarios run under (tests/faults/conftest.py): the
# default, and several mails in flight against a server that delays every reply.
# name -> (worker settings, SMTP reply delay in s, server offers CHUNKING: the body
# leaves with its envelope, so a fault after that write may mean a delivered mail)
IN_FLIGHT_MODES: dict[str, tuple[dict[str, str], float, bool]] = {
    "default": ({}, 0.0, False),
    "8-in-flight-20ms": ({"MAIL_CONCURRENCY": "8"}, 0.02, False),
    "8-in-flight-20ms-bdat": ({"MAIL_CONCURRENCY": "8"}, 0.02, True),
}


@contextmanager
def deployment(tmp_path: Path, mode: str = "default", **settings: str) -> Iterator[Deployment]:
    """A scenario's world, its workers in one of IN_FLIGHT_MODES."""
    mode_settings, reply_delay, chunking = IN_FLIGHT_MODES[mode]
    world = Deployment(tmp_path, {**mode_settings, **settings})
    world.smtp.handler.reply_delay = reply_delay
    world.smtp.handler.chunking = chunking
    try:
        yield world
    finally:
        world.stop()


@dataclass
class Row:
    scenario: str
    load: str
    faults: str
    lost: int
    duplicated: int
    recovery: str
    note: str = ""


class Report:
    """Collects one row per scenario; written to test-artifacts/reliability.md."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.started = time.monotonic()

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def write(self, path: Path) -> None:
        if not self.rows:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            "| scenario | load | faults injected | mail lost | mail duplicated "
            "| time to recover | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.scenario} | {r.load} | {r.faults} | {r.lost} | {r.duplicated} "
                f"| {r.recovery} | {r.note} |"
            )
        settings = ", ".join(f"{k}={v}" for k, v in FAST_SETTINGS.items())
        wall = time.monotonic() - self.started
        lines += [
            "",
            f"Settings: {settings}. Fault suite wall time: {wall:.0f} s "
            f"(`pytest -m fault`, {os.cpu_count()} CPUs).",
        ]
        path.write_text("\n".join(lines) + "\n")
