"""The public mail API: `send_email` validates and enqueues, `render_email` renders.

The web process only validates and enqueues (one pipelined Redis round trip);
the worker renders and delivers (jobs/mail.py). Everything a job needs is
plain JSON in the mail record (app/status.py).

One concern a module, each importing only those above it:

- `headers`: what a header value and an extra header's name may be
- `rendering`: `render_email`, the one template helper, and CSS inlining
- `addresses`: recipients and their normalisation
- `attachments`: `Attachment`, checked, and their bytes beside the record in Redis
- `shape`: cc, bcc, reply_to, tags, metadata, locale and idempotency keys checked
- `idempotency`: an idempotency key's claim inside the enqueue transaction
- `parts`: the MIME tree of a mail with attachments (mixed, related, calendar)
- `mime`: a record's Flask-Mail Message, its Message-ID, the wire bytes
- `validation`: everything about one mail checked; `prepare` makes its record
- `enqueueing`: records and RQ jobs written in one transaction; retries
- `sending`: `send_email`, `send_many`, `requeue_failed`

Import from `app.mail`; the modules are where the code lives, not an API.
"""

from __future__ import annotations

from app.mail.addresses import BARE_ADDRESS, plain_address, validate_address, validate_recipients
from app.mail.attachments import MAX_ATTACHMENTS, Attachment
from app.mail.enqueueing import DELIVER_JOB, enqueue, jittered, retry_policy, schedule
from app.mail.headers import HEADER_NAME, RESERVED_HEADERS, check_header, check_header_name
from app.mail.mime import VERBATIM_HEADERS, MailMessage, build_message, message_id
from app.mail.rendering import RenderedEmail, inline_css, render_email
from app.mail.sending import requeue_failed, send_email, send_many
from app.mail.validation import (
    MAX_CONTEXT_DEPTH,
    MAX_SUBJECT_LENGTH,
    RESERVED_CONTEXT_KEYS,
    TEMPLATE_NAME,
    check_template,
    prepare,
    resolve_send_at,
    validate_context,
)

__all__ = [
    "BARE_ADDRESS",
    "DELIVER_JOB",
    "HEADER_NAME",
    "MAX_ATTACHMENTS",
    "MAX_CONTEXT_DEPTH",
    "MAX_SUBJECT_LENGTH",
    "RESERVED_CONTEXT_KEYS",
    "RESERVED_HEADERS",
    "TEMPLATE_NAME",
    "VERBATIM_HEADERS",
    "Attachment",
    "MailMessage",
    "RenderedEmail",
    "build_message",
    "check_header",
    "check_header_name",
    "check_template",
    "enqueue",
    "inline_css",
    "jittered",
    "message_id",
    "plain_address",
    "prepare",
    "render_email",
    "requeue_failed",
    "resolve_send_at",
    "retry_policy",
    "schedule",
    "send_email",
    "send_many",
    "validate_address",
    "validate_context",
    "validate_recipients",
]
