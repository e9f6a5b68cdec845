"""Digest jobs: the periodic dispatcher, and digests for a chunk of subscribers.

`send_digests` takes `[[email, period], ...]` (plain JSON, DIGEST_CHUNK_SIZE
pairs), claims every subscriber's pending items in one round trip, then per
subscriber renders and sends the digest over the worker's persistent SMTP
connection and marks the period handled, drops the claimed items and finishes
the mail record in one MULTI/EXEC (which also claims the next digest's delivery
attempt). A crash or retry anywhere before that reuses the claimed items and
the same mail id, so nothing is lost and a period is not sent twice (see
app/digests.py for the data).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flask import current_app
from flask_mail import Message
from redis import Redis
from redis.exceptions import RedisError
from rq import get_current_job
from rq.timeouts import JobTimeoutException

from app import digests, events, status, suppression
from app.errors import DeliveryError, MailInFlightError, TransientDeliveryError
from app.mail import build_message
from app.queues import get_redis
from app.smtp import get_mailer
from jobs.mail import record_sent

log = logging.getLogger("mailqueue.jobs.digest")


def dispatch(at: str | None = None) -> dict[str, int]:
    """The periodic job rq-scheduler enqueues: hand every due digest to a job."""
    now = datetime.fromisoformat(at) if at else None
    result = digests.dispatch_due(now)
    log.info(
        "digest dispatch: %d due, %d enqueued in %d jobs, %d skipped",
        result.due,
        result.enqueued,
        result.jobs,
        result.skipped,
    )
    return result.as_dict()


def send_digests(pairs: list[list[str]]) -> dict[str, int]:
    """Send the digest of each `[email, period]`; return counts per outcome.

    A permanent failure (5xx, a template error) fails that subscriber's period only:
    its items go back to the live list for the next digest and the record says why.
    A transient one is retried by RQ for the subscribers it concerns (the others are
    done and skip quickly); a failure of the connection itself stops the chunk at
    once rather than time out on every remaining subscriber.
    """
    redis = get_redis()
    valid = [
        (str(pair[0]), str(pair[1]))
        for pair in pairs
        if isinstance(pair, list | tuple) and len(pair) == 2
    ]
    if len(valid) != len(pairs):
        log.error("digest job: ignoring %d malformed pairs", len(pairs) - len(valid))
    counts: Counter[str] = Counter()
    deferred: list[tuple[digests.Claim, DeliveryError]] = []
    claims = digests.claim_many(redis, valid)
    _skip_suppressed(redis, claims)
    ahead: _Begun | None = None
    for index, claim in enumerate(claims):
        if claim.outcome == "busy":
            deferred.append((claim, MailInFlightError(f"{claim.email}: another job holds it")))
            continue
        if claim.outcome != "go":
            counts[claim.outcome] += 1
            continue
        begun, ahead = (ahead if ahead is not None and ahead.digest.claim is claim else None), None
        following = next((c for c in claims[index + 1 :] if c.outcome == "go"), None)
        try:
            outcome, ahead = _deliver(redis, claim, begun, following)
            counts[outcome] += 1
        except (JobTimeoutException, RedisError):
            raise  # the job's own trouble: RQ records and retries it; claims are kept
        except TransientDeliveryError as err:
            deferred.append((claim, err))
            if not (err.refused or isinstance(err, MailInFlightError)):
                # The server or the connection, not this recipient: do not hammer it.
                rest = [c for c in claims[index + 1 :] if c.outcome in ("go", "busy")]
                deferred.extend((c, err) for c in rest)
                break
        except Exception as err:
            _give_up(redis, claim, err)
            counts["failed"] += 1
    if deferred:
        _defer(redis, deferred, counts)
    log.info("digest job: %s", dict(counts))
    return dict(counts)


@dataclass
class _Digest:
    """One subscriber's digest: its mail record and the unsubscribe URL it shows."""

    claim: digests.Claim
    record: status.MailRecord
    unsubscribe: str


@dataclass
class _Begun:
    """A digest whose delivery attempt was claimed in the round trip that settled the
    digest before it: the reply of status.begin_attempt's script."""

    digest: _Digest
    reply: Any


def _digest(claim: digests.Claim) -> _Digest:
    subscriber = claim.subscriber
    assert subscriber is not None
    # One signed URL for the header and the body (url_for + HMAC: ~45 µs each).
    unsubscribe = digests.unsubscribe_url(subscriber.email)
    record = digests.digest_record(subscriber, claim.period, len(claim.items), unsubscribe)
    return _Digest(claim, record, unsubscribe)


def _message(digest: _Digest) -> Message:
    claim = digest.claim
    assert claim.subscriber is not None
    context = digests.digest_context(
        claim.subscriber, claim.period, claim.items, digest.unsubscribe
    )
    return build_message(digest.record, context)


