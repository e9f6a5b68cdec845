"""The fields of a richer mail beyond to/subject/template/context: cc, bcc, reply_to,
tags, metadata, locale and the idempotency key, each checked (attachments: see
`attachments`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from babel.localedata import locale_identifiers

from app.errors import InvalidLocaleError, InvalidMailError
from app.mail.addresses import validate_address, validate_recipients

TAG = re.compile(r"[a-z0-9_-]{1,64}")
MAX_TAGS = 20
MAX_METADATA_KEYS = 20
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_REPLY_TO = 10
MAX_IDEMPOTENCY_KEY = 256
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def validate_copies(to: list[str], cc: Any, bcc: Any, limit: int) -> tuple[list[str], list[str]]:
    """cc and bcc checked as `to` is; to + cc + bcc within MAIL_MAX_RECIPIENTS."""
    copies = []
    for name, value in (("cc", cc), ("bcc", bcc)):
        copies.append(
            validate_recipients(value, limit, name, required=False) if value is not None else []
        )
    if len(to) + len(copies[0]) + len(copies[1]) > limit:
        raise InvalidMailError("bcc" if copies[1] else "cc", f"at most {limit} recipients per mail")
    return copies[0], copies[1]


def validate_reply_to(value: Any) -> list[str]:
    """One address or a list of them."""
    if value is None:
        return []
    if isinstance(value, str):
        return [validate_address("reply_to", value)]
    if not isinstance(value, list | tuple) or len(value) > MAX_REPLY_TO:
        raise InvalidMailError("reply_to", f"expected an address or up to {MAX_REPLY_TO}")
    return [validate_address(f"reply_to[{i}]", item) for i, item in enumerate(value)]


def validate_tags(value: Any) -> list[str]:
    """A list of short `[a-z0-9_-]` strings, kept in order, without repeats."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise InvalidMailError("tags", "expected a list of strings")
    if len(value) > MAX_TAGS:
        raise InvalidMailError("tags", f"at most {MAX_TAGS} tags")
    for index, tag in enumerate(value):
        if not isinstance(tag, str) or not TAG.fullmatch(tag):
            raise InvalidMailError(f"tags[{index}]", "expected 1-64 of a-z, 0-9, _ and -")
    return list(dict.fromkeys(value))


def validate_metadata(value: Any) -> dict[str, str]:
    """A small mapping of short strings to strings."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidMailError("metadata", "expected an object of strings")
    if len(value) > MAX_METADATA_KEYS:
        raise InvalidMailError("metadata", f"at most {MAX_METADATA_KEYS} keys")
    for name, item in value.items():
        if not isinstance(name, str) or len(name) > MAX_METADATA_KEY:
            raise InvalidMailError("metadata", f"keys are strings of {MAX_METADATA_KEY} at most")
        if not isinstance(item, str):
            raise InvalidMailError(f"metadata.{name}", "must be a string")
        if len(item) > MAX_METADATA_VALUE or _CONTROL.search(item):
            raise InvalidMailError(
                f"metadata.{name}", f"at most {MAX_METADATA_VALUE} characters, no control ones"
            )
    return dict(value)


def validate_locale(value: Any, field: str = "locale") -> str:
    """A locale as Babel names it (`de`, `de_AT`, `pt_BR`); "" for none."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or value not in locales():
        raise InvalidLocaleError(field, f"{value!r} is not a known locale (e.g. de, pt_BR)")
    return value


@functools.cache
def locales() -> frozenset[str]:
    """Every locale Babel has data for."""
    return frozenset(locale_identifiers())


def validate_idempotency_key(value: Any) -> str:
    """1-256 printable ASCII characters; "" for none."""
    if value is None:
        return ""
    if (
        not isinstance(value, str)
        or not 1 <= len(value) <= MAX_IDEMPOTENCY_KEY
        or any(not " " <= ch <= "~" for ch in value)
    ):
        raise InvalidMailError(
            "idempotency_key", f"expected 1-{MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )
    return value
