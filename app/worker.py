"""`AppWorker`: the `rq worker -w app.worker.AppWorker` class of the Procfile.

- Builds the Flask app once, at start-up, so a bad configuration stops the
  worker (one line naming the key, exit status 1) before it takes a job, and
  runs every job in a fresh app context.
- Runs jobs in-process (no fork per job: a fork re-imports nothing, but costs
  ~3 ms and loses the reused SMTP connections), up to MAIL_CONCURRENCY at once
  on slot threads (app/inflight.py); job timeouts apply through SIGALRM to a job
  on the main thread and through a per-job deadline to those in slots.
- Always reads and writes jobs as JSON, whatever `--serializer` says.
- Dequeues crash-safely from several queues: RQ pops with BLPOP when a worker
  listens on more than one queue, so a worker killed in that instant loses the
  job. Here every pop is an LMOVE into RQ's per-queue intermediate list, which
  RQ's maintenance pass re-queues from if the worker dies; one script claims from
  the first queue in listen order that has work, so the Procfile's order is the
  lanes' priority (mail-high, mail, digests, mail-bulk), and an idle worker blocks
  on a doorbell rung by every enqueue (app.queues.DOORBELL), not on one queue.
- Runs that maintenance pass every WORKER_MAINTENANCE_INTERVAL seconds (RQ's
  default is 600), idle or busy, so a killed worker's job is retried within
  minutes (README, "Reliability", has the bound), and makes the mail record tell
  the truth about jobs RQ retried or failed on its own.
- Survives Redis restarts: RQ stops a worker on a Redis error in most places of
  its loop (and on any TimeoutError); this one logs, waits and reconnects.

Invariant kept here (the guarantees rest on it, keep it when optimising): a
job id is always in exactly one of its queue, the queue's intermediate list or
the started registry, moved between them atomically (LMOVE; one MULTI/EXEC or script).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis.exceptions
from redis import Redis
from rq import Queue, worker_registration
from rq.exceptions import AbandonedJobError, DequeueTimeout, NoSuchJobError
from rq.executions import Execution
from rq.job import Job
from rq.registry import clean_registries
from rq.serializers import JSONSerializer
from rq.utils import now
from rq.worker import SimpleWorker, WorkerStatus

from app import create_app, events, status
from app.config import load_dotenv_file
from app.errors import ConfigError
from app.inflight import InFlight
from app.leanworker import BATCH_SECONDS
from app.mail import DELIVER_JOB
from app.queues import (
    DOORBELL,
    MAIL_QUEUES,
    RingingQueue,
    get_redis,
    ring,
    route_rq_cli_to_the_app_redis,
)
from app.scripts import PUT_BACK, claim

# `rq worker` reads REDIS_URL from the environment before it builds this class:
# let it see the same `.env` the app reads (this pushes no app context), and the
# sentinels too if REDIS_SENTINELS is set.
load_dotenv_file()
route_rq_cli_to_the_app_redis()

log = logging.getLogger("mailqueue.worker")

# How long an idle worker waits on the DOORBELL before it claims across all lanes again.
POLL_SECONDS = 0.25
# Redis socket timeout: our pops block POLL_SECONDS at most (RQ would set ~7 minutes).
REDIS_SOCKET_TIMEOUT = 10
# RQ holds its per-queue maintenance lock 899 s: a worker killed mid-pass would stop
# every other worker's maintenance (so all recovery) for 15 minutes. A pass takes ms.
MAINTENANCE_LOCK_SECONDS = 30
# Grace after a job's timeout before RQ may call it abandoned (RQ: 60 s). Equal to the
# delivery lease's grace (status.LEASE_GRACE_SECONDS), so while the started-registry
# entry lives, the lease does too and no second worker can send the same mail.
JOB_GRACE_SECONDS = status.LEASE_GRACE_SECONDS
# Where the failed-registry reconciliation got to, per queue (a registry score).
RECONCILED_KEY = "mq:reconciled:{}"


class AppQueue(RingingQueue):
    """A Queue whose multi-queue pop never leaves a job only in a worker's memory."""

    def acquire_maintenance_lock(self) -> bool:
        return bool(
            self.connection.set(self.registry_cleaning_key, 1, nx=True, ex=MAINTENANCE_LOCK_SECONDS)
        )

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
        """One job from the highest lane that has work (the worker's listen order), by
        the claim script (LMOVE, app/scripts.py). With none, block on the DOORBELL, which
        every enqueue rings, for POLL_SECONDS at most (work that arrives without a ring,
        e.g. a deferred mail's due move, is seen then), and claim across all lanes again."""
        queues = list(queues)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = claim(connection, queues, 1, job_class or Job, serializer)
            if got:
                return got[0]
            if deadline is None:
                return None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DequeueTimeout(timeout, [q.key for q in queues])
            wait: Any = min(POLL_SECONDS, remaining)  # redis-py types say int; Redis takes seconds
            connection.blpop([DOORBELL], wait)


