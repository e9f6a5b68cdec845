"""The Procfile's `scheduler:` process: register the periodic jobs, then run rq-scheduler.

rq-scheduler 0.14 is kept behind this file; the traps it sets are handled here:

- `cron()` without a fixed id adds a copy at every start: every periodic job has a
  fixed id, is re-registered only when its definition changed, and any other
  registration of ours (an older version's id, a pickled job) is removed. Running
  this any number of times leaves exactly PERIODIC registered.
- Cron strings are evaluated in the process's local time zone: TZ is pinned to UTC
  in-process (the Procfile says TZ=UTC too).
- It has no serializer argument and builds jobs with its job class's default
  (pickle): it gets app.queues.JSONJob, which AppWorker can read.
- Its lock lives interval + 10 s: a cycle only moves due job ids onto a queue (the
  dispatch itself runs in a worker), so it stays far shorter than that.
- Two schedulers at once may both enqueue a dispatch; the dispatcher claims due
  subscribers atomically, so the second finds nothing to do.
- crontab warns (FutureWarning) on every cron() call and every cycle: that one
  warning is filtered, nothing else.
- Its loop dies on the first Redis error, and a Redis restarted empty (or flushed)
  loses the registrations for good: PeriodicScheduler registers them again on the
  first cycle that misses one, and serve() runs the loop again after an outage,
  with backoff, until stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
import warnings
from contextlib import suppress
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rq_scheduler import Scheduler

from app import create_app
from app.digests import DISPATCH_JOB
from app.errors import ConfigError
from app.queues import DIGEST_QUEUE, QUEUE_NAMES, JSONJob, get_redis

log = logging.getLogger("mailqueue.scheduler")

# Seconds between two looks at the schedule (rq-scheduler's lock lives this + 10 s).
POLL_INTERVAL = 30
# Seconds between two tries while Redis is unreachable: doubling from the first to the last.
RETRY_DELAYS = (1, 30)
ID_PREFIX = "mailqueue-"
FINGERPRINT = "mailqueue_periodic"


@dataclass(frozen=True)
class Periodic:
    """One periodic job: a fixed id, a UTC cron string, a job function path."""

    id: str
    cron: str
    func: str
    queue: str
    timeout: int
    description: str

    def fingerprint(self) -> str:
        return json.dumps([self.func, self.cron, self.queue, self.timeout, self.description])


PERIODIC = (
    Periodic(
        id=f"{ID_PREFIX}digest-dispatch",
        cron="*/5 * * * *",
        func=DISPATCH_JOB,
        queue=DIGEST_QUEUE,
        timeout=240,
        description="digest dispatch (every 5 minutes, UTC)",
    ),
)


def pin_utc() -> None:
    """Cron strings are read in local time (rq-scheduler, crontab): make local time UTC."""
    os.environ["TZ"] = "UTC"
    time.tzset()


def quiet_crontab() -> None:
    """crontab's FutureWarning about a future default, raised through rq_scheduler.utils."""
    warnings.filterwarnings(
        "ignore",
        message=r"Version 0\.22\.0\+ of crontab",
        category=FutureWarning,
        module=r"rq_scheduler\.utils",
    )


class PeriodicScheduler(Scheduler):
    """rq-scheduler's loop, registering PERIODIC again on any cycle (that holds the
    lock) that finds one of them missing, and a stop signal that exits even when
    Redis cannot be told."""

    stopping = False

    def enqueue_jobs(self) -> Any:
        # Only when one is missing (Redis restarted empty, or flushed): a registration
        # that differs is another version's during a deploy overlap, and replacing it
        # every cycle would keep pushing the dispatch past its next cron tick.
        ids = [job.id for job in PERIODIC]
        scores: Any = self.connection.zmscore(self.scheduled_jobs_key, ids)
        if None in scores:
            for job_id, action in register(self).items():
                if action != "kept":
                    log.warning("periodic job %s: %s again", job_id, action)
        return super().enqueue_jobs()

    def _install_signal_handlers(self) -> None:
        # rq-scheduler's handler raises a connection error from register_death when
        # Redis is down, which serve() would take for an outage and carry on.
        def stop(signum: int, frame: Any) -> None:
            self.log.info("Shutting down RQ scheduler...")
            self.stopping = True
            with suppress(RedisError):
                self.register_death()
                self.remove_lock()
            raise SystemExit()

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)


