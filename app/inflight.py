"""`InFlight`: up to MAIL_CONCURRENCY jobs running at once in one worker process.

A provider's SMTP replies take tens of milliseconds, so a worker that delivers one
mail at a time mostly waits on round trips. Here the worker's main thread keeps
all of RQ's bookkeeping, one job at a time as RQ expects, and only the job
functions run on a pool of threads ("slots"), each mail over an SMTP connection
of its own from the Mailer's pool (app/smtp.py):

- a free slot is filled from the worker's queues in their listen order (the
  first that has work: the lanes, app.queues.QUEUE_NAMES), with the crash-safe
  claim (LMOVE into the queue's intermediate list) and the start of
  app/leanworker.py, whose round trip also says whether a lane above the jobs
  claimed ahead got work (those then go back, and the next claim starts at the
  top): the job is in the
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

Slots only pay off when the server makes mail wait: while it answers within a
few milliseconds (loopback, a relay on the same host) the worker delivers mail
one at a time on its main thread, in app/leanworker.py's batches, which costs
less CPU; it times each mail's wait to tell (InFlight._end_batch_after).
MAIL_CONCURRENCY=1 always works that way.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import queue as stdlib_queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis.exceptions
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.suspension import is_suspended
from rq.timeouts import JobTimeoutException

from app.leanjob import LeanJob
from app.leanworker import BATCH_SECONDS, LeanJobs, _is_lean
from app.smtp import get_mailer

log = logging.getLogger("mailqueue.inflight")

# Longest the main thread waits for a job to end before it looks at deadlines,
# heartbeats and maintenance again.
TICK_SECONDS = 0.5
# Mails run inline while some mail of the last few waited on the server less than this
# (seconds). A slot thread costs about 0.5 ms of CPU a mail (measured: 1.5-2.2 ms against
# 1.2-1.4 inline), which only pays off if the wait it hides is not CPU the machine would
# spend anyway: on loopback with the bench's five processes on two cores, mails wait
# 1-2.5 ms just for the server process to be scheduled, while a provider a few ms away
# makes every mail wait two round trips.
INLINE_WAIT = 0.005
# How often a worker using slots tries mail inline again, to see if the server got fast,
# and how many mails it tries (at 50 ms from the provider: 0.3 s in 30).
PROBE_SECONDS = 30.0
PROBE_MAILS = 3
# Inline mails whose shortest wait decides (a slow server shows after this many).
WAIT_WINDOW = 8
# Most jobs claimed ahead of free slots (see InFlight._refill).
RESERVE = 8
# While jobs run, a queue found empty is asked again only after this many seconds.
EMPTY_BACKOFF = 0.02
# After its deadline fired, a job still running this long is logged as stuck (a
# thread cannot be killed: its slot stays taken until the function returns).
STUCK_SECONDS = 10.0


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


M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
MALLOC_ARENAS = 2


def _share_malloc_arenas() -> None:
    """glibc gives threads that allocate at once their own malloc arenas, up to 8 per
    core, each keeping its freed memory: with 64 slots rendering digests, a few MB more
    peak RSS a worker (bench d64 at 50 ms, alternated: 106-110 MB with 2, 111-113 with 8).
    Two, as MALLOC_ARENA_MAX=2 would make them (Heroku's advice for threaded
    servers); a MALLOC_ARENA_MAX the user set wins, and other C libraries are left be."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass


