"""Enqueueing: mail records and their RQ jobs written in one MULTI/EXEC (a script for
many), deferred ones scheduled in the same transaction; the retry policy.
"""

from __future__ import annotations

import calendar
import json
import random
import zlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import redis.exceptions
from flask import current_app
from rq import Retry
from rq.job import Job, JobStatus
from rq.queue import Queue

from app import events, maillog, status, suppression
from app.errors import (
    QueueUnavailableError,
)
from app.mail import attachments, idempotency
from app.queues import PRIORITIES, get_queue, get_redis, replicate, ring

DELIVER_JOB = "jobs.mail.deliver"


def enqueue(records: list[status.MailRecord], *, reopen: bool = False) -> Job:
    """Write records and their jobs in one MULTI/EXEC round trip: all or nothing.

    Each record's job goes on its lane's queue (record.priority). Returns the first
    record's RQ job (what send_email returns). `reopen`: the records are failed ones
    an operator re-queues (same id, so the same Message-ID); their old jobs leave RQ's
    failed registry in the same step. A record with an idempotency key that names an
    earlier mail of the same request takes that mail's id, is marked `replayed` and
    writes nothing.
    """
    keyed = [record for record in records if record.idempotency_key]
    first: Job | None = None
    fresh: list[status.MailRecord] = []
    try:
        # Suppressed recipients leave each record here; one with none left is only recorded.
        suppression.drop_suppressed(get_redis(), records)
        with get_redis().pipeline(transaction=True) as pipe:
            while True:
                try:
                    claimed = idempotency.claim(pipe, keyed) if keyed else []
                    fresh = [record for record in records if not record.replayed]
                    pipe.multi()  # explicit, so RQ's writes add to this transaction as-is
                    if fresh:
                        replicate(pipe)  # accepted = on REDIS_MIN_REPLICAS replicas too
                        idempotency.queue_set(
                            pipe, claimed, current_app.config["MAIL_IDEMPOTENCY_TTL"]
                        )
                        maillog.queue_log(pipe, fresh, current_app.config)
                        first = _queue_lanes(pipe, fresh, reopen)
                    pipe.execute()
                    break
                except redis.exceptions.WatchError:
                    # A racing request took one of the keys first: read them again.
                    pipe.reset()
                    for record in keyed:
                        record.replayed = False
    except redis.exceptions.RedisError as err:
        raise QueueUnavailableError(f"Redis unavailable, mail not queued: {err}") from err
    for record in fresh:
        events.emit(
            record.status,  # queued, scheduled or suppressed
            mail_id=record.id,
            template=record.template,
            attempt=0,
            kind=record.kind,
            recipients=len(record.to) + len(record.cc) + len(record.bcc),
            send_at=record.send_at,
            **(
                events.labels(record.tags, record.metadata)
                if record.tags or record.metadata
                else {}
            ),
        )
    if first is None or records[0].replayed:
        queue = get_queue(PRIORITIES[records[0].priority])
        return Job(records[0].id, connection=get_redis(), serializer=queue.serializer)
    return first


def _queue_lanes(pipe: Any, records: list[status.MailRecord], reopen: bool) -> Job | None:
    """Queue on `pipe` each lane's records on its queue; return the first record's job
    (None when it was suppressed: it has no job)."""
    lanes: dict[str, list[status.MailRecord]] = {}
    for record in records:
        lanes.setdefault(record.priority, []).append(record)
    first: Job | None = None
    for priority, lane in lanes.items():
        job = _queue_lane(pipe, get_queue(PRIORITIES[priority]), lane, reopen)
        first = job if lane[0] is records[0] else first
    return first


