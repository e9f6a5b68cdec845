"""The plain-address fast path agrees with email-validator, which it stands in for.

`plain_address` may only answer for addresses email-validator (as validate_address
calls it) accepts, with the very normalised form it would return; for anything
else it must say None and leave the decision to email-validator.
"""

from __future__ import annotations

from typing import Any

import email_validator
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import InvalidAddressError
from app.mail import addresses as mail
from app.mail import plain_address, validate_address


def reference(addr: str) -> str | None:
    """email-validator's normalised form of `addr`, or None if it refuses it."""
    try:
        return validate_email(addr, check_deliverability=False, allow_smtputf8=False).normalized
    except EmailNotValidError:
        return None


def agrees(addr: str) -> str | None:
    fast = plain_address(addr)
    if fast is not None:
        assert fast == reference(addr), addr
    return fast


ATEXT = "abcxyzABCXYZ0189!#$%&'*+/=?^_`{|}~-"
LABEL_CHARS = "abzAZ09-"
# Last labels worth trying: ordinary, upper case, numeric, ending in a digit or hyphen,
# special-use and reserved names, Punycode and R-LDH forms, one over 63 characters.
TLDS = ["com", "COM", "io", "x1", "1x", "123", "a-b", "b-", "-b", "invalid", "LOCAL"]
TLDS += ["localhost", "onion", "test", "arpa", "xn--p1ai", "ab--cd", "x" * 63, "x" * 64]

NAMED_LABELS = ["example", "EXAMPLE", "xn--bcher-kva"]

labels = st.text(LABEL_CHARS, min_size=0, max_size=66)
domains = st.builds(
    lambda parts, tld: ".".join([*parts, tld]),
    st.lists(st.one_of(labels, st.sampled_from(NAMED_LABELS)), max_size=4),
    st.one_of(st.sampled_from(TLDS), labels),
)
locals_ = st.one_of(
    st.text(ATEXT + ".", min_size=0, max_size=70),
    st.sampled_from(["Postmaster", "INFO", "abuse", "noc.x", "x", "a" * 64, "a" * 65]),
    st.text(st.characters(codec="ascii"), max_size=12),  # quotes, spaces, controls, "@"...
)
addresses = st.one_of(
    st.builds(lambda local, domain: f"{local}@{domain}", locals_, domains),
    st.emails(),
    st.text(st.characters(codec="ascii"), max_size=30),
)


@settings(max_examples=1500, deadline=None)
@given(addr=addresses)
def test_whatever_the_fast_path_accepts_email_validator_accepts_alike(addr: str) -> None:
    agrees(addr)


@pytest.mark.parametrize(
    ("addr", "normalized"),
    [
        ("ann@example.com", "ann@example.com"),
        ("Ann.Lee+tag@Mail.EXAMPLE.Com", "Ann.Lee+tag@mail.example.com"),
        ("o'brien@example.co.uk", "o'brien@example.co.uk"),
        ("!#$%&'*+-/=?^_`{|}~@example.com", "!#$%&'*+-/=?^_`{|}~@example.com"),
        ("POSTMASTER@Example.com", "postmaster@example.com"),  # RFC 2142 names: lowercased
        ("Info@example.com", "info@example.com"),
        ("a@b.c1d", "a@b.c1d"),  # a last label only has to end in a letter
        ("a@1.2.x", "a@1.2.x"),
        ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
        ("a@" + "b" * 63 + ".com", "a@" + "b" * 63 + ".com"),
        ("a@a-b.com", "a@a-b.com"),
    ],
)
def test_plain_addresses_take_the_fast_path(addr: str, normalized: str) -> None:
    assert agrees(addr) == normalized


@pytest.mark.parametrize(
    "addr",
    [
        "a" * 65 + "@example.com",  # email-validator allows it unless strict: it decides
        "a@" + "b" * 64 + ".com",  # a label over 63 characters
        "a@" + ".".join(["b" * 60] * 5) + ".com",  # over 254 in all
        "a@localhost",
        "a@example",  # no dot
        "a@example.123",  # last label all digits
        "a@example.c1",  # last label ends in a digit
        "a@x.invalid",
        "a@mail.LOCAL",
        "a@x.onion",
        "a@x.test",
        "a@1.in-addr.arpa",
        "a@xn--bcher-kva.example",  # Punycode: email-validator returns it decoded
        "a@ab--cd.com",  # reserved R-LDH label
        "a@-x.com",
        "a@x-.com",
        "a@.x.com",
        "a@x..com",
        "a@x.com.",
        ".a@x.com",
        "a.@x.com",
        "a..b@x.com",
        '"a b"@x.com',
        "a@[127.0.0.1]",
        "a(comment)@x.com",
        "a@b@x.com",
        "a @x.com",
        "@x.com",
        "a@",
        "a",
    ],
)
def test_anything_else_is_left_to_email_validator(addr: str) -> None:
    assert plain_address(addr) is None


def test_a_special_use_name_added_to_email_validator_is_honoured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert plain_address("ann@mail.corp.example") == "ann@mail.corp.example"
    names = [*email_validator.SPECIAL_USE_DOMAIN_NAMES, "corp.example"]
    monkeypatch.setattr(email_validator, "SPECIAL_USE_DOMAIN_NAMES", names)
    assert plain_address("ann@mail.corp.example") is None
    assert reference("ann@mail.corp.example") is None


def test_validate_address_asks_email_validator_only_when_the_fast_path_cannot_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def counting(addr: str, **kwargs: Any) -> Any:
        asked.append(addr)
        return validate_email(addr, **kwargs)

    monkeypatch.setattr(mail, "validate_email", counting)
    assert validate_address("to", "Ann@EXAMPLE.com") == "Ann@example.com"
    assert validate_address("to", "Ann Lee <Ann@EXAMPLE.com>") == "Ann Lee <Ann@example.com>"
    assert asked == []
    long_local = "a" * 65 + "@Example.com"  # over 64: email-validator's call (not strict)
    assert validate_address("to", long_local) == "a" * 65 + "@example.com"
    with pytest.raises(InvalidAddressError, match="special-use or reserved"):
        validate_address("to", "ann@localhost.localhost")
    assert asked == [long_local, "ann@localhost.localhost"]
