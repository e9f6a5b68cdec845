"""Addresses: what `to` may hold, normalised as email-validator would, with a fast
path for plain ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from email.utils import formataddr, getaddresses, parseaddr
from typing import Any

import email_validator
from email_validator import EmailNotValidError, validate_email
from email_validator.rfc_constants import (
    CASE_INSENSITIVE_MAILBOX_NAMES,
    EMAIL_MAX_LENGTH,
    LOCAL_PART_MAX_LENGTH,
)

from app.errors import (
    InvalidAddressError,
)
from app.mail.headers import check_header

# A plain `local@domain` address: what it means needs no RFC 5322 parse (app/smtp.py too).
BARE_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")


def validate_recipients(
    to: str | Iterable[str], limit: int, field: str = "to", *, required: bool = True
) -> list[str]:
    """Normalise `to` to a list of `addr` or `Name <addr>` strings, each checked. `field`
    names them in errors (`cc[1]` for the second of a list of cc)."""
    if isinstance(to, str):
        items = [to]
    elif isinstance(to, Iterable) and not isinstance(to, bytes | Mapping):
        items = list(to)
    else:
        raise InvalidAddressError(field, "expected an address or a list of addresses")
    if not items and required:
        raise InvalidAddressError(field, "at least one recipient is required")
    if len(items) > limit:
        raise InvalidAddressError(field, f"at most {limit} recipients per mail")
    if field == "to" or isinstance(to, str):
        return [validate_address(field, item) for item in items]
    return [validate_address(f"{field}[{index}]", item) for index, item in enumerate(items)]


def validate_address(field: str, value: Any) -> str:
    """One address, optionally with a display name (any script); the address itself
    ASCII only, internationalised domains included: no SMTPUTF8."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidAddressError(field, f"expected an email address, got {value!r}")
    check_header(field, value)
    # A bare address (the common case) is one address and needs no RFC 5322 parse:
    # parseaddr would return it unchanged, and it costs a third of a bulk enqueue's
    # validation.
    if BARE_ADDRESS.fullmatch(value):
        name, addr = "", value
    else:
        if len(getaddresses([value])) != 1:
            raise InvalidAddressError(field, f"{value!r}: one address per item, please")
        name, addr = parseaddr(value)
    if not addr or ("<" in value and not value.rstrip().endswith(">")):
        raise InvalidAddressError(field, f"{value!r} is not an email address")
    if not addr.isascii():
        # email-validator accepts an internationalised domain (as IDNA) even without
        # SMTPUTF8 but returns it in Unicode, which smtplib cannot send: refuse here.
        raise InvalidAddressError(
            field, f"{addr!r}: non-ASCII addresses are not supported (no SMTPUTF8)"
        )
    normalized = plain_address(addr)
    if normalized is None:
        try:
            result = validate_email(addr, check_deliverability=False, allow_smtputf8=False)
        except EmailNotValidError as err:
            raise InvalidAddressError(field, f"{addr!r}: {err}") from None
        # `normalized` gives an IDNA domain in Unicode (xn--bcher-kva.example ->
        # bücher.example), which smtplib cannot send without SMTPUTF8: keep it ASCII.
        normalized = result.ascii_email or result.normalized
    return formataddr((name, normalized)) if name else normalized


# A plain address: a dot-atom local part, and a domain of letter-digit-hyphen labels of at
# most 63 characters, with at least one dot, whose last label ends in a letter.
_PLAIN_ADDRESS = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"(?:[A-Za-z0-9][A-Za-z0-9-]{0,61})?[A-Za-z]"
)


def plain_address(addr: str) -> str | None:
    """`addr` normalised exactly as validate_address's email-validator call would,
    if it is a plain address that call certainly accepts; else None (ask it).

    email-validator takes tens of microseconds an address, a third of a bulk
    enqueue's validation; for a plain address its answer is the address with the
    domain lowercased (and an RFC 2142 mailbox name such as Postmaster). Conservative:
    local parts over 64 characters, "--" in the domain (Punycode, reserved forms) and
    special-use domains go to email-validator (its module settings are honoured).
    tests/test_plain_address.py checks the two agree.
    """
    if len(addr) > EMAIL_MAX_LENGTH or not _PLAIN_ADDRESS.fullmatch(addr):
        return None
    local, _, domain = addr.partition("@")
    if len(local) > LOCAL_PART_MAX_LENGTH or "--" in domain:
        return None
    domain = domain.lower()
    for special in email_validator.SPECIAL_USE_DOMAIN_NAMES:
        if domain == special or domain.endswith("." + special):
            return None
    if local.lower() in CASE_INSENSITIVE_MAILBOX_NAMES:
        local = local.lower()
    return f"{local}@{domain}"