def _queue_lane(
    pipe: Any, queue: Queue, records: list[status.MailRecord], reopen: bool
) -> Job | None:
    """Queue on `pipe` the writes of `records` and their jobs on `queue`; return the
    first record's job (None when every one was suppressed: no job)."""
    jobs = _DeliverJobs(queue, current_app.config)
    # New mails to queue now, if more than one: written by a script (_write_queued). One
    # alone costs Redis less as the plain HSETs below.
    bulk = [] if reopen else [r for r in records if not r.send_at and _to_deliver(r)]
    bulk = bulk if len(bulk) > 1 else []
    first: Job | None = None
    ready: list[str] = []  # ids to push on the queue, in order
    for record in records:
        if not _to_deliver(record):
            _write_suppressed(pipe, queue, record, reopen)
            continue
        if record.attachments:
            attachments.queue_write(pipe, record)
        if bulk and not record.send_at:
            ready.append(record.id)
            continue
        if reopen:
            status.reopen(pipe, record)
            pipe.zrem(queue.failed_job_registry.key, record.id)
        else:
            status.create(pipe, record)
        if record.send_at:
            job = jobs.create(record, JobStatus.SCHEDULED)
            schedule(queue, job, datetime.fromisoformat(record.send_at), pipe)
        else:
            job = jobs.create(record, JobStatus.QUEUED)
            # What Queue.enqueue_job writes for a job without dependencies, minus
            # its per-job SADD, status HSET and RPUSH (one RPUSH below).
            queue._prepare_for_queue(job)
            pipe.hset(job.key, mapping=job.to_dict())
            ready.append(job.id)
        first = first or job
    if bulk:
        job = _write_queued(pipe, jobs, bulk)
        first = job if bulk[0] is records[0] or first is None else first
    if ready:
        pipe.sadd(queue.redis_queues_keys, queue.key)
        pipe.rpush(queue.key, *ready)
        ring(pipe, len(ready))
    return first


def _to_deliver(record: status.MailRecord) -> bool:
    return record.status != status.SUPPRESSED


def _write_suppressed(pipe: Any, queue: Queue, record: status.MailRecord, reopen: bool) -> None:
    """A mail none of whose recipients may be mailed: its record, finished at once as
    `suppressed` (expiring like a sent one, counted for /metrics), and no job."""
    if reopen:
        status.reopen(pipe, record)
        pipe.zrem(queue.failed_job_registry.key, record.id)
    else:
        status.create(pipe, record)
    ttl = current_app.config["MAIL_STATUS_TTL"]
    status.queue_finish(pipe, record.id, status.SUPPRESSED, ttl, metric_template=record.template)


class _DeliverJobs:
    """The RQ jobs of mail records: DELIVER_JOB with the mail id as its only argument,
    the configured timeout, failure TTL and (jittered) retries, no result kept."""

    # The fields in which two queued jobs of one enqueue differ (see _write_queued).
    VARYING = ("data", "retry_intervals", "description")

    def __init__(self, queue: Queue, config: Mapping[str, Any]) -> None:
        self.queue = queue
        self.timeout: int = config["MAIL_JOB_TIMEOUT"]
        self.failure_ttl: int = config["MAIL_STATUS_TTL"]
        self.intervals: list[int] = config["MAIL_RETRY_INTERVALS"]
        # Two mails' job data differ only in the id: the JSON serializer's bytes for a
        # placeholder id, split around it, joined with each mail's (hex) id in varying().
        data = queue.serializer.dumps((DELIVER_JOB, None, (_ID_MARK,), {}))
        self.data_head, _, self.data_tail = data.partition(_ID_MARK.encode())

    def create(self, record: status.MailRecord, job_status: JobStatus) -> Job:
        """RQ's own Job for `record`."""
        return self.queue.create_job(
            DELIVER_JOB,
            args=(record.id,),
            job_id=record.id,
            timeout=self.timeout,
            result_ttl=0,
            failure_ttl=self.failure_ttl,
            retry=retry_policy(self.intervals),
            description=self.description(record),
            status=job_status,
        )

    def description(self, record: status.MailRecord) -> str:
        return f"mail {record.template}"

    def varying(self, record: status.MailRecord) -> tuple[bytes, str, str]:
        """The VARYING fields of `record`'s queued job, as Job.to_dict writes them."""
        # Job.data: the serialized (function name, instance, args, kwargs).
        if record.id.isascii() and record.id.isalnum():
            data = self.data_head + record.id.encode() + self.data_tail
        else:  # an id the serializer might escape
            data = self.queue.serializer.dumps((DELIVER_JOB, None, (record.id,), {}))
        return _zlib_stored(data), json.dumps(jittered(self.intervals)), self.description(record)


_ID_MARK = "MAILQUEUEID"


