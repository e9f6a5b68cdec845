"""`LeanJobs`: what RQ does around every job, minus what a mail job does not need.

Profiled (README, Performance), RQ 2.12's SimpleWorker spends about 29 Redis
round trips on each job besides the job's own: three un-pipelined heartbeats
(HSET + EXPIRE each), the worker state written idle twice, a suspension check,
and a success path that WATCHes the dependents set, reads the job's status three
times and its execution list twice before one MULTI/EXEC. Each round trip costs
~0.1 ms of worker CPU in redis-py, plus Redis's own. It also logs three INFO
lines per job. This mixin (AppWorker's base, before SimpleWorker) cuts:

- heartbeats without a pipeline: at most one a second (the worker key lives
  for minutes); in a batch, the heartbeat RQ writes with each job's start only
  when the worker key's TTL has run down by a second;
- worker state writes that change nothing (`idle` after `idle`, `busy` for
  each job of a batch);
- the `rq suspend` check: at most once a second;
- the per-job INFO lines (dequeued, completed, Job OK): logged at DEBUG;
- for our own jobs only (LEAN_JOBS, result_ttl 0, no repeat, no group), the
  success path: the same writes RQ makes (counters, execution and started-
  registry entry removed, job hash deleted, worker idle) in one MULTI/EXEC,
  without the reads, and without the job's last heartbeat write just before it;
- and for those jobs, round trips between jobs: when the worker pops one, it
  claims up to BATCH_SIZE - 1 more from its lane or higher ones (app/scripts.py,
  claim: LMOVE into the intermediate list, as every pop) and runs them one after the other, each
  through RQ's own perform_job (its timeout, failure and retry handling
  unchanged). A job moves from the intermediate list to the started registry
  in one atomic step that also writes the previous job's success (and sends
  the PERSIST Job.perform would send alone): RQ's own writes, sent as one
  script rather than a MULTI/EXEC of twenty commands (run_as_script). The
  job's own first step (a delivery's attempt claim, FIRST_STEPS) follows in
  the same round trip, and so does the previous mail's `sent`, which
  `deliver` hands to the worker instead of writing it (LeanJob.sent_step): it
  goes out as soon as the job returns, first in that round trip, so a mail job
  costs one round trip in all. Only the running job is ever in the
  started registry; the claimed ones wait in the intermediate list, where a
  dead worker's are re-queued by maintenance; a warm shutdown, or a batch that
  has run BATCH_SECONDS, puts the unstarted ones back at the head of the queue;
- lanes (app.queues.QUEUE_NAMES, listen order = priority): the round trip that
  starts a mail also asks whether a lane above the next claimed job's has work;
  if one has, the batch ends there and its unstarted jobs go back, so a mail of a
  higher lane waits behind at most the one mail being started.

Every guarantee stays: jobs still move queue -> intermediate list -> started
registry atomically, run under the death penalty (job timeout), fail and retry
through RQ's own paths, and are recovered by maintenance if the worker dies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis.exceptions
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.utils import now
from rq.worker import BaseWorker, WorkerStatus

from app.leanjob import LeanJob
from app.mail import DELIVER_JOB
from app.queues import ring
from app.scripts import HIGHER_WAITING, PUT_BACK, claim, run_as_script
from jobs.mail import queue_claim, write_sent

# Job functions whose success needs no RQ reads: they never have dependents,
# callbacks, repeats or groups, and keep no result (result_ttl=0).
LEAN_JOBS = frozenset({DELIVER_JOB})

# A lean job's first Redis step, queued in the round trip that starts it; the reply is
# left on the job as `claimed_attempt` for the job function to use.
FIRST_STEPS: dict[str, Callable[[Any, Job], None]] = {DELIVER_JOB: queue_claim}

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
# A batch starts no new job after this long: its claimed jobs wait in the intermediate
# list, and maintenance (AppWorker.requeue_stranded) allows a mail job that waits
# BATCH_SECONDS plus one job's timeout before it takes it for stranded.
BATCH_SECONDS = 2.0


@dataclass
class _Pending:
    """A lean job that succeeded, with its mail's `sent` write (`deliver`'s sent_step)."""

    job: Job
    execution: Execution
    queue: Queue
    sent: Callable[[Any], None] | None


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
    _worker_key_expires = 0.0  # time.monotonic() when the worker key's last TTL runs out
    _last_suspension_check = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.log = _QuietPerJob(logging.getLogger("rq.worker"))  # type: ignore[assignment]
        if self.job_class is Job:
            self.job_class = LeanJob
        self._in_batch = False
        # Set by each start (_start_many): a lane above the claimed jobs' that has work.
        self.waiting_lane: int | None = None
        # Lean jobs that succeeded, whose success (and their mails' `sent`) is written with
        # the next registration.
        self._pending: list[_Pending] = []

    # -- batches --------------------------------------------------------------------

    def execute_job(self, job: Job, queue: Queue) -> None:
        if BATCH_SIZE <= 1 or not _is_lean(job, self.default_result_ttl):
            super().execute_job(job, queue)
            return
        claimed = time.monotonic()
        # More from the job's lane or a higher one (whose jobs CLAIM takes first); the
        # lane check below ends the batch when a higher lane gets work meanwhile.
        lanes = self.queues[: self.lane_of(queue) + 1]
        jobs = [(job, queue), *self.claim_from(lanes, BATCH_SIZE - 1)]
        done = 0
        self._in_batch = True
        try:
            for current, lane in jobs:
                if self._stop_requested or (done and time.monotonic() - claimed > BATCH_SECONDS):
                    break
                done += 1
                if _is_lean(current, self.default_result_ttl):
                    after = jobs[done][1] if done < len(jobs) else None
                    # Before each mail: does a lane above the next claimed job's have work?
                    self._start(current, lane, above=self.lane_of(after) if after else 0)
                    if isinstance(current, LeanJob):
                        current.carries_sent = True
                    self.perform_job(current, lane)
                    if self._end_batch_after(current) or self.waiting_lane is not None:
                        break
                else:
                    self._flush()
                    super().execute_job(current, lane)  # not ours: RQ's own way
            self._flush(idle=True)
        finally:
            self._in_batch = False
            if done < len(jobs):
                # Stop requested, batch time spent, a higher lane has work, or an error
                # escaped RQ's handling: the jobs not started go back to the head of
                # their queue (and the worker's next pop starts at the highest lane).
                try:
                    self._release(jobs[done:])
                except redis.exceptions.RedisError as err:
                    # They stay in the intermediate list: maintenance re-queues them.
                    self.log.warning(
                        "Worker %s: could not put back %d claimed jobs: %s",
                        self.name,
                        len(jobs) - done,
                        err,
                    )

    def _end_batch_after(self, job: Job) -> bool:
        """Whether the batch should stop after `job` (app/inflight.py: a slow server)."""
        return False

    def lane_of(self, queue: Queue) -> int:
        """The queue's place in the worker's listen order (0: the highest lane)."""
        for index, listened in enumerate(self.queues):
            if listened.name == queue.name:
                return index
        return len(self.queues)

    def claim_from(self, queues: Sequence[Queue], count: int) -> list[tuple[Job, Queue]]:
        """Up to `count` more jobs from the first of `queues` that has work (then the
        next), crash-safely, in one round trip (app/scripts.py, claim)."""
        return claim(self.connection, queues, count, self.job_class, self.serializer)

    def _start(self, job: Job, queue: Queue, above: int = 0) -> None:
        """Start one job (see _start_many); it is then `self.execution`."""
        self.execution = self._start_many([(job, queue)], above)[0]

    def _start_many(self, jobs: Sequence[tuple[Job, Queue]], above: int = 0) -> list[Execution]:
        """Intermediate list -> started registry for each job, atomically (one script
        each) and the first atomically with the pending successes: what
        prepare_execution and prepare_job_execution write (and the PERSIST that
        Job.perform would send on its own); each job's FIRST_STEPS step follows its
        start. All in one round trip; returns each job's execution.

        The lane check rides on that round trip: `waiting_lane` is then the index of
        the first of the worker's first `above` queues that has a job waiting (None if
        none), so the caller starts no claimed job of a lower lane (app/scripts.py,
        HIGHER_WAITING) and claims again from the top instead."""
        executions: list[Execution] = []
        steps: list[tuple[LeanJob, int]] = []  # a job, and its first step's reply index
        with self.connection.pipeline(False) as pipeline:
            carried: list[_Pending] = []
            for job, queue in jobs:
                ttl = self.get_heartbeat_ttl(job)
                with self.connection.pipeline() as writes:
                    # RQ's own methods queue their writes on `writes`, which is never
                    # executed: its commands are sent as one script (see _RUN_WRITES).
                    if not executions:
                        carried = self._queue_pending(pipeline, writes)
                    execution = Execution.create(job, ttl, pipeline=writes, worker_name=self.name)
                    writes.lrem(queue.intermediate_queue_key, 1, job.id)
                    # Maintenance's "first seen waiting" mark, if a pass saw it held in a
                    # batch: left behind, a later wait of the same id would look stranded.
                    writes.delete(queue.intermediate_queue.get_first_seen_key(job.id))
                    if self._state != WorkerStatus.BUSY:  # a batch stays busy until its end
                        self.set_state(WorkerStatus.BUSY, pipeline=writes)
                    self.set_current_job_id(job.id, pipeline=writes)
                    if self._worker_key_expires - time.monotonic() < ttl - THROTTLE_SECONDS:
                        # Else the worker key, written less than a second ago with this
                        # TTL, still outlives the job's heartbeat TTL minus a second.
                        self.heartbeat(ttl, pipeline=writes)
                    job.prepare_for_execution(self.name, pipeline=writes)
                    writes.persist(job.key)
                    run_as_script(pipeline, writes)
                executions.append(execution)
                if isinstance(job, LeanJob):
                    first_step = FIRST_STEPS.get(job.func_name or "")
                    if first_step is not None:
                        first_step(pipeline, job)
                        steps.append((job, len(pipeline.command_stack) - 1))
            if above > 0:
                higher = [queue.key for queue in self.queues[:above]]
                pipeline.eval(HIGHER_WAITING, len(higher), *higher)
            replies = self._execute(pipeline, carried)
        self.waiting_lane = int(replies[-1]) - 1 if above > 0 and replies[-1] else None
        for job, _queue in jobs:
            if isinstance(job, LeanJob):
                job.persisted = True
        for job, index in steps:
            job.claimed_attempt = replies[index]
        return executions

    def _flush(self, idle: bool = False) -> None:
        """Write the pending successes now (and the worker's idle state)."""
        if not self._pending and not idle:
            return
        with self.connection.pipeline() as pipeline:
            carried = self._queue_pending(pipeline, pipeline)
            if idle:
                self.set_state(WorkerStatus.IDLE, pipeline=pipeline)
            self._execute(pipeline, carried)

    def _queue_pending(self, pipeline: Any, writes: Any) -> list[_Pending]:
        """Queue the pending successes: their mails' `sent` on `pipeline` (first: a
        script, which cannot run inside _RUN_WRITES), RQ's writes on `writes`. Returns
        what it queued, for _execute."""
        pending, self._pending = self._pending, []
        for done in pending:
            if done.sent is not None:
                done.sent(pipeline)
        current = self.execution
        for done in pending:
            self.execution = done.execution
            self._write_success(done.job, writes)
        self.execution = current
        return pending

    def _execute(self, pipeline: Any, carried: list[_Pending]) -> Any:
        """Run `pipeline`. If it fails on the connection, the `sent` it carried may not
        have landed: record each on its own, with record_sent's retries. If that fails
        too, the job goes through RQ's failure path (retried, its record still
        `sending`), as it would had `deliver` failed to record it. Either way the error
        is raised."""
        try:
            return pipeline.execute()
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as err:
            for done in carried:
                if done.sent is None:
                    continue
                try:
                    write_sent(self.connection, done.sent)
                except redis.exceptions.RedisError:
                    current, self.execution = self.execution, done.execution
                    try:
                        self.handle_job_failure(
                            done.job, done.queue, exc_string=f"`sent` not recorded: {err}"
                        )
                    finally:
                        self.execution = current
            raise

    def perform_job(self, job: Job, queue: Queue) -> bool:
        try:
            return super().perform_job(job, queue)
        finally:
            # `deliver` handed over its `sent`, but the job did not end on the success
            # path that takes it (e.g. its timeout fired just after): write it now.
            sent = _take_sent(job)
            if sent is not None:
                write_sent(self.connection, sent)

    def _release(self, claimed: Sequence[tuple[Job, Queue]]) -> None:
        """Claimed jobs never started go back to the head of their queue, in order, in
        one round trip (with the pending successes); one that maintenance already put
        back, or that was started after all, is not pushed (PUT_BACK)."""
        with self.connection.pipeline() as pipeline:
            carried = self._queue_pending(pipeline, pipeline)
            for job, queue in reversed(claimed):
                seen_key = queue.intermediate_queue.get_first_seen_key(job.id)
                keys = (queue.intermediate_queue_key, queue.key, seen_key)
                pipeline.eval(PUT_BACK, 3, *keys, job.id)
            ring(pipeline, len(claimed))  # another idle worker may take them now
            self._execute(pipeline, carried)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        ran = getattr(job, "outcome", None) is not None
        if self._in_batch and (ran or _is_lean(job, self.default_result_ttl)):
            return  # _start wrote it (or, for a job that ran in a slot, InFlight._launch)
        super().prepare_job_execution(job, remove_from_intermediate_queue)

    # -- fewer round trips per job ----------------------------------------------------

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        moment = time.monotonic()
        if pipeline is None and timeout is None:
            if moment - self._last_heartbeat_write < THROTTLE_SECONDS:
                return
            self._last_heartbeat_write = moment
        super().heartbeat(timeout, pipeline=pipeline)
        self._worker_key_expires = moment + (timeout or self.worker_ttl + 60)

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
        if self._in_batch:
            # Written with the next job's registration (or at the end of the batch).
            self._pending.append(_Pending(job, self.execution, queue, _take_sent(job)))
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


def _take_sent(job: Job) -> Callable[[Any], None] | None:
    """The `sent` write `deliver` handed over (LeanJob.sent_step), now the caller's."""
    sent = getattr(job, "sent_step", None)
    if sent is not None:
        job.sent_step = None  # type: ignore[attr-defined]
    return sent


def _is_lean(job: Job, default_result_ttl: int) -> bool:
    return (
        job.func_name in LEAN_JOBS
        and job.get_result_ttl(default_result_ttl) == 0
        and not job.repeats_left
        and not job.group_id
    )
