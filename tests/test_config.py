"""Configuration: every key's default, parsing, aliases, `.env`, and refusal at start-up."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from app import create_app
from app.config import SPEC, from_environ
from app.config import load_dotenv_file as real_load_dotenv_file
from app.errors import ConfigError
from app.worker import AppWorker

# Every key in SPEC and its default, written out so a changed default fails a test.
DEFAULTS: dict[str, Any] = {
    "MAIL_SERVER": "localhost",
    "MAIL_PORT": 25,
    "MAIL_USE_TLS": False,
    "MAIL_USE_SSL": False,
    "MAIL_USERNAME": None,
    "MAIL_PASSWORD": None,
    "MAIL_DEFAULT_SENDER": "mailqueue <mailqueue@localhost>",
    "MAIL_SUBJECT_PREFIX": "",
    "MAIL_TLS_CA_FILE": None,
    "MAIL_TIMEOUT": 30.0,
    "MAIL_CONCURRENCY": 16,
    "MAIL_IDLE_TIMEOUT": 30.0,
    "MAIL_STATUS_TTL": 7 * 24 * 3600,
    "MAIL_JOB_TIMEOUT": 90,
    "MAIL_RETRY_INTERVALS": [15, 30, 60, 120, 300, 600, 900, 1200, 1200],
    "MAIL_MAX_PER_SECOND": None,
    "MAIL_MAX_CONTEXT_BYTES": 256 * 1024,
    "MAIL_MAX_RECIPIENTS": 50,
    # Room for a mail at MAIL_MAX_ATTACHMENT_BYTES in base64, the context and 1.5 MiB.
    "MAX_CONTENT_LENGTH": 13981016 + 256 * 1024 + 3 * 512 * 1024,
    "MAIL_MAX_ATTACHMENT_BYTES": 10 * 1024 * 1024,
    "MAIL_IDEMPOTENCY_TTL": 86400,
    "REDIS_URL": "redis://localhost:6379/0",
    "REDIS_SENTINELS": [],
    "REDIS_SENTINEL_MASTER": "mymaster",
    "REDIS_SENTINEL_PASSWORD": None,
    "REDIS_MIN_REPLICAS": None,
    "SECRET_KEY": None,
    "API_TOKEN": None,
    "PUBLIC_URL": "http://localhost:5000",
    "WORKER_MAINTENANCE_INTERVAL": 60,
    "MAIL_DEV_OUTBOX": "",
    "DIGEST_CHUNK_SIZE": 100,
    "DIGEST_MAX_ITEMS": 200,
    "DIGEST_JOB_TIMEOUT": 600,
    "DIGEST_STATUS_TTL": 2 * 24 * 3600,
    "MAILGUN_WEBHOOK_SIGNING_KEY": None,
    "SENDGRID_WEBHOOK_PUBLIC_KEY": None,
    "SES_SNS_TOPIC_ARNS": (),
    "POSTMARK_WEBHOOK_USER": None,
    "POSTMARK_WEBHOOK_PASSWORD": None,
    "MAIL_PREVIEWS": True,
    "LOG_LEVEL": "INFO",
}


def test_every_key_has_the_documented_default() -> None:
    assert set(DEFAULTS) == set(SPEC), "a SPEC key was added or removed: update DEFAULTS"
    assert from_environ({}) == DEFAULTS


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("Yes", True),
        ("on", True),
        ("0", False),
        ("false", False),
        ("False", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_booleans(raw: str, expected: bool) -> None:
    assert from_environ({"MAIL_USE_SSL": raw})["MAIL_USE_SSL"] is expected


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"MAIL_PORT": "abc"}, "MAIL_PORT"),
        ({"MAIL_PORT": "70000"}, "MAIL_PORT"),
        ({"MAIL_USE_TLS": "maybe"}, "MAIL_USE_TLS"),
        ({"MAIL_USE_SSL": "2"}, "MAIL_USE_SSL"),
        ({"MAIL_USE_TLS": "1", "MAIL_USE_SSL": "1"}, "MAIL_USE_TLS and MAIL_USE_SSL"),
        ({"MAIL_USERNAME": "only-user"}, "MAIL_USERNAME and MAIL_PASSWORD"),
        ({"MAIL_TIMEOUT": "soon"}, "MAIL_TIMEOUT"),
        ({"MAIL_CONCURRENCY": "0"}, "MAIL_CONCURRENCY"),
        ({"MAIL_CONCURRENCY": "many"}, "MAIL_CONCURRENCY"),
        ({"MAIL_TIMEOUT": "nan"}, "MAIL_TIMEOUT"),
        ({"MAIL_MAX_PER_SECOND": "inf"}, "MAIL_MAX_PER_SECOND"),
        ({"MAIL_MAX_PER_SECOND": "0.01"}, "MAIL_MAX_PER_SECOND"),  # a mail per 100 s > 90 / 2
        ({"MAIL_MAX_PER_SECOND": "0.1"}, "MAIL_MAX_PER_SECOND"),  # 100 digests take 1,000 s
        ({"MAIL_RETRY_INTERVALS": "15,x"}, "MAIL_RETRY_INTERVALS"),
        ({"MAIL_RETRY_INTERVALS": "0"}, "MAIL_RETRY_INTERVALS"),
        ({"MAIL_STATUS_TTL": "10"}, "MAIL_STATUS_TTL"),
        ({"MAIL_TLS_CA_FILE": "/nonexistent/ca.pem"}, "MAIL_TLS_CA_FILE"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://localhost:port/0"}, "REDIS_URL"),
        ({"REDIS_URL": "unix://"}, "REDIS_URL"),
        ({"PUBLIC_URL": "example.com"}, "PUBLIC_URL"),
        ({"PUBLIC_URL": "http://[::1"}, "PUBLIC_URL"),
        ({"MAIL_DEFAULT_SENDER": "a@example.com\nBcc: x@example.com"}, "MAIL_DEFAULT_SENDER"),
        ({"FLASK_MAIL_SUBJECT_PREFIX": "[x]\r\n"}, "MAIL_SUBJECT_PREFIX"),
    ],
)
def test_malformed_value_stops_create_app_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], key: str
) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        create_app()
    message = str(caught.value)
    assert message.startswith(key), message
    assert "\n" not in message


def test_a_slow_rate_is_accepted_with_timeouts_that_allow_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name, value in {
        "MAIL_MAX_PER_SECOND": "0.1",
        "MAIL_JOB_TIMEOUT": "20",
        "DIGEST_CHUNK_SIZE": "50",
    }.items():
        monkeypatch.setenv(name, value)
    assert create_app().config["MAIL_MAX_PER_SECOND"] == 0.1


def test_a_unix_socket_redis_url_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "unix:///run/redis/redis.sock?db=2")
    assert create_app().config["REDIS_URL"] == "unix:///run/redis/redis.sock?db=2"


def test_worker_fails_at_start_up_not_at_the_first_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_PORT", "abc")
    with pytest.raises(SystemExit, match=r"^mailqueue worker not started: MAIL_PORT: ") as exit:
        AppWorker(["mail"])
    assert isinstance(exit.value.__cause__, ConfigError)


def test_seed_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASK_MAIL_SUBJECT_PREFIX", "[Seed]")
    monkeypatch.setenv("FLASK_MAIL_SENDER", "Seed <seed@example.com>")
    app = create_app()
    assert app.config["MAIL_SUBJECT_PREFIX"] == "[Seed]"
    assert app.config["MAIL_DEFAULT_SENDER"] == "Seed <seed@example.com>"


def test_the_new_name_wins_over_its_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLASK_MAIL_SUBJECT_PREFIX", "[Seed]")
    monkeypatch.setenv("MAIL_SUBJECT_PREFIX", "[New]")
    assert create_app().config["MAIL_SUBJECT_PREFIX"] == "[New]"


def test_the_mapping_overrides_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_PORT", "2525")
    assert create_app({"MAIL_PORT": 2626}).config["MAIL_PORT"] == 2626


def test_the_mapping_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"^MAIL_USE_TLS and MAIL_USE_SSL"):
        create_app({"MAIL_USE_TLS": True, "MAIL_USE_SSL": True})


def test_public_url_drives_external_links_without_a_request() -> None:
    from flask import url_for

    app = create_app({"PUBLIC_URL": "https://example.org/mq"})
    with app.app_context():
        assert url_for("health.healthz", _external=True) == "https://example.org/mq/healthz"


@pytest.fixture
def dotenv_enabled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """The real `.env` loader, in a temporary working directory; whatever it puts
    into os.environ is removed afterwards."""
    monkeypatch.setattr("app.config.load_dotenv_file", real_load_dotenv_file)
    monkeypatch.chdir(tmp_path)
    with mock.patch.dict(os.environ):
        yield tmp_path / ".env"


def test_dotenv_file_is_read_and_the_real_environment_wins(
    dotenv_enabled: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dotenv_enabled.write_text(
        "MAIL_PORT=2526\nMAIL_SUBJECT_PREFIX=[dotenv]\nAPI_TOKEN=from-dotenv\n"
    )
    monkeypatch.setenv("MAIL_SUBJECT_PREFIX", "[real]")
    app = create_app()
    assert app.config["MAIL_PORT"] == 2526
    assert app.config["API_TOKEN"] == "from-dotenv"
    assert app.config["MAIL_SUBJECT_PREFIX"] == "[real]"


def test_malformed_value_in_dotenv_names_the_key(dotenv_enabled: Path) -> None:
    dotenv_enabled.write_text("MAIL_USE_TLS=maybe\n")
    with pytest.raises(ConfigError, match=r"^MAIL_USE_TLS"):
        create_app()


@pytest.mark.parametrize(
    ("key", "raw"),
    [
        ("SES_SNS_TOPIC_ARNS", "arn:aws:sqs:eu-west-1:123456789012:q"),
        ("SES_SNS_TOPIC_ARNS", "arn:aws:sns:eu-west-1:12345:short-account"),
        ("SES_SNS_TOPIC_ARNS", "ses-bounces"),
        ("SENDGRID_WEBHOOK_PUBLIC_KEY", "not*base64"),
    ],
)
def test_webhook_settings_are_checked(key: str, raw: str) -> None:
    with pytest.raises(ConfigError, match=key):
        from_environ({key: raw})


def test_topic_arns_are_a_list() -> None:
    arns = "arn:aws:sns:eu-west-1:123456789012:a, arn:aws-cn:sns:cn-north-1:123456789012:b"
    assert from_environ({"SES_SNS_TOPIC_ARNS": arns})["SES_SNS_TOPIC_ARNS"] == (
        "arn:aws:sns:eu-west-1:123456789012:a",
        "arn:aws-cn:sns:cn-north-1:123456789012:b",
    )
