"""What a bounce or complaint does beyond the suppression list itself.

app/suppression.py keeps the list and sits below app.mail; this module sits above
app.digests, so it can carry out the rest of an event: a complaint unsubscribes a
digest subscriber (frequency `off`: they asked not to be mailed, and a digest is
mail), and an event that names one of our mails (its Message-ID) is added to that
mail's record. The API, the CLI and the webhooks all suppress through `suppress`.
"""

from __future__ import annotations

import logging
import re

from app import digests, maillog, suppression
from app.queues import get_redis

log = logging.getLogger("mailqueue.deliverability")

# Our Message-ID is `<mail id@sender domain>` (app.mail.mime.message_id).
OUR_MESSAGE_ID = re.compile(r"^\s*<?([0-9a-f]{32})@[^>\s]+>?\s*$")
MAIL_EVENT = {suppression.HARD_BOUNCE: "bounced", suppression.COMPLAINT: "complained"}


def suppress(
    address: str,
    reason: str,
    source: str,
    detail: str = "",
    *,
    message_id: str | None = None,
) -> suppression.Entry:
    """Suppress `address`, with everything that follows from `reason` (module doc)."""
    redis = get_redis()
    entry = suppression.make_entry(address, reason, source, detail)
    suppression.add(redis, entry)
    log.info("suppressed %s: %s from %s", entry.address, reason, source)
    if reason == suppression.COMPLAINT:
        try:
            if digests.unsubscribe(entry.address):
                log.info("digest subscriber %s unsubscribed after a complaint", entry.address)
        except ValueError:  # not an address a subscriber could have
            pass
    mail_id = our_mail_id(message_id)
    if mail_id and reason in MAIL_EVENT:
        maillog.add_event(
            redis, mail_id, MAIL_EVENT[reason], recipient=entry.address, source=source,
            detail=entry.detail,
        )  # fmt: skip
    return entry


def our_mail_id(message_id: str | None) -> str | None:
    """The mail id in one of our Message-IDs, else None."""
    match = OUR_MESSAGE_ID.match(message_id or "")
    return match.group(1) if match else None
