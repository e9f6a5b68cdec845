"""Digests: subscribers, their pending items, periods in their own time zone, the dispatcher.

Data in Redis (the web process writes, the dispatcher and digest jobs read):

- `mq:sub:<email>` hash: timezone, frequency (daily|weekly|off), hour, weekday;
  per kind of period, `last_daily`/`last_weekly` (the last one a digest job
  handled) and `dispatched_daily`/`dispatched_weekly` (the last one handed to a
  digest job), kept apart so that switching daily -> weekly -> daily never
  forgets what was sent; `last_period` and `dispatched` (the latest of either
  kind: what the API shows, and all that subscribers written before the per-kind
  fields have); `claimed` (the period whose claimed items exist), `gen` (random
  per subscriber life, part of digest mail ids), created, updated.
- `mq:digest:due` zset: email -> UTC epoch when the subscriber's next unhandled
  period is due. Only daily/weekly subscribers are in it, so finding who is due
  is one ZRANGEBYSCORE: the cost grows with those due, not with all subscribers.
- `mq:items:<email>` list of JSON items `{title, url, body, kind, at}`, oldest
  first, capped at DIGEST_MAX_ITEMS (the oldest are dropped beyond it).
- `mq:items:<email>:claimed:<period>`: the items a digest job took for that
  period, kept until the mail is accepted, so a crash or retry loses nothing.
- `mq:sub:<email>:lease`: the period whose digest job is working on the subscriber.

Periods: daily = the subscriber's local date (`2026-11-27`), weekly = local
ISO week (`2026-W48`). A period is due at local `hour:00` of its day (for
weekly, of its `weekday`); a wall time skipped by a spring-forward is due at
the first instant after the gap, an ambiguous one at its first occurrence. The
period a subscriber is due for is always the one containing "now" in their
time zone: a dispatcher that was down catches up with today's digest, never
with a backlog of older ones.


One concern a module, each importing only those above it:

- `periods`: schedules, periods and due times in the subscriber's time zone
- `validation`: subscriber addresses, schedules and items as the API takes them
- `subscribers`: the subscriber store, its Redis keys, the due index, pending items
- `tokens`: signed unsubscribe tokens and URLs
- `message`: a digest's mail id, record, subject, headers and template context
- `claims`: a digest job's claim of one subscriber's items, its settle and release
- `dispatcher`: finding who is due and enqueueing their digest jobs
- `previews`: a subscriber's next digest rendered without claiming anything

Import from `app.digests` (`from app import digests`); the modules are where the code
lives, not an API.
"""

from __future__ import annotations

from app.digests.claims import Claim, claim_many, release, settle
from app.digests.dispatcher import (
    CLAIM_BATCH,
    CLAIM_LEASE_SECONDS,
    DIGEST_JOB,
    DISPATCH_JOB,
    DispatchResult,
    count_due,
    dispatch_due,
)
from app.digests.message import (
    DIGEST_TEMPLATE,
    digest_context,
    digest_headers,
    digest_mail_id,
    digest_record,
    digest_subject,
    period_label,
)
from app.digests.periods import (
    DAILY,
    DEFAULT_HOUR,
    DEFAULT_WEEKDAY,
    FREQUENCIES,
    OFF,
    WEEKDAYS,
    WEEKLY,
    Schedule,
    is_after,
    is_weekly_period,
    local_instant,
    next_period,
)
from app.digests.previews import Preview, preview
from app.digests.subscribers import (
    DUE_KEY,
    ITEMS_PREFIX,
    SUB_PREFIX,
    Subscriber,
    add_item,
    claimed_key,
    claimed_prefix,
    delete_subscriber,
    describe_subscriber,
    get_subscriber,
    items_key,
    lease_key,
    sub_key,
    unsubscribe,
    upsert_subscriber,
)
from app.digests.tokens import (
    UNSUBSCRIBE_SALT,
    read_unsubscribe_token,
    unsubscribe_token,
    unsubscribe_url,
)
from app.digests.validation import (
    DEFAULT_KIND,
    KIND_PATTERN,
    MAX_BODY_LENGTH,
    MAX_EMAIL_LENGTH,
    MAX_TITLE_LENGTH,
    MAX_URL_LENGTH,
    normalize_email,
    validate_item,
    validate_schedule,
)

__all__ = [
    "CLAIM_BATCH",
    "CLAIM_LEASE_SECONDS",
    "DAILY",
    "DEFAULT_HOUR",
    "DEFAULT_KIND",
    "DEFAULT_WEEKDAY",
    "DIGEST_JOB",
    "DIGEST_TEMPLATE",
    "DISPATCH_JOB",
    "DUE_KEY",
    "FREQUENCIES",
    "ITEMS_PREFIX",
    "KIND_PATTERN",
    "MAX_BODY_LENGTH",
    "MAX_EMAIL_LENGTH",
    "MAX_TITLE_LENGTH",
    "MAX_URL_LENGTH",
    "OFF",
    "SUB_PREFIX",
    "UNSUBSCRIBE_SALT",
    "WEEKDAYS",
    "WEEKLY",
    "Claim",
    "DispatchResult",
    "Preview",
    "Schedule",
    "Subscriber",
    "add_item",
    "claim_many",
    "claimed_key",
    "claimed_prefix",
    "count_due",
    "delete_subscriber",
    "describe_subscriber",
    "digest_context",
    "digest_headers",
    "digest_mail_id",
    "digest_record",
    "digest_subject",
    "dispatch_due",
    "get_subscriber",
    "is_after",
    "is_weekly_period",
    "items_key",
    "lease_key",
    "local_instant",
    "next_period",
    "normalize_email",
    "period_label",
    "preview",
    "read_unsubscribe_token",
    "release",
    "settle",
    "sub_key",
    "unsubscribe",
    "unsubscribe_token",
    "unsubscribe_url",
    "upsert_subscriber",
    "validate_item",
    "validate_schedule",
]