def _deliver(
    redis: Redis, claim: digests.Claim, begun: _Begun | None, following: digests.Claim | None
) -> tuple[str, _Begun | None]:
    """One subscriber's digest, once its items are claimed; return the outcome, and
    `following` (the chunk's next claimed subscriber) if its attempt was claimed here.

    Each digest costs two round trips: claiming its attempt (creating its record)
    and settling it. The claim of the next one rides on this one's settle (`begun`
    on the next call), so a digest sent after another costs one.
    """
    if not claim.items:
        digests.settle(redis, claim.email, claim.period, mode="empty")
        return "empty", None
    config = current_app.config
    lease = config["MAIL_JOB_TIMEOUT"] + status.LEASE_GRACE_SECONDS
    message: Message | None = None
    if begun is None:
        digest = _digest(claim)
        # Render before taking the record's lease: a crash while rendering leaves nothing
        # to wait for, and the retry renders the same claimed items again. (A digest
        # claimed ahead renders under its lease: a render error still releases it.)
        message = _message(digest)
        outcome, attempted = status.begin_attempt(
            redis,
            digest.record.id,
            lease,
            create=digest.record,
            create_ttl=config["MAIL_STATUS_TTL"],
        )
    else:
        digest = begun.digest
        outcome, attempted = status.attempt_from_reply(begun.reply)
    record = digest.record
    if outcome == "sent":
        # An earlier attempt got it accepted but died before settling: settle now.
        digests.settle(redis, claim.email, claim.period, mode="sent")
        return "already sent", None
    if outcome == "busy":
        raise MailInFlightError(f"digest {record.id} is being sent by another worker")
    if message is None:
        message = _message(digest)
    attempt = attempted.attempts if attempted is not None else 0
    after = _digest(following) if following is not None and following.items else None
    _emit(events.SENDING, record.id, attempt, items=len(claim.items))
    refused = get_mailer().send(message)
    reply = record_sent(
        lambda: digests.settle(
            redis,
            claim.email,
            claim.period,
            mode="sent",
            mail_id=record.id,
            mail_status=status.SENT,
            then_begin=(after.record, lease) if after is not None else None,
            refused=refused,
        )
    )
    _emit(events.SENT, record.id, attempt, refused=len(refused) or None)
    return "sent", _Begun(after, reply) if after is not None else None


def _emit(event: str, mail_id: str, attempt: int | None, **extra: object) -> None:
    """A digest mail's state change on mailqueue.events (its job is the chunk's job)."""
    job = get_current_job()
    events.emit(
        event,
        mail_id=mail_id,
        job_id=job.id if job is not None else "",
        template=digests.DIGEST_TEMPLATE,
        attempt=attempt if attempt is not None else 0,
        kind="digest",
        **extra,
    )


def _attempts(redis: Redis, mail_id: str) -> int:
    """How many attempts a digest's record counts (failure paths only: one round trip)."""
    raw: Any = redis.hget(status.key(mail_id), "attempts")
    return int(raw) if raw and raw.isdigit() else 0


def _skip_suppressed(redis: Redis, claims: list[digests.Claim]) -> None:
    """A subscriber whose address is suppressed (a hard bounce) gets no digest while it
    is (claim_many found it so): the period counts as handled and the items go back for
    a later digest, should the address be unsuppressed. (A complaint turned the
    subscriber off already.)"""
    for claim in claims:
        if claim.outcome == "suppressed":
            digests.settle(redis, claim.email, claim.period, mode="giveup")


def _give_up(redis: Redis, claim: digests.Claim, err: Exception) -> None:
    """This period failed for good: keep its items for the next digest, record why."""
    reason = str(err) if isinstance(err, DeliveryError) else f"{type(err).__name__}: {err}"
    if isinstance(err, DeliveryError) and err.refused:  # the address does not exist
        with redis.pipeline(transaction=False) as pipe:
            if suppression.queue_smtp_refusals(pipe, err.refused):
                pipe.execute()
    mail_id = (
        digests.digest_mail_id(claim.email, claim.period, claim.subscriber.gen)
        if claim.subscriber
        else None
    )
    if mail_id is None:
        log.error("digest %s %s: failed (%s)", claim.email, claim.period, reason)
    refused = err.refused if isinstance(err, DeliveryError) else {}
    digests.settle(
        redis,
        claim.email,
        claim.period,
        mode="giveup",
        mail_id=mail_id,
        mail_status=status.FAILED,
        last_error=reason,
        refused=refused,
    )
    if mail_id is not None:
        error = type(err).__name__
        _emit(events.FAILED, mail_id, _attempts(redis, mail_id), error=error, reason=reason)


def _defer(
    redis: Redis, deferred: list[tuple[digests.Claim, DeliveryError]], counts: Counter[str]
) -> None:
    """Retry the deferred subscribers through RQ (the claims stay), or give up on them
    when no retry is left. Either way the job raises, so the failure is visible."""
    job = get_current_job()
    retries_left = job.retries_left if job is not None else 0
    first = deferred[0][1]
    for claim, err in deferred:
        if retries_left:
            digests.release(redis, claim.email, claim.period)
            if claim.subscriber is not None and not isinstance(err, MailInFlightError):
                mail_id = digests.digest_mail_id(claim.email, claim.period, claim.subscriber.gen)
                with redis.pipeline(transaction=False) as pipe:
                    status.update(pipe, mail_id, status=status.RETRYING, last_error=str(err))
                    status.count(pipe, "retried", digests.DIGEST_TEMPLATE)
                    pipe.execute()
                _emit(
                    events.RETRY_SCHEDULED,
                    mail_id,
                    _attempts(redis, mail_id),
                    retry_in=job.get_retry_interval() if job is not None else None,
                    retries_left=retries_left - 1,
                    error=type(err).__name__,
                    reason=str(err),
                )
        elif claim.outcome == "go" and not isinstance(err, MailInFlightError):
            # (A digest in flight elsewhere is that worker's to settle.)
            _give_up(redis, claim, err)
    counts["deferred" if retries_left else "failed"] += len(deferred)
    log.warning("digest job: %s", dict(counts))
    message = f"{len(deferred)} digests not sent ({'retrying' if retries_left else 'giving up'})"
    raise TransientDeliveryError(f"{message}: {first}")
