"""Header values and names: nothing that could break a header line, no header
mailqueue sets itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from app.errors import (
    HeaderInjectionError,
)

MAX_EXTRA_HEADERS = 50
HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "subject", "message-id", "date", "sender", "mime-version"}
    | {"content-type", "content-transfer-encoding", "return-path", "reply-to"}
)
# C0 and C1 controls except TAB, DEL, and the Unicode line and paragraph separators.
_HEADER_BREAKERS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def check_header(field: str, value: str) -> None:
    """No CR, LF, NUL or other control or line-break character (VT, FF, NEL, U+2028...)
    in any header value: some parsers split lines on them, which would let a caller
    add headers."""
    if not isinstance(value, str):
        raise HeaderInjectionError(field, "must be a string")
    if _HEADER_BREAKERS.search(value):
        raise HeaderInjectionError(
            field, "must not contain CR, LF, NUL or other control or line-break characters"
        )


def check_header_name(name: Any) -> None:
    """An extra header's name: printable ASCII without ':' (RFC 5322), and not one of
    the headers the message is built from."""
    if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
        raise HeaderInjectionError("headers", f"{name!r} is not a header name")
    if name.lower() in RESERVED_HEADERS or name.lower().startswith("content-"):
        raise HeaderInjectionError(f"headers.{name}", f"{name} is set by mailqueue, not by callers")


def check_headers(headers: Any) -> dict[str, str]:
    """Extra headers (name -> value): each name and value checked, as a new dict."""
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise HeaderInjectionError("headers", "expected an object of header names to values")
    if len(headers) > MAX_EXTRA_HEADERS:
        raise HeaderInjectionError("headers", f"at most {MAX_EXTRA_HEADERS}")
    for name, value in headers.items():
        check_header_name(name)
        check_header(f"headers.{name}", value)
    if len({name.lower() for name in headers}) != len(headers):
        raise HeaderInjectionError("headers", "a header is named twice (names ignore case)")
    return dict(headers)
