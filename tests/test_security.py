"""Security: no pickle in Redis, secrets never in Redis or logs, constant-time token,
autoescaped templates."""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from flask import Flask
from flask.testing import FlaskClient
from redis import Redis

from app import PROJECT_ROOT, status
from app.mail import render_email, send_email
from app.queues import MAIL_QUEUE, get_queue
from app.worker import AppWorker
from tests.conftest import API_TOKEN
from tests.servers import SMTPServer


def all_values(redis_client: Redis) -> list[bytes]:
    """Every value stored in Redis, job payloads decompressed."""
    values: list[bytes] = []
    for key in redis_client.scan_iter(count=1000):
        kind = redis_client.type(key)
        if kind == b"string":
            values.append(redis_client.get(key) or b"")
        elif kind == b"hash":
            for name, value in redis_client.hgetall(key).items():
                values.append(name)
                values.append(_maybe_decompress(value))
        elif kind == b"list":
            values.extend(redis_client.lrange(key, 0, -1))
        elif kind == b"zset":
            values.extend(redis_client.zrange(key, 0, -1))
        elif kind == b"set":
            values.extend(redis_client.smembers(key))
        elif kind == b"stream":
            for _id, fields in redis_client.xrange(key):
                for name, value in fields.items():
                    values.append(name)
                    values.append(_maybe_decompress(value))
    return values


def _maybe_decompress(value: bytes) -> bytes:
    try:
        return zlib.decompress(value)
    except zlib.error:
        return value


def assert_no_pickle(redis_client: Redis) -> int:
    """Every RQ job's payload is JSON; return how many were checked."""
    checked = 0
    for key in redis_client.scan_iter(match="rq:job:*", count=1000):
        data = redis_client.hget(key, "data")
        if data is None:
            continue
        payload = zlib.decompress(data)
        assert not payload.startswith(b"\x80"), f"{key!r} holds a pickle"
        json.loads(payload)
        checked += 1
    for key in redis_client.scan_iter(match="rq:results:*", count=1000):
        for _id, fields in redis_client.xrange(key):
            raw = fields.get(b"return_value")
            if raw:
                decoded = _maybe_decompress(raw)
                assert not decoded.startswith(b"\x80"), f"{key!r} holds a pickle"
    return checked


def test_no_pickle_anywhere_after_the_flows(
    app_ctx: Flask,
    client: FlaskClient,
    auth: dict[str, str],
    smtp_server: SMTPServer,
    work: Callable[[], AppWorker],
    redis_client: Redis,
) -> None:
    send_email("ann@example.com", "Now", "test")
    send_email("ann@example.com", "Later", "test", delay=3600)
    client.post(
        "/api/mail", json={"to": "b@example.com", "subject": "x", "template": "test"}, headers=auth
    )
    smtp_server.handler.reply = "451 4.3.0 later"
    retrying = send_email("c@example.com", "Retry", "test")
    failing = send_email("d@example.com", "Fail", "test")
    redis_client.hset(status.key(failing.id), "template", "missing")
    work()
    smtp_server.handler.reply = None
    queue = get_queue(MAIL_QUEUE)
    assert retrying.id in queue.scheduled_job_registry
    assert failing.id in queue.failed_job_registry
    assert assert_no_pickle(redis_client) >= 3
    assert queue.serializer.__name__ == "JSONSerializer"  # type: ignore[attr-defined]


def test_no_pickle_import_in_the_code() -> None:
    for folder in ("app", "jobs"):
        for path in (PROJECT_ROOT / folder).rglob("*.py"):
            text = path.read_text()
            assert "import pickle" not in text and "pickle.loads" not in text, path


def test_secrets_never_reach_redis_or_logs(
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    smtp_tls_server: SMTPServer,
    tls_ca: trustme.CA,
    tmp_path: Path,
    redis_client: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from app import create_app

    ca_file = tmp_path / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(ca_file))
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    password = "s3cret"
    monkeypatch.setenv("MAIL_PORT", str(smtp_tls_server.port))
    monkeypatch.setenv("MAIL_USE_TLS", "true")
    monkeypatch.setenv("MAIL_USERNAME", "mailer")
    monkeypatch.setenv("MAIL_PASSWORD", password)
    smtp_tls_server.handler.reset()
    caplog.set_level(logging.DEBUG)

    app = create_app({"TESTING": True})
    client = app.test_client()
    good = {"Authorization": f"Bearer {API_TOKEN}"}
    response = client.post(
        "/api/mail",
        json={"to": "ann@example.com", "subject": "Hi", "template": "test"},
        headers=good,
    )
    assert response.status_code == 202
    bad = client.post("/api/mail", json={}, headers={"Authorization": f"Bearer {API_TOKEN}x"})
    assert bad.status_code == 401
    AppWorker(["mail"]).work(burst=True, logging_level="DEBUG")
    [received] = smtp_tls_server.wait_for(1)
    assert received.tls  # and AUTH succeeded: a refused login would have failed the mail
    assert client.get(f"/api/mail/{response.get_json()['id']}", headers=good).status_code == 200

    stored = b"\n".join(all_values(redis_client))
    for secret in (password, API_TOKEN, app.config["SECRET_KEY"]):
        assert secret.encode() not in stored, f"{secret!r} found in Redis"
        assert secret not in caplog.text, f"{secret!r} found in the logs"


def test_token_is_compared_in_constant_time(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import app.api

    calls: list[tuple[bytes, bytes]] = []
    real = app.api.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app.api.hmac, "compare_digest", spy)
    assert (
        client.get("/api/mail/" + "0" * 32, headers={"Authorization": "Bearer nope"}).status_code
        == 401
    )
    assert calls == [(b"nope", API_TOKEN.encode())]


def test_html_is_autoescaped(app_ctx: Flask) -> None:
    rendered = render_email("test", address="<script>alert(1)</script>")
    assert rendered.html is not None
    assert "<script>alert(1)" not in rendered.html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rendered.html


def test_dev_sink_listens_on_loopback_only(tmp_path: Path) -> None:
    from app.devsink import make_controller
    from tests.servers import free_port

    controller = make_controller(tmp_path, free_port())
    controller.start()
    try:
        addresses = {sock.getsockname()[0] for sock in controller.server.sockets}
    finally:
        controller.stop()
    assert addresses == {"127.0.0.1"}
