"""`AppWorker`: the `rq worker -w app.worker.AppWorker` class of the Procfile.

- Builds the Flask app once, at start-up, so a bad configuration stops the
  worker (one line naming the key, exit status 1) before it takes a job, and
  runs every job in a fresh app context.
- Runs jobs in-process (no fork per job: a fork re-imports nothing, but costs
  ~3 ms and loses the reused SMTP connection); job timeouts still apply
  through SIGALRM.
- Always reads and writes jobs as JSON, whatever `--serializer` says.
- Dequeues crash-safely from several queues: RQ pops with BLPOP when a worker
  listens on more than one queue, so a worker killed in that instant loses the
  job. Here every pop is an LMOVE into RQ's per-queue intermediate list, which
  RQ's maintenance pass re-queues from if the worker dies.
- Runs that maintenance pass every WORKER_MAINTENANCE_INTERVAL seconds (RQ's
  default is 600), so a killed worker's job is retried within minutes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

from redis import Redis
from rq import Queue
from rq.exceptions import DequeueTimeout, NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker

from app import create_app
from app.config import load_dotenv_file
from app.errors import ConfigError
from app.queues import get_redis

# `rq worker` reads REDIS_URL from the environment before it builds this class:
# let it see the same `.env` the app reads (this pushes no app context).
load_dotenv_file()

log = logging.getLogger("mailqueue.worker")

# How long one blocking pop on the first queue waits before the others are polled again.
POLL_SECONDS = 1.0


class AppQueue(Queue):
    """A Queue whose multi-queue pop never leaves a job only in a worker's memory."""

    @classmethod
    def dequeue_any(
        cls,
        queues: Iterable[Queue],
        timeout: int | None,
        connection: Redis,
        job_class: type[Job] | None = None,
        serializer: Any = None,
        death_penalty_class: Any = None,
    ) -> tuple[Job, Queue] | None:
        queues = list(queues)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for queue in queues:
                job_id = connection.lmove(queue.key, queue.intermediate_queue_key)
                if job_id is None:
                    continue
                job = _fetch(job_id, queue, connection, job_class, serializer)
                if job is not None:
                    return job, queue
            if deadline is None:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DequeueTimeout(timeout, [q.key for q in queues])
            first = queues[0]
            wait: Any = min(POLL_SECONDS, remaining)  # redis-py types say int; Redis takes seconds
            job_id = connection.blmove(first.key, first.intermediate_queue_key, wait)
            if job_id is not None:
                job = _fetch(job_id, first, connection, job_class, serializer)
                if job is not None:
                    return job, first


def _fetch(
    raw_id: Any, queue: Queue, connection: Redis, job_class: Any, serializer: Any
) -> Job | None:
    """Load a popped job; drop the id of one whose data is gone."""
    job_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
    job_cls: Any = job_class or Job
    try:
        job: Job = job_cls.fetch(job_id, connection=connection, serializer=serializer)
    except NoSuchJobError:
        connection.lrem(queue.intermediate_queue_key, 1, job_id)
        return None
    return job


class AppWorker(SimpleWorker):
    """RQ's in-process worker, inside the mailqueue Flask app."""

    queue_class = AppQueue
    log_result_lifespan = False

    def __init__(self, queues: Sequence[Any] | Any, *args: Any, **kwargs: Any) -> None:
        try:
            self.app = create_app()
        except ConfigError as err:
            # One line naming the key, not rq's logged traceback; SystemExit passes
            # through `rq worker`'s catch-all and exits non-zero before any job is taken.
            raise SystemExit(f"mailqueue worker not started: {err}") from err
        # The app's REDIS_URL and our queue class and serializer, whatever the CLI built.
        items = [queues] if isinstance(queues, str | Queue) else list(queues)
        names = [q if isinstance(q, str) else q.name for q in items]
        kwargs.update(
            connection=get_redis(self.app),
            serializer=JSONSerializer,
            queue_class=AppQueue,
            maintenance_interval=self.app.config["WORKER_MAINTENANCE_INTERVAL"],
            log_job_description=False,
        )
        super().__init__(names, *args, **kwargs)

    def execute_job(self, job: Job, queue: Queue) -> None:
        with self.app.app_context():
            super().execute_job(job, queue)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # Every pop went through an intermediate list (AppQueue), whatever the queue count.
        super().prepare_job_execution(job, remove_from_intermediate_queue=True)

    def unsubscribe(self) -> None:
        """RQ's, with the thread stopped before UNSUBSCRIBE is sent.

        RQ unsubscribes first: when the pub/sub thread reads the reply before it is
        told to stop, it blocks in a 60 s read and every worker exit waits out the
        1 s join timeout. Stopped first, the reply ends its loop at once.
        """
        if self.pubsub_thread:
            self.pubsub_thread.stop()
            self.pubsub.unsubscribe()
            self.pubsub_thread.join(timeout=1)
            self.pubsub.close()

    def teardown(self) -> None:
        from app.smtp import get_mailer

        get_mailer(self.app).close()
        super().teardown()
