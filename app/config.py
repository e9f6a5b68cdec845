"""Configuration from the environment (and `.env`), validated once at start-up.

Every key has a default that runs on a developer machine; a malformed value
raises ConfigError naming the key, so a bad deploy fails before it serves or
works a single job.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from app.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(key: str, raw: str) -> bool:
    """Accept 1/0/true/false/yes/no/on/off (any case)."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{key}: expected a boolean (1/0/true/false/yes/no), got {raw!r}")


def _int_parser(low: int | None = None, high: int | None = None) -> Callable[[str, str], int]:
    def parse(key: str, raw: str) -> int:
        try:
            value = int(raw.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {raw!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise ConfigError(f"{key}: {value} is outside {low}..{high}")
        return value

    return parse


def _float_parser(low: float = 0.0) -> Callable[[str, str], float]:
    def parse(key: str, raw: str) -> float:
        try:
            value = float(raw.strip())
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {raw!r}") from None
        if not math.isfinite(value):  # nan and inf parse as floats; no setting means them
            raise ConfigError(f"{key}: expected a finite number, got {raw!r}")
        if value < low:
            raise ConfigError(f"{key}: must be at least {low}, got {value}")
        return value

    return parse


def _optional_float(key: str, raw: str) -> float | None:
    return None if raw.strip() == "" else _float_parser(0.001)(key, raw)


def _log_level(key: str, raw: str) -> str:
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{key}: expected DEBUG, INFO, WARNING or ERROR, got {raw!r}")
    return level


def _str(key: str, raw: str) -> str:
    return raw


def _optional_str(key: str, raw: str) -> str | None:
    return raw or None


def _optional_file(key: str, raw: str) -> str | None:
    """A path to a readable file, checked at start-up rather than at the first delivery."""
    if not raw.strip():
        return None
    path = os.path.expanduser(raw.strip())
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {raw!r} is not a readable file")
    return path


def _intervals(key: str, raw: str) -> list[int]:
    try:
        values = [int(part) for part in raw.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"{key}: expected comma-separated seconds, got {raw!r}") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{key}: expected positive seconds, got {raw!r}")
    return values


def _sentinels(key: str, raw: str) -> list[tuple[str, int]]:
    """`host:port,host:port,...` (`[::1]:26379` for IPv6; the port defaults to 26379)."""
    found: list[tuple[str, int]] = []
    for part in (p.strip() for p in raw.split(",")):
        if not part:
            continue
        try:
            parts = urlsplit(f"//{part}")
            host, port = parts.hostname, parts.port or 26379
        except ValueError:
            host, port = None, 0
        if not host or parts.path or parts.username or not 0 < port < 65536:
            raise ConfigError(f"{key}: expected host:port,host:port,..., got {raw!r}")
        found.append((host, port))
    return found


def _name(key: str, raw: str) -> str:
    value = raw.strip()
    if not value or any(c.isspace() for c in value):
        raise ConfigError(f"{key}: expected a name without spaces, got {raw!r}")
    return value


_TOPIC_ARN = re.compile(
    r"^arn:aws(?:-cn|-us-gov)?:sns:[a-z]{2}(?:-[a-z]+)+-\d:\d{12}:[\w-]{1,256}$"
)


def _topic_arns(key: str, raw: str) -> tuple[str, ...]:
    """Comma-separated SNS topic ARNs (arn:aws:sns:<region>:<account>:<topic>)."""
    arns = tuple(part.strip() for part in raw.split(",") if part.strip())
    for arn in arns:
        if not _TOPIC_ARN.match(arn):
            raise ConfigError(f"{key}: {arn!r} is not an SNS topic ARN (arn:aws:sns:...)")
    return arns


def _base64_key(key: str, raw: str) -> str | None:
    """A base64 public key as a provider shows it (its type is checked at start-up by
    the webhook that uses it)."""
    value = "".join(raw.split())
    if not value:
        return None
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{key}: expected the base64 key the provider shows") from None
    return value


def _optional_int(key: str, raw: str) -> int | None:
    return None if raw.strip() == "" else _int_parser(0, 16)(key, raw)


def _optional_size(key: str, raw: str) -> int | None:
    return None if raw.strip() == "" else _int_parser(1024)(key, raw)


def _url(schemes: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(key: str, raw: str) -> str:
        try:
            parts = urlsplit(raw.strip())
            parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
        except ValueError:
            raise ConfigError(f"{key}: expected a {'/'.join(schemes)} URL, got {raw!r}") from None
        where = parts.path if parts.scheme == "unix" else parts.netloc  # unix:///run/redis.sock
        if parts.scheme not in schemes or not where:
            raise ConfigError(f"{key}: expected a {'/'.join(schemes)} URL, got {raw!r}")
        return raw.strip().rstrip("/")

    return parse


# key: (parser, default as an environment string, aliases)
SPEC: dict[str, tuple[Callable[[str, str], Any], str, tuple[str, ...]]] = {
    "MAIL_SERVER": (_str, "localhost", ()),
    "MAIL_PORT": (_int_parser(1, 65535), "25", ()),
    "MAIL_USE_TLS": (parse_bool, "false", ()),
    "MAIL_USE_SSL": (parse_bool, "false", ()),
    "MAIL_USERNAME": (_optional_str, "", ()),
    "MAIL_PASSWORD": (_optional_str, "", ()),
    "MAIL_DEFAULT_SENDER": (_str, "mailqueue <mailqueue@localhost>", ("FLASK_MAIL_SENDER",)),
    "MAIL_SUBJECT_PREFIX": (_str, "", ("FLASK_MAIL_SUBJECT_PREFIX",)),
    # A PEM bundle of CAs to trust for STARTTLS/SSL instead of the system's (a private relay).
    "MAIL_TLS_CA_FILE": (_optional_file, "", ()),
    # Flask-Mail has no SMTP timeout (flask-mail #114); ours bounds connect and every reply.
    "MAIL_TIMEOUT": (_float_parser(0.1), "30", ()),
    # Mails in flight at once per worker process, each over an SMTP connection of its own
    # (so also the most connections a worker opens); 1 = one mail at a time.
    "MAIL_CONCURRENCY": (_int_parser(1, 256), "16", ()),
    # A worker's SMTP connections are closed after this many idle seconds.
    "MAIL_IDLE_TIMEOUT": (_float_parser(0.0), "30", ()),
    "MAIL_STATUS_TTL": (_int_parser(60), str(7 * 24 * 3600), ()),
    "MAIL_JOB_TIMEOUT": (_int_parser(5), "90", ()),
    # Seconds between retries of a transient failure; the count is the number of retries.
    # The default rides out a provider outage of about an hour.
    "MAIL_RETRY_INTERVALS": (_intervals, "15,30,60,120,300,600,900,1200,1200", ()),
    "MAIL_MAX_PER_SECOND": (_optional_float, "", ()),
    "MAIL_MAX_CONTEXT_BYTES": (_int_parser(1024), str(256 * 1024), ()),
    "MAIL_MAX_RECIPIENTS": (_int_parser(1, 1000), "50", ()),
    # Attachments' decoded bytes per mail; an API request carries them in base64 (4/3).
    "MAIL_MAX_ATTACHMENT_BYTES": (_int_parser(0), str(10 * 1024 * 1024), ()),
    # How long an idempotency key keeps naming its mail (seconds).
    "MAIL_IDEMPOTENCY_TTL": (_int_parser(1), "86400", ()),
    # Empty: room for a request at MAIL_MAX_ATTACHMENT_BYTES (see default_content_length).
    "MAX_CONTENT_LENGTH": (_optional_size, "", ()),
    "REDIS_URL": (_url(("redis", "rediss", "unix")), "redis://localhost:6379/0", ()),
    # Redis Sentinel (docs/sentinel.md): the sentinels to ask where the master is, and its
    # name there. Set, REDIS_URL gives only the database, credentials and TLS.
    "REDIS_SENTINELS": (_sentinels, "", ()),
    "REDIS_SENTINEL_MASTER": (_name, "mymaster", ()),
    "REDIS_SENTINEL_PASSWORD": (_optional_str, "", ()),
    # Replicas that must have a mail's writes before it counts as accepted (Redis WAIT);
    # empty: 1 with REDIS_SENTINELS, else 0 (app.queues.min_replicas).
    "REDIS_MIN_REPLICAS": (_optional_int, "", ()),
    "SECRET_KEY": (_optional_str, "", ()),
    "API_TOKEN": (_optional_str, "", ()),
    "PUBLIC_URL": (_url(("http", "https")), "http://localhost:5000", ()),
    "WORKER_MAINTENANCE_INTERVAL": (_int_parser(5, 600), "60", ()),
    # /dev/mail previews: open in debug mode, behind API_TOKEN otherwise; false = no route at all.
    "MAIL_PREVIEWS": (parse_bool, "true", ()),
    # Level of mailqueue's own loggers (the mailqueue.events lines among them).
    "LOG_LEVEL": (_log_level, "INFO", ()),
    # Set by the dev stack (python -m app.devstack) to the folder where its SMTP sink stores
    # every message as an .eml file; empty when mail goes to a real server. Set = /dev/outbox.
    "MAIL_DEV_OUTBOX": (_str, "", ()),
    # Digests: subscribers per digest job, pending items kept per subscriber (oldest
    # dropped beyond it), seconds one digest job may run, seconds a digest's mail record
    # is kept once finished (shorter than MAIL_STATUS_TTL: there is one per subscriber
    # per period, and the subscriber's handled period is what prevents a resend).
    "DIGEST_CHUNK_SIZE": (_int_parser(1, 1000), "100", ()),
    "DIGEST_MAX_ITEMS": (_int_parser(1, 10000), "200", ()),
    "DIGEST_JOB_TIMEOUT": (_int_parser(30), "600", ()),
    "DIGEST_STATUS_TTL": (_int_parser(3600), str(2 * 24 * 3600), ()),
    # Provider webhooks (docs/deliverability.md): each /webhooks/<provider> route exists only
    # while its secret is set. Mailgun's HTTP webhook signing key; SendGrid's signed Event
    # Webhook verification key (base64 ECDSA P-256); the SNS topics SES publishes bounces
    # and complaints to; the Basic credentials on Postmark's webhook URL.
    "MAILGUN_WEBHOOK_SIGNING_KEY": (_optional_str, "", ()),
    "SENDGRID_WEBHOOK_PUBLIC_KEY": (_base64_key, "", ()),
    "SES_SNS_TOPIC_ARNS": (_topic_arns, "", ()),
    "POSTMARK_WEBHOOK_USER": (_optional_str, "", ()),
    "POSTMARK_WEBHOOK_PASSWORD": (_optional_str, "", ()),
}


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """Read and validate every key in SPEC; raise ConfigError on the first bad one."""
    config: dict[str, Any] = {}
    for key, (parse, default, aliases) in SPEC.items():
        raw = environ.get(key)
        for alias in aliases:
            if raw is None:
                raw = environ.get(alias)
        config[key] = parse(key, default if raw is None else raw)
    if config["MAX_CONTENT_LENGTH"] is None:
        config["MAX_CONTENT_LENGTH"] = default_content_length(config)
    return config


def default_content_length(config: Mapping[str, Any]) -> int:
    """A request body that fits a mail at MAIL_MAX_ATTACHMENT_BYTES (in base64) and at
    MAIL_MAX_CONTEXT_BYTES, with 1.5 MiB for the rest of it (about 15 MiB at the defaults)."""
    attachments = math.ceil(config["MAIL_MAX_ATTACHMENT_BYTES"] / 3) * 4
    return attachments + config["MAIL_MAX_CONTEXT_BYTES"] + 3 * 512 * 1024


def check(config: Mapping[str, Any]) -> None:
    """Cross-key checks that apply whatever the source of the values."""
    if config.get("MAIL_USE_TLS") and config.get("MAIL_USE_SSL"):
        raise ConfigError("MAIL_USE_TLS and MAIL_USE_SSL: turn on one, not both")
    if bool(config.get("MAIL_USERNAME")) != bool(config.get("MAIL_PASSWORD")):
        raise ConfigError("MAIL_USERNAME and MAIL_PASSWORD: set both or neither")
    for key in ("MAIL_DEFAULT_SENDER", "MAIL_SUBJECT_PREFIX"):
        value = config.get(key) or ""
        if "\r" in value or "\n" in value:
            raise ConfigError(f"{key}: must not contain CR or LF")
    if bool(config.get("POSTMARK_WEBHOOK_USER")) != bool(config.get("POSTMARK_WEBHOOK_PASSWORD")):
        raise ConfigError(
            "POSTMARK_WEBHOOK_USER and POSTMARK_WEBHOOK_PASSWORD: set both or neither"
        )
    if ":" in (config.get("POSTMARK_WEBHOOK_USER") or ""):
        raise ConfigError("POSTMARK_WEBHOOK_USER: must not contain ':' (HTTP Basic splits there)")
    if config.get("REDIS_SENTINELS") and str(config.get("REDIS_URL", "")).startswith("unix:"):
        raise ConfigError("REDIS_URL: a unix socket cannot be combined with REDIS_SENTINELS")
    _check_rate(config)


def _check_rate(config: Mapping[str, Any]) -> None:
    """A worker waits for its rate-limit permit inside the job, under the job's
    timeout: a rate that makes one job outlast it fails healthy mail (each wait
    spends a retry), so say so at start-up. The bounds are for one worker: N workers
    share the rate, so each waits up to N times longer (README, Reliability)."""
    rate = config.get("MAIL_MAX_PER_SECOND")
    if not rate:
        return
    spacing = 1 / rate
    timeout = config.get("MAIL_JOB_TIMEOUT", 90)
    if 2 * spacing > timeout:
        raise ConfigError(
            f"MAIL_MAX_PER_SECOND: {rate}/s sends a mail every {spacing:.0f} s, and a mail "
            f"job waits for its turn within MAIL_JOB_TIMEOUT ({timeout} s): raise "
            f"MAIL_JOB_TIMEOUT to at least {math.ceil(2 * spacing)}"
        )
    chunk, digest_timeout = (
        config.get("DIGEST_CHUNK_SIZE", 100),
        config.get("DIGEST_JOB_TIMEOUT", 600),
    )
    if chunk * spacing > digest_timeout:
        raise ConfigError(
            f"MAIL_MAX_PER_SECOND: at {rate}/s a digest job of DIGEST_CHUNK_SIZE={chunk} mails "
            f"takes {chunk * spacing:.0f} s or more, over DIGEST_JOB_TIMEOUT ({digest_timeout} s): "
            "lower DIGEST_CHUNK_SIZE or raise DIGEST_JOB_TIMEOUT"
        )


def load_dotenv_file() -> None:
    """Load `.env` from the working directory without overriding the real environment."""
    from dotenv import load_dotenv

    load_dotenv(os.path.join(os.getcwd(), ".env"), override=False)
