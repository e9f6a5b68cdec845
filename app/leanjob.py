"""`LeanJob`: AppWorker's job class (app/leanworker.py, app/inflight.py).

Two things RQ's Job cannot do: be performed after the worker already sent its
PERSIST in the round trip that started it, and be performed on a slot thread,
its outcome handed back to RQ's own success and failure paths on the main
thread. It also times how long each run waited rather than computed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from rq.job import Job, _job_stack
from rq.utils import now


class LeanJob(Job):
    """A Job whose PERSIST (Job.perform's first round trip) can be sent ahead, with the
    writes that register it as started (LeanJobs._start)."""

    persisted = False
    claimed_attempt: Any = None  # the reply of its FIRST_STEPS step, until the job reads it
    # Set in a batch: `deliver` then leaves its `sent` write as `sent_step` (it queues it
    # on a pipeline) for the worker to send with its next round trip.
    carries_sent = False
    sent_step: Callable[[Any], None] | None = None
    # Set when the job's function already ran on a slot's thread (app/inflight.py): what
    # it returned and what it raised, for `perform` on the worker's main thread to hand
    # to RQ's own success and failure handling; and when it really started.
    outcome: tuple[Any, BaseException | None] | None = None
    ran_from: datetime | None = None
    waited = 0.0  # see perform

    def perform(self) -> Any:
        if self.outcome is not None:
            (result, error), self.outcome = self.outcome, None
            self.started_at = self.ran_from or self.started_at
            if error is not None:
                raise error
            self._result = result
            return result
        if not self.persisted:
            return super().perform()
        _job_stack.push(self)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            self._result = self._execute()
        finally:
            # Seconds it spent waiting (on the SMTP server, mostly), not computing.
            self.waited = (time.perf_counter() - wall) - (time.thread_time() - cpu)
            assert self is _job_stack.pop()
        return self._result

    def perform_in_slot(self) -> None:
        """Run the job's function on this (a slot's) thread, keeping its outcome."""
        self.ran_from = now()
        try:
            self.outcome = (self.perform(), None)
        except BaseException as err:  # a timeout, SystemExit: all handed to RQ on the main thread
            self.outcome = (None, err)
