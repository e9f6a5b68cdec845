"""`InFlight`: up to MAIL_CONCURRENCY jobs running at once in one worker process.

A provider's SMTP replies take tens of milliseconds, so a worker that delivers one
mail at a time mostly waits on round trips. Here the worker's main thread keeps
all of RQ's bookkeeping, one job at a time as RQ expects, and only the job
functions run on a pool of threads ("slots"), each mail over an SMTP connection
of its own from the Mailer's pool (app/smtp.py):

- a free slot is filled from the worker's queues in their listen order (the
  first that has work), with the crash-safe claim (LMOVE into the queue's
  intermediate list) and the start of app/leanworker.py: the job is in the
  started registry, with an execution of its own, before its function runs, and
  leaves it only when RQ records its end, so the registries name every job in
  flight;
- its function runs on the slot's thread inside an app context; what it
  returned or raised is kept on the job (LeanJob.perform_in_slot);
- back on the main thread, RQ's own perform_job runs the job again, which now
  only hands back that outcome (LeanJob.perform): RQ's success, failure and
  retry paths run unchanged, and a mail's `sent` rides on the next start as in
  a batch (one Redis round trip a mail);
- SIGALRM reaches only the main thread, and one job: each job has a deadline
  instead, at which the main thread raises JobTimeoutException in the slot's
  thread and shuts down the SMTP socket it may be blocked on;
- a warm shutdown starts nothing new and waits for every job in flight; the jobs
  of a killed worker are in the started registry, and maintenance recovers them
  as it recovers any other.

MAIL_CONCURRENCY=1 keeps the one-at-a-time worker of app/leanworker.py.
"""

from __future__ import annotations

import ctypes
import logging
import math
import queue as stdlib_queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.suspension import is_suspended
from rq.timeouts import JobTimeoutException

from app.leanworker import PUT_BACK, LeanJob, LeanJobs, _is_lean
from app.smtp import get_mailer

log = logging.getLogger("mailqueue.inflight")

# Longest the main thread waits for a job to end before it looks at deadlines,
# heartbeats and maintenance again.
TICK_SECONDS = 0.5
# After its deadline fired, a job still running this long is logged as stuck (a
# thread cannot be killed: its slot stays taken until the function returns).
STUCK_SECONDS = 10.0

# KEYS: pairs of (queue, its intermediate list), in the worker's order. ARGV: how many.
# Pops up to that many ids, from the first queue until it is empty, then the next:
# a free slot always goes to the first queue that has work. Returns [index, id, ...].
_CLAIM_ANY = """
local out, left = {}, tonumber(ARGV[1])
for k = 1, #KEYS, 2 do
  while left > 0 do
    local id = redis.call('LMOVE', KEYS[k], KEYS[k + 1], 'LEFT', 'RIGHT')
    if not id then break end
    out[#out + 1] = (k + 1) / 2
    out[#out + 1] = id
    left = left - 1
  end
  if left == 0 then break end
end
return out
"""


class SlotTimeout(JobTimeoutException):
    """Raised in a slot's thread when its job runs past its timeout."""

    def __init__(self, *args: object) -> None:
        super().__init__(*(args or ("the job ran past its timeout",)))


@dataclass(eq=False)
class _Slot:
    """A job in flight: where it came from, its execution, and its deadline."""

    job: LeanJob
    queue: Queue
    execution: Execution | None
    deadline: float  # time.monotonic(); math.inf for a job without a timeout
    thread: int = 0  # the slot thread's ident, once it runs the job
    running: bool = True  # the job's function has not returned (under `lock`)
    fired: float = 0.0  # when its deadline fired
    lock: threading.Lock = field(default_factory=threading.Lock)