class InFlight(LeanJobs):
    """Mixin for AppWorker (before LeanJobs): see the module docstring."""

    app: Any  # the worker's Flask app (AppWorker)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.concurrency = effective_concurrency(self.app.config)
        if self.concurrency > 1:
            _share_malloc_arenas()
        self._slots: dict[str, _Slot] = {}
        self._ended: stdlib_queue.SimpleQueue[_Slot] = stdlib_queue.SimpleQueue()
        self._tasks: stdlib_queue.SimpleQueue[_Slot] = stdlib_queue.SimpleQueue()
        self._threads = 0
        self._idle_threads = 0
        self._threads_lock = threading.Lock()
        self._last_suspension_poll = 0.0
        self._suspended = False
        # Jobs claimed beyond the free slots, started as slots free up (a claim costs two
        # round trips whatever its size): a few, so a higher queue's new job waits little.
        self.reserve = min(RESERVE, self.concurrency // 2)
        self._next_claim = 0.0
        self._claimed_at = 0.0
        # Slots or not: with a fast server (loopback, a relay on the same host) a thread
        # per mail costs more than it hides (measured: ~30% more worker CPU a mail), so a
        # worker runs mail inline while mails wait less than INLINE_WAIT (_end_batch_after),
        # and tries that again every PROBE_SECONDS while it uses slots.
        self._inline = False
        self._probing = False
        self._probe_waits: list[float] = []
        self._probe_at = 0.0
        self._waits: deque[float] = deque(maxlen=WAIT_WINDOW)  # the last inline mails' waits

    def execute_job(self, job: Job, queue: Queue) -> None:
        if self.concurrency <= 1 or not isinstance(job, LeanJob):
            super().execute_job(job, queue)
            return
        if _is_lean(job, self.default_result_ttl) and (
            self._inline or time.monotonic() >= self._probe_at
        ):
            # One at a time on this thread (app/leanworker.py's batch), timing each
            # mail's wait; the batch ends at the first sign of a slow server. A probe
            # may span batches (a quiet queue hands out one mail at a time).
            if not self._inline and not self._probing:
                self._probing, self._probe_waits = True, []
            super().execute_job(job, queue)
            if not self._probing:
                self._probe_at = time.monotonic() + PROBE_SECONDS
            return
        if not _is_lean(job, self.default_result_ttl):
            # A digest chunk (or any job not a mail) always takes a slot; a mail that
            # comes after it is tried inline again only PROBE_SECONDS later.
            self._probe_at = max(self._probe_at, time.monotonic() + PROBE_SECONDS)
        claimed: list[tuple[LeanJob, Queue]] = [(job, queue)]
        self._claimed_at = time.monotonic()
        self._in_batch = True
        try:
            while True:
                self._refill(claimed)
                free = self.concurrency - len(self._slots)
                if claimed and free:
                    self._launch(claimed, free)
                self._flush()
                if not self._slots:
                    break
                self._finish(self._wait())
                self._tend()
                if claimed and (
                    self._stop_requested or time.monotonic() - self._claimed_at > BATCH_SECONDS
                ):
                    # Stopping, or waited too long for a slot (slow jobs): back to the
                    # queue, where another worker may take them, long before maintenance.
                    self._release_claimed(claimed)
                    claimed.clear()
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

    def _end_batch_after(self, job: Job) -> bool:
        """After each inline mail: end the batch, so the next jobs go to slots, once the
        mails' waits say the server is slow. A probe looks at PROBE_MAILS mails (the
        first may open a connection) and takes their shortest wait; after it, the
        shortest of the last WAIT_WINDOW waits decides: a far server makes every mail
        wait its round trips, a busy machine only some (measured on loopback with the
        bench's five processes on two cores: 0.7 ms to 20 ms)."""
        if self.concurrency <= 1:
            return False
        waited = getattr(job, "waited", 0.0)
        if self._probing:
            self._probe_waits.append(waited)
            if len(self._probe_waits) < PROBE_MAILS:
                return False  # keep probing
            self._probing = False
            self._inline = min(self._probe_waits) < INLINE_WAIT
            self._waits.clear()
        else:
            self._waits.append(waited)
            self._inline = len(self._waits) < WAIT_WINDOW or min(self._waits) < INLINE_WAIT
        return not self._inline

    def _may_claim(self) -> bool:
        """Not stopping, not suspended (`rq suspend`, polled at most once a second), and
        not due to try a mail inline again (PROBE_SECONDS)."""
        if self._stop_requested or time.monotonic() >= self._probe_at:
            return False
        moment = time.monotonic()
        if moment - self._last_suspension_poll >= 1.0:
            self._last_suspension_poll = moment
            self._suspended = bool(is_suspended(self.connection, self))
        return not self._suspended

    def _refill(self, claimed: list[tuple[LeanJob, Queue]]) -> None:
        """Claim more jobs when the claimed ones will not fill the free slots: enough for
        them and a reserve, so that one claim (two round trips) serves several jobs. A
        queue found empty is not asked again for EMPTY_BACKOFF seconds while jobs run."""
        free = self.concurrency - len(self._slots)
        if len(claimed) >= free or not self._may_claim():
            return
        moment = time.monotonic()
        if self._slots and moment < self._next_claim:
            return
        wanted = free + self.reserve - len(claimed)
        got = self._claim_any(wanted)
        if len(got) < wanted:
            self._next_claim = moment + EMPTY_BACKOFF
        if got:
            if not claimed:
                self._claimed_at = moment
            claimed += got
            # Highest lane first: the next free slot goes to it (a stable sort keeps
            # each lane's order).
            claimed.sort(key=lambda pair: self.lane_of(pair[1]))

    def _claim_any(self, count: int) -> list[tuple[LeanJob, Queue]]:
        """Up to `count` more jobs, from the first of the worker's queues that has work."""
        claimed: list[tuple[LeanJob, Queue]] = []
        for job, queue in self.claim_from(self.queues, count):
            assert isinstance(job, LeanJob)  # AppWorker's job class
            claimed.append((job, queue))
        return claimed

    def _launch(self, claimed: list[tuple[LeanJob, Queue]], count: int) -> None:
        """Start the first `count` claimed jobs (intermediate list -> started registry:
        the mails in one round trip) and hand each to a slot."""
        batch, claimed[:count] = claimed[:count], []
        lean = [(job, queue) for job, queue in batch if _is_lean(job, self.default_result_ttl)]
        # The lane check (app/leanworker.py, _start_many): lanes above the lowest of the
        # jobs left claimed, which are started next unless a higher lane has work.
        above = max((self.lane_of(queue) for _job, queue in claimed), default=0)
        try:
            executions = self._start_many(lean, above) if lean else []
        except redis.exceptions.RedisError:
            self._release_claimed(batch)  # those it did not start
            raise
        waiting = self.waiting_lane if lean else None
        if waiting is not None:
            # A higher lane got work: the claimed jobs below it go back to their queue's
            # head, and the next claim (now, not after EMPTY_BACKOFF) starts at the top.
            lower = [(job, queue) for job, queue in claimed if self.lane_of(queue) > waiting]
            claimed[:] = [pair for pair in claimed if pair not in lower]
            self._release_claimed(lower)
            self._next_claim = 0.0
        for (job, queue), execution in zip(lean, executions, strict=True):
            job.carries_sent = True
            self._hand_over(job, queue, execution)
        for job, queue in batch:
            if not _is_lean(job, self.default_result_ttl):
                self._flush()
                self.prepare_execution(job)
                self.prepare_job_execution(job)
                self._hand_over(job, queue, self.execution)

    def _hand_over(self, job: LeanJob, queue: Queue, execution: Execution | None) -> None:
        """Give a started job to a slot thread (a new one while none is idle)."""
        timeout = job.timeout or self.queue_class.DEFAULT_TIMEOUT
        deadline = math.inf if timeout < 0 else time.monotonic() + timeout
        slot = _Slot(job, queue, execution, deadline)
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
        """Claimed jobs never started go back to the head of their queue; on a Redis
        error they stay in the intermediate list, where maintenance re-queues them."""
        if not claimed:
            return
        try:
            self._release(claimed)
        except redis.exceptions.RedisError as err:
            log.warning(
                "Worker %s: could not put back %d claimed jobs: %s", self.name, len(claimed), err
            )

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
