"""`LeanJobs`: what RQ does around every job, minus what a mail job does not need.

Profiled (README, Performance), RQ 2.12's SimpleWorker spends about 29 Redis
round trips on each job besides the job's own: three un-pipelined heartbeats
(HSET + EXPIRE each), the worker state written idle twice, a suspension check,
and a success path that WATCHes the dependents set, reads the job's status three
times and its execution list twice before one MULTI/EXEC. Each round trip costs
~0.1 ms of worker CPU in redis-py, plus Redis's own. It also logs three INFO
lines per job. This mixin (AppWorker's base, before SimpleWorker) cuts:

- heartbeats without a pipeline: at most one a second (the worker key lives
  for minutes; the pipelined heartbeats RQ sends with each job are kept);
- worker state writes that change nothing (`idle` after `idle`);
- the `rq suspend` check: at most once a second;
- the per-job INFO lines (dequeued, completed, Job OK): logged at DEBUG;
- for our own jobs only (LEAN_JOBS, result_ttl 0, no repeat, no group), the
  success path: the same writes RQ makes (counters, execution and started-
  registry entry removed, job hash deleted, worker idle) in one MULTI/EXEC,
  without the reads, and without the job's last heartbeat write just before it;
- and for those jobs, the per-job round trips themselves: when the worker pops
  one, it claims up to BATCH_SIZE - 1 more from the same queue in one LMOVE
  script (into the intermediate list, as every pop), registers all of them as
  started in one MULTI/EXEC (what prepare_execution and prepare_job_execution
  write, including the PERSIST that Job.perform would send), runs each through
  RQ's own perform_job (its timeout, failure and retry handling unchanged) and
  writes the successes in one MULTI/EXEC at the end. A job of the batch whose
  turn has not come keeps its started-registry entry fresh (refreshed every
  REFRESH_SECONDS), so maintenance never takes it for abandoned while this
  worker lives, and recovers it as usual if the worker dies; a warm shutdown
  puts the unstarted ones back at the head of their queue.

Every guarantee stays: jobs still move queue -> intermediate list -> started
registry atomically, run under the death penalty (job timeout), fail and retry
through RQ's own paths, and are recovered by maintenance if the worker dies.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rq.executions import Execution
from rq.job import Job, JobStatus, _job_stack
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus

# Job functions whose success needs no RQ reads: they never have dependents,
# callbacks, repeats or groups, and keep no result (result_ttl=0).
LEAN_JOBS = frozenset({"jobs.mail.deliver"})

# RQ's per-job INFO messages (rq/worker/base.py), demoted to DEBUG.
PER_JOB_MESSAGES = frozenset(
    {
        "Worker %s: %s: %s",
        "Worker %s: %s: %s (%s)",
        "Successfully completed job %s in %ss on worker %s",
        "Successfully completed %s job in %ss on worker %s",
    }
)

THROTTLE_SECONDS = 1.0
# Jobs claimed per pop (1 turns claiming off). Bounded so a batch is short (each
# mail takes about a millisecond) and a second worker gets its share.
BATCH_SIZE = 16
# How often the started-registry entries of a batch's waiting jobs are extended.
REFRESH_SECONDS = 5.0

# KEYS: queue, its intermediate list. ARGV: how many. Pops like AppQueue.dequeue_any.
_CLAIM = """
local ids = {}
for _ = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  ids[#ids + 1] = id
end
return ids
"""


class LeanJob(Job):
    """A Job whose PERSIST (Job.perform's first round trip) can be sent ahead, in the
    MULTI/EXEC that registers a claimed batch."""

    persisted = False

    def perform(self) -> Any:
        if not self.persisted:
            return super().perform()
        _job_stack.push(self)
        try:
            self._result = self._execute()
        finally:
            assert self is _job_stack.pop()
        return self._result


class _QuietPerJob(logging.LoggerAdapter):  # type: ignore[type-arg,unused-ignore]
    """RQ's worker logger, with the per-job INFO lines moved to DEBUG."""

    def info(self, msg: object, *args: Any, **kwargs: Any) -> None:
        if msg in PER_JOB_MESSAGES:
            self.logger.debug(msg, *args, **kwargs)
        else:
            self.logger.info(msg, *args, **kwargs)

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return msg, kwargs

    def __getattr__(self, name: str) -> Any:
        # RQ reads logger attributes too (e.g. `level` when starting its scheduler).
        return getattr(self.logger, name)


class LeanJobs(BaseWorker):
    """Mixin for an RQ worker class: see the module docstring."""

    _last_heartbeat_write = 0.0
    _last_suspension_check = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = _QuietPerJob(logging.getLogger("rq.worker"))  # type: ignore[assignment]
        if self.job_class is Job:
            self.job_class = LeanJob
        self._batch: dict[str, Execution] = {}  # claimed job id -> its execution
        self._batch_pipeline: Any = None  # successes waiting for the end of the batch

    # -- batches --------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        if BATCH_SIZE <= 1 or not _is_lean(job, self.default_result_ttl):
            super().execute_job(job, queue)
            return
        jobs = [job, *self._claim(queue, BATCH_SIZE - 1)]
        self._register([j for j in jobs if _is_lean(j, self.default_result_ttl)], queue)
        refreshed = time.monotonic()
        done = 0
        try:
            with self.connection.pipeline() as successes:
                self._batch_pipeline = successes
                for current in jobs:
                    if self._stop_requested:
                        break
                    if time.monotonic() - refreshed > REFRESH_SECONDS:
                        self._refresh(jobs[done:], queue)
                        refreshed = time.monotonic()
                    done += 1
                    if current.id in self._batch:
                        self.execution = self._batch.pop(current.id)
                        self.perform_job(current, queue)
                    else:
                        super().execute_job(current, queue)  # not ours: RQ's own way
                self._batch_pipeline = None
                self.set_state(WorkerStatus.IDLE, pipeline=successes)
                successes.execute()
        finally:
            self._batch_pipeline = None
            if done < len(jobs):  # stop requested, or an error escaped RQ's handling
                self._release(jobs[done:], queue)
            self._batch.clear()

    def _claim(self, queue: Queue, count: int) -> list[Job]:
        """Up to `count` more jobs of `queue`, moved to its intermediate list."""
        raw: Any = self.connection.eval(
            _CLAIM, 2, queue.key, queue.intermediate_queue_key, str(count)
        )
        if not raw:
            return []
        ids = [item.decode() for item in raw]
        fetched = self.job_class.fetch_many(ids, self.connection, serializer=self.serializer)
        jobs = [job for job in fetched if job is not None]
        gone = [job_id for job_id, job in zip(ids, fetched, strict=True) if job is None]
        for job_id in gone:  # no data any more: drop the id, as AppQueue does
            self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
        return jobs

    def _register(self, jobs: list[Job], queue: Queue) -> None:
        """Intermediate list -> started registry for every job, in one MULTI/EXEC:
        what prepare_execution and prepare_job_execution write for each."""
        stamp = now()
        with self.connection.pipeline() as pipeline:
            for job in jobs:
                ttl = self.get_heartbeat_ttl(job)
                self._batch[job.id] = Execution.create(
                    job, ttl, pipeline=pipeline, worker_name=self.name
                )
                pipeline.lrem(queue.intermediate_queue_key, 1, job.id)
                job.heartbeat(stamp, ttl, pipeline=pipeline)
                job.prepare_for_execution(self.name, pipeline=pipeline)
                pipeline.persist(job.key)
                if isinstance(job, LeanJob):
                    job.persisted = True
            self.set_state(WorkerStatus.BUSY, pipeline=pipeline)
            self.set_current_job_id(jobs[0].id, pipeline=pipeline)
            self.set_current_job_working_time(0, pipeline=pipeline)
            self.heartbeat(self.get_heartbeat_ttl(jobs[0]), pipeline=pipeline)
            pipeline.execute()

    def _refresh(self, jobs: list[Job], queue: Queue) -> None:
        """Extend the started-registry entries of the batch's waiting jobs."""
        with self.connection.pipeline() as pipeline:
            for job in jobs:
                execution = self._batch.get(job.id)
                if execution is not None:
                    ttl = self.get_heartbeat_ttl(job)
                    execution.heartbeat(queue.started_job_registry, ttl, pipeline=pipeline)
            self.heartbeat(pipeline=pipeline)
            pipeline.execute()

    def _release(self, jobs: list[Job], queue: Queue) -> None:
        """Unstarted jobs of the batch go back to the head of their queue (warm
        shutdown). If Redis is unreachable they stay registered, for maintenance."""
        with self.connection.pipeline() as pipeline:
            for job in reversed(jobs):
                execution = self._batch.pop(job.id, None)
                if execution is None:  # never registered: still in the intermediate list
                    pipeline.lrem(queue.intermediate_queue_key, 1, job.id)
                else:
                    execution.delete(job=job, pipeline=pipeline)
                job.set_status(JobStatus.QUEUED, pipeline=pipeline)
                pipeline.lpush(queue.key, job.id)
            pipeline.execute()

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        if self._batch_pipeline is not None and _is_lean(job, self.default_result_ttl):
            return  # registered with its batch
        super().prepare_job_execution(job, remove_from_intermediate_queue)

    # -- fewer round trips per job ----------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        if pipeline is None and timeout is None:
            moment = time.monotonic()
            if moment - self._last_heartbeat_write < THROTTLE_SECONDS:
                return
            self._last_heartbeat_write = moment
        super().heartbeat(timeout, pipeline=pipeline)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline=pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        moment = time.monotonic()
        if moment - self._last_suspension_check < THROTTLE_SECONDS:
            return
        self._last_suspension_check = moment
        super().check_for_suspension(burst)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        if not _is_lean(job, self.default_result_ttl):
            super().handle_execution_ended(job, queue, heartbeat_ttl)
            return
        # RQ also writes the job's last heartbeat here; on success the job is deleted
        # a moment later, on failure RQ's failure path rewrites the job anyway.
        job.ended_at = now()

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry
    ) -> None:
        if not _is_lean(job, self.default_result_ttl) or self.execution is None:
            super().handle_job_success(job, queue, started_job_registry)
            return
        assert job.started_at is not None and job.ended_at is not None
        if self._batch_pipeline is not None:
            self._write_success(job, self._batch_pipeline)  # sent at the end of the batch
            return
        with self.connection.pipeline() as pipeline:
            self._write_success(job, pipeline)
            self.set_state(WorkerStatus.IDLE, pipeline=pipeline)
            pipeline.execute()

    def _write_success(self, job: Job, pipeline: Any) -> None:
        assert job.started_at is not None and job.ended_at is not None
        self.increment_successful_job_count(pipeline=pipeline)
        self.increment_total_working_time(job.ended_at - job.started_at, pipeline)
        # Execution hash, its started-registry entry, worker's current job: as RQ.
        self.cleanup_execution(job, pipeline=pipeline)
        # What job.delete() writes for a started job (it first reads its status and
        # executions to find these keys; we know them).
        pipeline.delete(
            job.execution_registry.key, job.key, job.dependents_key, job.dependencies_key
        )


def _is_lean(job: Job, default_result_ttl: int) -> bool:
    return (
        job.func_name in LEAN_JOBS
        and job.get_result_ttl(default_result_ttl) == 0
        and not job.repeats_left
        and not job.group_id
    )