class InFlight(LeanJobs):
    """Mixin for AppWorker (before LeanJobs): see the module docstring."""

    app: Any  # the worker's Flask app (AppWorker)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.concurrency = effective_concurrency(self.app.config)
        self._slots: dict[str, _Slot] = {}
        self._ended: stdlib_queue.SimpleQueue[_Slot] = stdlib_queue.SimpleQueue()
        self._tasks: stdlib_queue.SimpleQueue[_Slot] = stdlib_queue.SimpleQueue()
        self._threads = 0
        self._idle_threads = 0
        self._threads_lock = threading.Lock()
        self._last_suspension_poll = 0.0
        self._suspended = False

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self.concurrency <= 1 or not isinstance(job, LeanJob):
            super().execute_job(job, queue)
            return
        claimed: list[tuple[LeanJob, Queue]] = [(job, queue)]
        self._in_batch = True
        try:
            while True:
                free = self.concurrency - len(self._slots)
                if free > len(claimed) and self._may_claim():
                    claimed += self._claim_any(free - len(claimed))
                while claimed:
                    self._launch(*claimed.pop(0))
                self._flush()
                if not self._slots:
                    break
                self._finish(self._wait())
                self._tend()
        except redis.exceptions.RedisError as err:
            # Redis went away: stop taking jobs, but see the running ones through, so
            # none loses what it did (their `sent` is written with record_sent's retries).
            log.error("Worker %s: Redis error with jobs in flight: %s", self.name, err)
            self._release_claimed(claimed)
            self._drain()
            raise
        finally:
            self._in_batch = False
        self._flush(idle=True)

    # -- filling slots ----------------------------------------------------------------

    def _may_claim(self) -> bool:
        """Not stopping, and not suspended (`rq suspend`, polled at most once a second)."""
        if self._stop_requested:
            return False
        moment = time.monotonic()
        if moment - self._last_suspension_poll >= 1.0:
            self._last_suspension_poll = moment
            self._suspended = bool(is_suspended(self.connection, self))
        return not self._suspended

    def _claim_any(self, count: int) -> list[tuple[LeanJob, Queue]]:
        """Up to `count` more jobs, from the first of the worker's queues that has work,
        each moved to its queue's intermediate list (where maintenance finds it if the
        worker dies before starting it)."""
        keys: list[str] = []
        for queue in self.queues:
            keys += [queue.key, queue.intermediate_queue_key]
        raw: Any = self.connection.eval(_CLAIM_ANY, len(keys), *keys, str(count))
        if not raw:
            return []
        queues = [self.queues[int(index) - 1] for index in raw[0::2]]
        ids = [item.decode() for item in raw[1::2]]
        fetched = self.job_class.fetch_many(ids, self.connection, serializer=self.serializer)
        claimed: list[tuple[LeanJob, Queue]] = []
        for job_id, queue, job in zip(ids, queues, fetched, strict=True):
            if job is None:  # no data any more: drop the id, as AppQueue does
                self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
            else:
                assert isinstance(job, LeanJob)  # AppWorker's job class
                claimed.append((job, queue))
        return claimed

    def _launch(self, job: LeanJob, queue: Queue) -> None:
        """Start `job` (intermediate list -> started registry) and hand it to a slot."""
        if _is_lean(job, self.default_result_ttl):
            self._start(job, queue)
            job.carries_sent = True
        else:
            self._flush()
            self.prepare_execution(job)
            self.prepare_job_execution(job)
        timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
        deadline = math.inf if timeout < 0 else time.monotonic() + timeout
        slot = _Slot(job, queue, self.execution, deadline)
        self._slots[job.id] = slot
        self._tasks.put(slot)
        with self._threads_lock:
            spawn = self._idle_threads == 0 and self._threads < self.concurrency
            if spawn:
                self._threads += 1
        if spawn:
            thread = threading.Thread(target=self._slot_loop, name="mailqueue-slot", daemon=True)
            thread.start()

    def _release_claimed(self, claimed: list[tuple[LeanJob, Queue]]) -> None:
        """Claimed jobs never started go back to the head of their queue (if still in
        its intermediate list); on a Redis error maintenance re-queues them instead."""
        for job, queue in reversed(claimed):
            seen_key = queue.intermediate_queue.get_first_seen_key(job.id)
            keys = (queue.intermediate_queue_key, queue.key, seen_key)
            try:
                self.connection.eval(PUT_BACK, 3, *keys, job.id)
            except redis.exceptions.RedisError:
                return

    # -- the slots' threads -------------------------------------------------------------

    def _slot_loop(self) -> None:
        """A slot's thread: runs jobs as they come, each in an app context of its own."""
        while True:
            with self._threads_lock:
                self._idle_threads += 1
            slot = self._tasks.get()
            with self._threads_lock:
                self._idle_threads -= 1
            self._run(slot)

    def _run(self, slot: _Slot) -> None:
        slot.thread = threading.get_ident()
        try:
            try:
                with self.app.app_context():
                    slot.job.perform_in_slot()
            finally:
                with slot.lock:
                    slot.running = False
        except JobTimeoutException as err:
            # The deadline fired just as the job ended, outside it: keep what it did.
            if slot.job.outcome is None:
                slot.job.outcome = (None, err)
            slot.running = False
        finally:
            self._ended.put(slot)

    # -- jobs that ended ----------------------------------------------------------------

    def _wait(self) -> list[_Slot]:
        """The slots whose job ended: waits for one up to the next deadline or a tick."""
        soonest = min(slot.deadline for slot in self._slots.values())
        wait = max(0.0, min(TICK_SECONDS, soonest - time.monotonic()))
        try:
            ended = [self._ended.get(timeout=wait)]
        except stdlib_queue.Empty:
            return []
        while True:
            try:
                ended.append(self._ended.get_nowait())
            except stdlib_queue.Empty:
                return ended

    def _finish(self, ended: list[_Slot]) -> None:
        """RQ's own end of each job, on this thread: perform_job hands back its outcome."""
        for slot in ended:
            del self._slots[slot.job.id]
            self.execution = slot.execution
            try:
                self.perform_job(slot.job, slot.queue)
            except redis.exceptions.RedisError as err:
                # Its `sent` could not be recorded even with retries: RQ's failure path
                # ran for it (app/leanworker.py); the others still get their end.
                log.error("Worker %s: Redis error ending job %s: %s", self.name, slot.job.id, err)
            finally:
                self.execution = None

    def _drain(self) -> None:
        """Wait for every job in flight and record its end, riding out Redis errors."""
        while self._slots:
            try:
                self._finish(self._wait())
                self._flush()
                self._expire()
            except redis.exceptions.RedisError as err:
                log.error("Worker %s: Redis error finishing jobs: %s", self.name, err)
                time.sleep(1)

    def _tend(self) -> None:
        """Between jobs: deadlines, the worker's heartbeat, and due maintenance."""
        self._expire()
        self.heartbeat()
        if self.should_run_maintenance_tasks:
            self.run_maintenance_tasks()

    def _expire(self) -> None:
        """Raise JobTimeoutException in each slot past its deadline, and shut down the
        SMTP socket it may be blocked on (the exception reaches a thread only when it
        runs Python code again)."""
        moment = time.monotonic()
        for slot in self._slots.values():
            if slot.fired:
                if slot.running and moment - slot.fired > STUCK_SECONDS:
                    log.error("Worker %s: job %s is stuck past its timeout", self.name, slot.job.id)
                    slot.fired = moment
                continue
            if moment < slot.deadline or not slot.thread:
                continue
            with slot.lock:
                if not slot.running:
                    continue
                slot.fired = moment
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(slot.thread), ctypes.py_object(SlotTimeout)
                )
            get_mailer(self.app).abort(slot.thread)

    def request_force_stop(self, signum: int, frame: Any) -> None:
        if self._slots:
            self.log.warning(
                "Worker %s: cold shutdown with %d jobs in flight; maintenance will retry them",
                self.name,
                len(self._slots),
            )
        super().request_force_stop(signum, frame)


def effective_concurrency(config: Any) -> int:
    """MAIL_CONCURRENCY, lowered under a tight MAIL_MAX_PER_SECOND: every mail in flight
    waits for its permit inside its job's timeout, so a worker keeps no more in flight
    than the rate lets through in half of MAIL_JOB_TIMEOUT."""
    concurrency = int(config["MAIL_CONCURRENCY"])
    rate = config.get("MAIL_MAX_PER_SECOND")
    if rate:
        concurrency = min(concurrency, max(1, math.floor(rate * config["MAIL_JOB_TIMEOUT"] / 2)))
    return concurrency
