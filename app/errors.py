"""Every exception mailqueue raises, in one place."""

from __future__ import annotations

import redis.exceptions


class MailQueueError(Exception):
    """Base class for mailqueue's own errors."""


class ConfigError(MailQueueError):
    """A configuration value is malformed; the message names the key."""


class InvalidMailError(MailQueueError, ValueError):
    """`send_email` refused its input; nothing was enqueued. `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class InvalidAddressError(InvalidMailError):
    """An address is malformed, non-ASCII, or carries a header break."""


class HeaderInjectionError(InvalidMailError):
    """A header value contains CR or LF."""


class TemplateNotFoundError(InvalidMailError):
    """The template name is unsafe or names no `templates/email/<name>.txt`."""


class InvalidContextError(InvalidMailError):
    """The context is not JSON-serialisable, too deep or too large."""


class InvalidScheduleError(InvalidMailError):
    """`send_at`/`delay` is malformed or contradictory."""


class InvalidAttachmentError(InvalidMailError):
    """An attachment's name, type, content or size is refused."""


class InvalidLocaleError(InvalidMailError):
    """A locale is malformed or unknown to Babel."""


class IdempotencyConflictError(InvalidMailError):
    """An idempotency key already names a different mail (the API answers 409)."""


class InvalidSubscriberError(InvalidMailError):
    """A subscriber's address, time zone, frequency, hour or weekday is invalid."""


class InvalidItemError(InvalidMailError):
    """A digest item's title, url, body or kind is invalid."""


class SubscriberNotFoundError(MailQueueError, LookupError):
    """No digest subscriber has this address (the API answers 404)."""

    def __init__(self, email: str) -> None:
        super().__init__(f"no subscriber {email}")
        self.email = email


class QueueUnavailableError(MailQueueError):
    """Redis could not be reached; nothing was enqueued."""


class NotReplicatedError(MailQueueError, redis.exceptions.ConnectionError):
    """Fewer than REDIS_MIN_REPLICAS replicas confirmed a write in time (Redis WAIT): a
    failover could lose it. A Redis connection error to every caller (send_email answers
    QueueUnavailableError, a worker retries recording `sent`), as a failover is one."""


class UnknownMailError(MailQueueError, LookupError):
    """No such mail record: never existed, purged or expired."""


class MailNotFailedError(MailQueueError, ValueError):
    """Only a failed mail can be re-queued by an operator, and not a digest (its
    items went back to the subscriber for the next one)."""


class DeliveryError(MailQueueError):
    """Delivery of one mail failed; `permanent` says whether retrying can help."""

    permanent = False

    def __init__(self, message: str, refused: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.refused = refused or {}


class TransientDeliveryError(DeliveryError):
    """Connection trouble, a timeout or a 4xx reply: retried with backoff."""


class PermanentDeliveryError(DeliveryError):
    """A 5xx reply (every recipient refused, bad sender, auth rejected): fails at once."""

    permanent = True


class MailInFlightError(TransientDeliveryError):
    """Another worker holds this mail's delivery lease; try again later."""
