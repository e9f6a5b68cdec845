"""`send_email` validation: every refusal is a ValueError naming the problem, with
nothing written to Redis; and the template helper."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask
from redis import Redis

from app import status
from app.errors import (
    HeaderInjectionError,
    InvalidAddressError,
    InvalidContextError,
    InvalidMailError,
    InvalidScheduleError,
    QueueUnavailableError,
    TemplateNotFoundError,
)
from app.mail import render_email, send_email
from tests.helpers import failing_pipelines
from tests.servers import SMTPServer


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


OK: dict[str, Any] = {"to": "ann@example.com", "subject": "Hello", "template": "test"}

# (case id, overrides of OK's arguments, expected error class, field, words in the message)
REFUSALS: list[tuple[str, dict[str, Any], type[InvalidMailError], str, str]] = [
    ("invalid address", {"to": "not-an-address"}, InvalidAddressError, "to", "not-an-address"),
    ("no domain", {"to": "ann@"}, InvalidAddressError, "to", "ann@"),
    ("non-ASCII local part", {"to": "jöhn@example.com"}, InvalidAddressError, "to", "jöhn"),
    ("non-ASCII domain", {"to": "ann@exämple.com"}, InvalidAddressError, "to", "exämple"),
    ("one bad in a list", {"to": ["ann@example.com", "x"]}, InvalidAddressError, "to", "'x'"),
    ("empty list", {"to": []}, InvalidAddressError, "to", "at least one"),
    ("not a string", {"to": 42}, InvalidAddressError, "to", "address"),
    ("too many", {"to": [f"u{i}@example.com" for i in range(51)]}, InvalidAddressError, "to",
     "at most 50"),
    ("LF in to", {"to": "ann@example.com\nBcc: eve@example.com"}, HeaderInjectionError, "to",
     "CR, LF"),
    ("CR in name", {"to": "Ann\r <ann@example.com>"}, HeaderInjectionError, "to", "CR, LF"),
    ("CRLF in subject", {"subject": "Hi\r\nBcc: eve@example.com"}, HeaderInjectionError,
     "subject", "CR, LF"),
    ("NUL in subject", {"subject": "Hi\0"}, HeaderInjectionError, "subject", "NUL"),
    ("empty subject", {"subject": "  "}, InvalidMailError, "subject", "non-empty"),
    ("missing template", {"template": "nonexistent"}, TemplateNotFoundError, "template",
     "email/nonexistent.txt"),
    ("dot-dot", {"template": "../templates/email/test"}, TemplateNotFoundError, "template",
     "no '..'"),
    ("dot-dot inside", {"template": "email/../../app"}, TemplateNotFoundError, "template",
     "no '..'"),
    ("absolute", {"template": "/etc/passwd"}, TemplateNotFoundError, "template",
     "no absolute"),
    ("capitals", {"template": "Test"}, TemplateNotFoundError, "template", "'Test'"),
    ("space", {"template": "te st"}, TemplateNotFoundError, "template", "'te st'"),
    ("extension", {"template": "test.txt"}, TemplateNotFoundError, "template", "'test.txt'"),
    ("layout", {"template": "_layout"}, TemplateNotFoundError, "template", "'_layout'"),
    ("empty", {"template": ""}, TemplateNotFoundError, "template", "''"),
    ("datetime in context", {"when": datetime(2030, 1, 1, tzinfo=UTC)}, InvalidContextError,
     "context", "datetime"),
    ("set in context", {"labels": {"a", "b"}}, InvalidContextError, "context", "set"),
    ("Decimal in context", {"price": Decimal("1.5")}, InvalidContextError, "context",
     "Decimal"),
    ("NaN in context", {"x": float("nan")}, InvalidContextError, "context", "JSON"),
    ("too deep", {"deep": nested(30)}, InvalidContextError, "context", "deeper than 20"),
    ("too big", {"blob": "x" * (256 * 1024)}, InvalidContextError, "context", "larger than"),
    ("naive send_at", {"send_at": datetime(2030, 1, 1, 9, 0)}, InvalidScheduleError, "send_at",
     "timezone-aware"),
    ("send_at and delay", {"send_at": datetime(2030, 1, 1, tzinfo=UTC), "delay": 60},
     InvalidScheduleError, "send_at", "not both"),
    ("negative delay", {"delay": -5}, InvalidScheduleError, "delay", "between"),
    ("delay not a number", {"delay": "60"}, InvalidScheduleError, "delay", "seconds"),
    ("send_at not a datetime", {"send_at": "2030-01-01T00:00Z"}, InvalidScheduleError,
     "send_at", "datetime"),
    ("send_at too far", {"send_at": datetime(2999, 1, 1, tzinfo=UTC)}, InvalidScheduleError,
     "send_at", "year"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "error", "field", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in REFUSALS],
)
def test_refusal_names_the_problem_and_writes_nothing(
    app_ctx: Flask,
    redis_client: Redis,
    overrides: dict[str, Any],
    error: type[InvalidMailError],
    field: str,
    words: str,
) -> None:
    arguments = {**OK, **overrides}
    assert redis_client.dbsize() == 0
    with pytest.raises(error) as caught:
        send_email(**arguments)
    assert isinstance(caught.value, ValueError)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert words in str(caught.value)
    assert redis_client.dbsize() == 0


@pytest.mark.parametrize("key", ["MAIL_DEFAULT_SENDER", "MAIL_SUBJECT_PREFIX"])
def test_header_break_in_sender_config_is_refused_at_send_time(
    app_ctx: Flask, redis_client: Redis, key: str
) -> None:
    # Checked at start-up too (test_config); config can be changed after that.
    app_ctx.config[key] = "Example <noreply@example.com>\r\nBcc: eve@example.com"
    with pytest.raises(HeaderInjectionError, match=f"^{key}: "):
        send_email(**OK)
    assert redis_client.dbsize() == 0


def test_valid_mail_writes_one_record_and_one_job(app_ctx: Flask, redis_client: Redis) -> None:
    job = send_email(["Ann Example <Ann@Example.COM>"], "Hello", "test", address="x")
    record = status.load(redis_client, job.id)
    assert record is not None
    assert record.to == ["Ann Example <Ann@example.com>"]
    assert record.context == {"address": "x"}
    # The job carries the id only: the payload lives in the record.
    assert job.args == [job.id] or job.args == (job.id,)
    assert job.kwargs == {}
    assert job.origin == "mail"


def test_the_stored_context_is_what_json_carries(app_ctx: Flask, redis_client: Redis) -> None:
    """The record keeps the JSON the context was checked as; it reads back as the
    JSON round trip of what the caller gave (keys made strings, tuples lists)."""
    job = send_email("ann@example.com", "Hi", "test", address="Ann", n={1: (2.5, None)}, é="ü")
    stored = redis_client.hget(status.key(job.id), "context")
    assert stored == b'{"address":"Ann","n":{"1":[2.5,null]},"\\u00e9":"\\u00fc"}'
    record = status.load(redis_client, job.id)
    assert record is not None
    assert record.context == {"address": "Ann", "n": {"1": [2.5, None]}, "é": "ü"}


def test_redis_down_raises_queue_unavailable_and_writes_nothing(
    app_ctx: Flask, redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    with failing_pipelines(monkeypatch):
        with pytest.raises(QueueUnavailableError, match="not queued"):
            send_email(**OK)
        with pytest.raises(QueueUnavailableError):
            send_email(**OK, delay=timedelta(hours=1))
    # Nothing outside the transaction either (rq's own scheduling writes its ZADD
    # outside any pipeline; app.mail.schedule keeps it in).
    assert redis_client.dbsize() == 0


def test_render_email_renders_both_parts_with_the_layout(app_ctx: Flask) -> None:
    rendered = render_email("test", address="<b>Ann</b>")
    assert "Hello <b>Ann</b>," in rendered.text
    assert rendered.html is not None
    assert "Hello &lt;b&gt;Ann&lt;/b&gt;," in rendered.html
    assert '<div class="container" style="' in rendered.html  # the shared layout, CSS inlined
    assert "Sent by https://mail.example.com" in rendered.text
    assert "https://mail.example.com/healthz" in rendered.html


def test_a_punycode_domain_stays_ascii_and_is_delivered(
    app_ctx: Flask, redis_client: Redis, smtp_server: SMTPServer, work: Callable[[], object]
) -> None:
    """email-validator gives an IDNA domain back in Unicode; smtplib could not send that."""
    job = send_email(["Ann <ann@XN--Bcher-kva.Example>", "bob@xn--bcher-kva.example"], "Hi", "test")
    record = status.load(redis_client, job.id)
    assert record is not None
    assert record.to == ["Ann <ann@xn--bcher-kva.example>", "bob@xn--bcher-kva.example"]
    work()
    [received] = smtp_server.wait_for(1)
    assert sorted(received.rcpt_tos) == ["ann@xn--bcher-kva.example", "bob@xn--bcher-kva.example"]
    assert status.load(redis_client, job.id).status == status.SENT  # type: ignore[union-attr]
