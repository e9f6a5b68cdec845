"""`python -m bench.wait`: what acknowledging with Redis WAIT (REDIS_MIN_REPLICAS=1)
costs, against the same master and replica without it, in one run.

Three setups, each its own throw-away master (and replica), measured in turns:
`alone` (a master, no replica: the baseline), `replica` (a replica, no WAIT: what
replication alone costs) and `wait` (a replica and REDIS_MIN_REPLICAS=1). It times
send_email one call at a time, send_many of 100, and a worker draining the queue to
an aiosmtpd server (its rate, mails/s). Loopback: a replica a network round trip away
adds that round trip to every WAIT (docs/sentinel.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis import Redis

from app import create_app
from app.config import from_environ
from tests.servers import RedisServer, SMTPServer, wait_until

SETUPS = ("alone", "replica", "wait")


@contextmanager
def world(setup: str, smtp: SMTPServer) -> Iterator[Any]:
    master = RedisServer().start()
    replica = None
    try:
        if setup != "alone":
            replica = RedisServer()
            replica.extra_args = ["--replicaof", "127.0.0.1", str(master.port)]
            replica.start()
            with Redis(port=replica.port) as client:
                wait_until(lambda: client.info("replication")["master_link_status"] == "up")
        env = {
            "REDIS_URL": master.url,
            "MAIL_SERVER": "127.0.0.1",
            "MAIL_PORT": str(smtp.port),
            "REDIS_MIN_REPLICAS": "1" if setup == "wait" else "0",
            "LOG_LEVEL": "WARNING",
        }
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)  # what AppWorker's own create_app() reads
        try:
            yield create_app(from_environ(env))
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    finally:
        for server in (replica, master):
            if server is not None:
                server.cleanup()


def one_round(setup: str, smtp: SMTPServer, mails: int) -> dict[str, float]:
    import logging

    from app.mail import send_email, send_many
    from app.worker import AppWorker

    logging.getLogger("mailqueue").setLevel(logging.WARNING)
    with world(setup, smtp) as app, app.app_context():
        send_email("warm@example.com", "Warm", "test")  # connection, template cache
        times = []
        for i in range(mails):
            started = time.perf_counter()
            send_email(f"user{i}@example.com", "Bench", "test")
            times.append(time.perf_counter() - started)
        batch = [
            {"to": f"b{i}@example.com", "subject": "B", "template": "test"} for i in range(100)
        ]
        started = time.perf_counter()
        send_many(batch)
        many = time.perf_counter() - started
        total = mails + 101
        smtp.handler.reset()
        worker = AppWorker(["mail"])
        started = time.perf_counter()
        worker.work(burst=True, logging_level="WARNING")
        drained = time.perf_counter() - started
        assert len(smtp.messages) == total, (len(smtp.messages), total)
        return {
            "median_ms": statistics.median(times) * 1000,
            "p99_ms": sorted(times)[int(len(times) * 0.99) - 1] * 1000,
            "many_ms": many * 1000,
            "rate": total / drained,
        }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mails", type=int, default=300, help="send_email calls per round")
    parser.add_argument("--rounds", type=int, default=3, help="turns of the three setups")
    args = parser.parse_args(argv)
    smtp = SMTPServer().start()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in SETUPS}
    try:
        for _ in range(args.rounds):
            for setup in SETUPS:
                results[setup].append(one_round(setup, smtp, args.mails))
    finally:
        smtp.stop()
    base = {k: statistics.median(r[k] for r in results["alone"]) for k in results["alone"][0]}
    print(f"{args.rounds} rounds of {args.mails} send_email calls, send_many(100), worker drain")
    print(
        f"{'setup':8} {'send_email median':>18} {'p99':>12} {'send_many(100)':>16} {'worker':>14}"
    )
    for setup in SETUPS:
        m = {k: statistics.median(r[k] for r in results[setup]) for k in base}
        print(
            f"{setup:8} {m['median_ms']:8.3f} ms {m['median_ms'] / base['median_ms']:5.2f}x"
            f" {m['p99_ms']:6.3f} ms {m['many_ms']:8.2f} ms {m['many_ms'] / base['many_ms']:4.2f}x"
            f" {m['rate']:6.0f}/s {m['rate'] / base['rate']:4.2f}x"
        )


if __name__ == "__main__":
    main()