def make_scheduler(redis: Redis, interval: int = POLL_INTERVAL) -> PeriodicScheduler:
    return PeriodicScheduler(
        queue_name=DIGEST_QUEUE, connection=redis, interval=interval, job_class=JSONJob
    )


def register(scheduler: Scheduler, periodic: tuple[Periodic, ...] = PERIODIC) -> dict[str, str]:
    """Make rq-scheduler's registrations of ours exactly `periodic`; return what was done
    per job id (kept, registered, removed).

    Reads job hashes raw, so a registration this code cannot deserialize (an older
    version's pickled job) is still recognised by its queue and removed.
    """
    redis: Redis = scheduler.connection
    wanted = {job.id: job for job in periodic}
    done: dict[str, str] = {}
    raw_ids: Any = redis.zrange(scheduler.scheduled_jobs_key, 0, -1)
    for raw_id in raw_ids:
        job_id = raw_id.decode()
        fields: Any = redis.hmget(JSONJob.key_for(job_id), ["origin", "meta"])
        origin, meta = fields
        if job_id in wanted and _fingerprint(meta) == wanted[job_id].fingerprint():
            done[job_id] = "kept"
            continue
        ours = job_id.startswith(ID_PREFIX) or (origin or b"").decode() in QUEUE_NAMES
        if job_id in wanted or ours or origin is None:
            # Changed, stale, or a registration whose job data is gone: drop it.
            scheduler.cancel(job_id)
            redis.delete(JSONJob.key_for(job_id))
            if job_id not in wanted:
                done[job_id] = "removed"
    for job in periodic:
        if done.get(job.id) == "kept":
            continue
        scheduler.cron(
            job.cron,
            func=job.func,
            id=job.id,
            queue_name=job.queue,
            timeout=job.timeout,
            description=job.description,
            # Kept after each run: rq-scheduler re-schedules this same job hash.
            result_ttl=-1,
            meta={FINGERPRINT: job.fingerprint()},
        )
        done[job.id] = "registered"
    return done


def _fingerprint(raw_meta: bytes | None) -> str | None:
    try:
        meta = json.loads(raw_meta) if raw_meta else {}
    except ValueError:
        return None  # not JSON: an older, pickled registration
    return meta.get(FINGERPRINT) if isinstance(meta, dict) else None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--burst", action="store_true", help="register, run one cycle, and exit (for tests)"
    )
    parser.add_argument("--interval", type=int, default=POLL_INTERVAL, help="seconds per cycle")
    args = parser.parse_args(argv)
    pin_utc()
    quiet_crontab()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s scheduler %(levelname)s %(message)s"
    )
    try:
        app = create_app()
    except ConfigError as err:
        # One line naming the key, as the worker and `make run` say it; no traceback.
        raise SystemExit(f"mailqueue scheduler not started: {err}") from err
    serve(make_scheduler(get_redis(app), args.interval), burst=args.burst)


def serve(scheduler: PeriodicScheduler, burst: bool = False) -> None:
    """Register PERIODIC and run the loop; after a Redis outage, again, until a stop
    signal (exit 0). A burst run does not wait for Redis: it fails."""
    first, last = RETRY_DELAYS
    delay = first
    while True:
        started = time.monotonic()
        try:
            for job_id, action in register(scheduler).items():
                log.info("periodic job %s: %s", job_id, action)
            scheduler.run(burst=burst)
            return
        except (RedisConnectionError, RedisTimeoutError) as err:
            if scheduler.stopping:
                return  # the stop handler ran; run()'s own clean-up could not reach Redis
            if burst:
                raise
            if time.monotonic() - started > last:
                delay = first  # it ran a while: a new outage
            log.warning("Redis unreachable (%s): trying again in %d s", err, delay)
            time.sleep(delay)
            delay = min(delay * 2, last)
            # A new name: rq-scheduler refuses one whose instance key says it is alive.
            scheduler.name = uuid4().hex


if __name__ == "__main__":
    main()