class AppWorker(InFlight, SimpleWorker):
    """RQ's in-process worker, inside the mailqueue Flask app, with MAIL_CONCURRENCY
    jobs in flight (app/inflight.py) and without RQ's per-job overhead that a mail job
    does not need (app/leanworker.py)."""

    queue_class = AppQueue
    log_result_lifespan = False
    # RQ backs off up to 60 s between reconnection attempts; a restarted Redis should
    # be noticed within seconds.
    max_connection_wait_time = 5.0

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
        self.push_exc_handler(self._settle_abandoned)

    @property
    def dequeue_timeout(self) -> int:
        # RQ blocks worker_ttl - 15 s (405 s) per pop and runs maintenance only between
        # pops, so an idle worker would clean up after a dead one every ~7 minutes.
        return max(1, min(self.worker_ttl - 15, self.maintenance_interval // 4))

    @property
    def connection_timeout(self) -> int:
        return REDIS_SOCKET_TIMEOUT

    def get_heartbeat_ttl(self, job: Job) -> int:
        if job.timeout and job.timeout > 0:
            return int(job.timeout) + JOB_GRACE_SECONDS
        return super().get_heartbeat_ttl(job)

    # -- running a job -------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        with self.app.app_context():
            try:
                super().execute_job(job, queue)
            except redis.exceptions.RedisError as err:
                # RQ would let this end the worker. The job stays where Redis last saw
                # it (intermediate list or started registry); maintenance recovers it.
                self.log.error("Worker %s: Redis error around job %s: %s", self.name, job.id, err)

    def prepare_execution(self, job: Job) -> Execution:
        """Register the job as started and drop it from the intermediate list in one
        MULTI/EXEC (RQ does these in two round trips, leaving a window in which a
        killed worker's job is in both, and is recovered twice)."""
        with self.connection.pipeline() as pipeline:
            ttl = self.get_heartbeat_ttl(job)
            self.execution = Execution.create(job, ttl, pipeline=pipeline, worker_name=self.name)
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            pipeline.lrem(
                AppQueue(job.origin, connection=self.connection).intermediate_queue_key, 1, job.id
            )
            pipeline.execute()
        return self.execution

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        # prepare_execution already removed it from the intermediate list.
        super().prepare_job_execution(job, remove_from_intermediate_queue=False)

    # -- staying alive across Redis restarts ----------------------------------------

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        while True:
            try:
                return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
            except redis.exceptions.RedisError as err:
                # RQ retries a ConnectionError from the pop itself, but one from the
                # state update before it, or any TimeoutError, ends the worker.
                self.log.error("Worker %s: Redis unavailable (%s); retrying", self.name, err)
                time.sleep(1)

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        try:
            super().heartbeat(timeout)
        except redis.exceptions.RedisError as err:
            self.log.warning("Worker %s: heartbeat failed: %s", self.name, err)

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except redis.exceptions.RedisError as err:
            self.log.warning("Worker %s: suspension check failed: %s", self.name, err)

    def run_maintenance_tasks(self) -> None:
        try:
            super().run_maintenance_tasks()
        except redis.exceptions.RedisError as err:
            self.log.warning("Worker %s: maintenance failed: %s", self.name, err)

    # -- maintenance ----------------------------------------------------------------

    def clean_registries(self) -> None:
        """RQ's pass, plus: re-queue popped-but-never-started jobs, settle failed mail
        records, and always release the lock (RQ leaves it on an error)."""
        for queue in self.queues:
            if not queue.acquire_maintenance_lock():
                continue
            try:
                self.log.info("Worker %s: cleaning registries for queue: %s", self.name, queue.name)
                clean_registries(queue, self._exc_handlers)
                worker_registration.clean_worker_registry(queue)
                self.requeue_stranded(queue)
                if queue.name in MAIL_QUEUES:
                    self.reconcile_failed(queue)
            finally:
                queue.release_maintenance_lock()
        self.last_cleaned_at = now()  # type: ignore[assignment]  # RQ annotates it None

    def requeue_stranded(self, queue: Queue) -> None:
        """Put back, at the front, jobs a dead worker popped but never started.

        Replaces RQ's IntermediateQueue.cleanup, which fails them through the retry
        path (spending a retry and a retry interval) after a hard-coded minute, and
        keeps its first-seen marks for 24 h (a job id re-popped later looks stuck at
        once). An entry seen on two passes at least `grace` apart is stranded: a live
        worker holds a popped job for milliseconds, but a mail job claimed in a batch
        (app/leanworker.py) may wait behind one slow job for its whole timeout.
        """
        grace = max(10, self.maintenance_interval)
        if queue.name in MAIL_QUEUES:
            grace = max(grace, self.app.config["MAIL_JOB_TIMEOUT"] + int(BATCH_SECONDS) + 10)
        stranded: Any = self.connection.lrange(queue.intermediate_queue_key, 0, -1)
        for raw in stranded:
            job_id = raw.decode()
            seen_key = queue.intermediate_queue.get_first_seen_key(job_id)
            if job_id in queue.started_job_registry:
                continue
            if not self.connection.exists(Job.key_for(job_id)):
                self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
                continue
            stamp = time.time()
            if self.connection.set(seen_key, stamp, nx=True, ex=grace * 4):
                continue
            first_seen = float(self.connection.get(seen_key) or stamp)
            if stamp - first_seen < grace:
                continue
            keys = [queue.intermediate_queue_key, queue.key, seen_key]
            if self.connection.eval(PUT_BACK, 3, *keys, job_id):
                with self.connection.pipeline(transaction=False) as pipe:
                    ring(pipe)
                    pipe.execute()
                self.log.warning("Worker %s: re-queued stranded job %s", self.name, job_id)

    def reconcile_failed(self, queue: Queue) -> None:
        """Mark `failed` every mail whose job RQ failed without our code recording it
        (a lost worker with no retries left, retries spent on Redis errors), so no
        record stays `sending` or `queued` for ever. Incremental: entries scored
        after the last pass (minus a minute for clock skew between workers)."""
        registry = queue.failed_job_registry
        mark_key = RECONCILED_KEY.format(queue.name)
        mark = float(self.connection.get(mark_key) or 0)
        entries: Any = self.connection.zrangebyscore(
            registry.key, mark - 60, "+inf", withscores=True
        )
        if not entries:
            return
        ids = [member.decode() for member, _score in entries]
        with self.connection.pipeline(transaction=False) as pipe:
            for mail_id in ids:
                pipe.hget(status.key(mail_id), "status")
            states = pipe.execute()
        ttl = self.app.config["MAIL_STATUS_TTL"]
        for mail_id, state in zip(ids, states, strict=True):
            if state is None or state.decode() in status.FINAL:
                continue
            reason = "RQ gave up on the job: " + _failure_reason(queue, mail_id)
            settled = status.settle(self.connection, mail_id, status.FAILED, reason, ttl)
            if settled:
                template, attempt = settled
                events.emit(
                    events.FAILED,
                    mail_id=mail_id,
                    template=template,
                    attempt=attempt,
                    error="JobFailed",
                    reason=reason,
                )
        self.connection.set(mark_key, max(score for _member, score in entries))

    def _settle_abandoned(self, job: Job, exc_type: Any, exc_value: Any, tb: Any) -> bool:
        """RQ's exception handler hook: when maintenance finds a delivery whose worker
        died, say so in the mail record (`retrying` if RQ retries it, else `failed`)."""
        if exc_type is AbandonedJobError and job.func_name == DELIVER_JOB:
            retrying = bool(job.retries_left and job.retries_left > 0)
            reason = "the worker delivering this mail was lost (killed or crashed)"
            settled = status.settle(
                self.connection,
                job.id,
                status.RETRYING if retrying else status.FAILED,
                reason + ("; retrying" if retrying else "; no retries left"),
                self.app.config["MAIL_STATUS_TTL"],
            )
            if settled:
                template, attempt = settled
                extra: dict[str, Any] = {}
                if retrying and job.retries_left:
                    extra = {
                        "retry_in": job.get_retry_interval(),
                        "retries_left": job.retries_left - 1,
                    }
                events.emit(
                    events.RETRY_SCHEDULED if retrying else events.FAILED,
                    mail_id=job.id,
                    job_id=job.id,
                    template=template,
                    attempt=attempt,
                    error="AbandonedJobError",
                    reason=reason,
                    **extra,
                )
        return True  # let RQ's own handling go on

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


def _failure_reason(queue: Queue, job_id: str) -> str:
    """The last line of RQ's record of why it failed a job."""
    try:
        job = Job.fetch(job_id, connection=queue.connection, serializer=queue.serializer)
        result = job.latest_result()
    except (NoSuchJobError, redis.exceptions.RedisError):
        return "no details"
    text = (result.exc_string if result is not None else "") or ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no details"
