"""Idempotency keys: the same key with the same request names the same mail.

A key is stored as `mq:idem:<sha256 of the key>` -> `<request fingerprint>:<mail id>`
for MAIL_IDEMPOTENCY_TTL seconds, set in the enqueue's own MULTI/EXEC under WATCH: of
two racing requests with one key, one transaction writes its mail, the other's EXEC
fails, re-reads the key and answers with the first one's id (or a conflict).
"""

from __future__ import annotations

import hashlib
from typing import Any

from redis.client import Pipeline

from app import status
from app.errors import IdempotencyConflictError

KEY_PREFIX = "mq:idem:"


def key(idempotency_key: str) -> str:
    return KEY_PREFIX + hashlib.sha256(idempotency_key.encode()).hexdigest()


def claim(pipe: Pipeline, records: list[status.MailRecord]) -> list[tuple[str, str]]:
    """WATCH and read the keys of `records` (the pipeline is left in its immediate mode,
    before MULTI). A record whose key names an earlier mail of the same request takes
    that mail's id and is marked `replayed`; another request under a known key raises
    IdempotencyConflictError. Returns the (Redis key, value) pairs to set for the rest."""
    names = [key(record.idempotency_key) for record in records]
    pipe.watch(*names)
    stored: list[Any] = pipe.mget(names)
    seen: dict[str, str] = {}  # Redis key -> "<fingerprint>:<id>", known or claimed now
    to_set: list[tuple[str, str]] = []
    for name, raw, record in zip(names, stored, records, strict=True):
        value = seen.get(name) or (raw.decode() if raw else "")
        if value:
            fingerprint, _, mail_id = value.rpartition(":")
            if fingerprint != record.fingerprint:
                raise IdempotencyConflictError(
                    "idempotency_key",
                    f"{record.idempotency_key!r} was used for another request (mail {mail_id})",
                )
            record.id, record.replayed = mail_id, True
            continue
        seen[name] = f"{record.fingerprint}:{record.id}"
        to_set.append((name, seen[name]))
    return to_set


def queue_set(pipe: Pipeline, pairs: list[tuple[str, str]], ttl: int) -> None:
    """Queue, inside the enqueue's MULTI, the keys `claim` found free."""
    for name, value in pairs:
        pipe.set(name, value, ex=ttl)