def _write_queued(pipe: Any, jobs: _DeliverJobs, records: list[status.MailRecord]) -> Job:
    """Queue on `pipe` the writes of new records and their jobs, as status.create
    and the plain path in `enqueue` write them, in one script per _BULK_CHUNK mails
    (the caller pushes the ids); return the first record's Job.

    Building an RQ Job per mail, and two HSETs through redis-py (which encodes every
    argument and reads a QUEUED reply per command), were most of a bulk enqueue's
    time. Here RQ builds the first job; every other job hash is that one with its
    VARYING fields replaced, and field names go once per script, not once per mail.
    """
    first = jobs.create(records[0], JobStatus.QUEUED)
    jobs.queue._prepare_for_queue(first)
    fixed = first.to_dict()
    own = tuple(fixed.pop(name) for name in _DeliverJobs.VARYING)
    fixed_items = [item for pair in fixed.items() for item in pair]
    stamp = status.now_iso()
    record_names: list[str] = []
    for start in range(0, len(records), _BULK_CHUNK):
        keys: list[str] = []
        values: list[Any] = []
        for record in records[start : start + _BULK_CHUNK]:
            fields = status.new_record_fields(record, stamp)
            record_names = record_names or list(fields)  # to_redis's, same for all
            keys += (status.key(record.id), jobs.queue.job_class.key_for(record.id))
            values += fields.values()
            values += own if record is records[0] else jobs.varying(record)
        head = [len(record_names), *record_names, len(fixed_items), *fixed_items]
        head += [len(_DeliverJobs.VARYING), *_DeliverJobs.VARYING]
        pipe.eval(_WRITE_NEW_MAILS, len(keys), *keys, *head, *values)
    return first


_BULK_CHUNK = 500  # mails per script: ~10,000 arguments

# KEYS: each mail's record key, then its job key. ARGV: the record's field names, the
# job's fixed field/value pairs and its varying field names, each list after its length;
# then for each mail its record's values and its job's varying values.
_WRITE_NEW_MAILS = """
local at = 1
local function list()
  local n = tonumber(ARGV[at])
  local items = {unpack(ARGV, at + 1, at + n)}
  at = at + n + 1
  return items
end
local record_names, job, job_names = list(), list(), list()
local fixed, record = #job, {}
for k = 1, #KEYS, 2 do
  for i, name in ipairs(record_names) do
    record[2 * i - 1] = name
    record[2 * i] = ARGV[at]
    at = at + 1
  end
  for i, name in ipairs(job_names) do
    job[fixed + 2 * i - 1] = name
    job[fixed + 2 * i] = ARGV[at]
    at = at + 1
  end
  redis.call('HSET', KEYS[k], unpack(record))
  redis.call('HSET', KEYS[k + 1], unpack(job))
end
return #KEYS / 2
"""


def _zlib_stored(data: bytes) -> bytes:
    """A zlib stream of one stored (uncompressed) block, as `zlib.compress(data, 0)`
    writes it: RQ reads job data with zlib.decompress. Compressing a ~100-byte payload
    saves nothing, and zlib.compress sets up a deflate state of ~256 KB each call:
    tens of microseconds a job."""
    size = len(data)
    if size > 0xFFFF:  # more than one block holds
        return zlib.compress(data)
    return (
        b"\x78\x01\x01"
        + size.to_bytes(2, "little")
        + (size ^ 0xFFFF).to_bytes(2, "little")
        + data
        + zlib.adler32(data).to_bytes(4, "big")
    )


def schedule(queue: Queue, job: Job, when: datetime, pipe: Any) -> None:
    """`Queue.schedule_job`, but every write inside `pipe`.

    rq 2.12's ScheduledJobRegistry.schedule() ignores its pipeline and ZADDs at
    once: outside our transaction, before the job hash exists (a scheduler pass
    in between drops the id, losing the mail) and even when the transaction
    then fails. Same keys and score (whole UTC seconds) as RQ writes.
    """
    pipe.sadd(queue.redis_queues_keys, queue.key)
    queue._persist_job(job, pipe, status=JobStatus.SCHEDULED)
    score = calendar.timegm(when.astimezone(UTC).utctimetuple())
    pipe.zadd(queue.scheduled_job_registry.key, {job.id: score})


def retry_policy(intervals: list[int]) -> Retry:
    """RQ retries at the configured intervals, each jittered by +-20% so a fleet of
    mails that failed together does not hammer the provider together."""
    return Retry(max=len(intervals), interval=jittered(intervals))


def jittered(intervals: list[int]) -> list[int]:
    """Each interval times a uniform 0.8-1.2 (random.uniform's own formula, inlined:
    a bulk enqueue draws one per interval per mail)."""
    draw = random.random
    return [max(1, round(seconds * (0.8 + 0.4 * draw()))) for seconds in intervals]
