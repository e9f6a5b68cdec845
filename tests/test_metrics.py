"""GET /metrics: Prometheus text, token-protected, counters shared by every worker."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import time_machine
from flask import Flask

from app import create_app
from app.mail import send_email
from app.metrics import _escape
from app.queues import MAIL_QUEUE, get_queue
from tests.servers import SMTPServer, free_port

SAMPLE = re.compile(
    r'^[a-z_]+(\{[a-z_]+="([^"\\\n]|\\.)*"(,[a-z_]+="([^"\\\n]|\\.)*")*\})? [0-9.]+$'
)


def scrape(client: Any, auth: dict[str, str]) -> dict[str, float]:
    """Fetch /metrics, check every line's syntax, return `name{labels}` -> value."""
    response = client.get("/metrics", headers=auth)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    samples = {}
    for line in response.get_data(as_text=True).splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        assert SAMPLE.match(line), line
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_metrics_needs_the_api_token(client: Any) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer no"}).status_code == 401


def test_an_idle_service(client: Any, auth: dict[str, str]) -> None:
    samples = scrape(client, auth)
    assert samples == {
        **{f'mailqueue_queue_{g}{{queue="{q}"}}': 0.0 for g in (
            "depth", "scheduled", "started", "failed", "oldest_age_seconds"
        ) for q in ("mail-high", "mail", "digests", "mail-bulk")},
        "mailqueue_workers": 0.0,
    }  # fmt: skip
    body = client.get("/metrics", headers=auth).get_data(as_text=True)
    assert "# TYPE mailqueue_mails_sent_total counter" in body
    assert "# TYPE mailqueue_queue_depth gauge" in body


def test_counters_add_up_across_workers(
    app_ctx: Flask, client: Any, auth: dict[str, str], smtp_server: SMTPServer, work: Any
) -> None:
    send_email("ann@example.com", "Hi", "test", address="a")
    work()  # one worker
    send_email("ann@example.com", "Hi", "test", address="a")
    work()  # another worker, another process's worth of state
    smtp_server.handler.refuse_rcpt = {"bob@example.com": "550 5.1.1 no such user"}
    send_email("bob@example.com", "Hi", "test", address="b")
    work()
    smtp_server.handler.refuse_rcpt = {}
    smtp_server.handler.reply = "451 4.3.0 later"
    send_email("cy@example.com", "Hi", "test", address="c")
    work()
    samples = scrape(client, auth)
    assert samples['mailqueue_mails_sent_total{template="test"}'] == 2
    assert samples['mailqueue_mails_failed_total{template="test"}'] == 1
    assert samples['mailqueue_mails_retried_total{template="test"}'] == 1
    assert samples['mailqueue_queue_scheduled{queue="mail"}'] == 1  # waiting for its retry
    assert samples['mailqueue_queue_failed{queue="mail"}'] == 1


def test_queue_depth_and_oldest_age(app_ctx: Flask, client: Any, auth: dict[str, str]) -> None:
    start = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    with time_machine.travel(start, tick=False) as traveller:
        send_email("ann@example.com", "Hi", "test", address="a")
        traveller.move_to(start + timedelta(seconds=30))
        send_email("ann@example.com", "Hi", "test", address="a")
        send_email("ann@example.com", "Later", "test", delay=600, address="a")
        traveller.move_to(start + timedelta(seconds=90))
        samples = scrape(client, auth)
    assert samples['mailqueue_queue_depth{queue="mail"}'] == 2
    assert samples['mailqueue_queue_scheduled{queue="mail"}'] == 1
    assert samples['mailqueue_queue_oldest_age_seconds{queue="mail"}'] == pytest.approx(90, abs=1)
    assert samples['mailqueue_queue_oldest_age_seconds{queue="digests"}'] == 0


def test_jobs_a_worker_claimed_but_has_not_started_still_count_as_waiting(
    app_ctx: Flask, client: Any, auth: dict[str, str], redis_client: Any
) -> None:
    """A worker stuck on a slow server holds up to 15 claimed mail jobs in the
    intermediate list: they are waiting, and the oldest of them sets the age."""
    start = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
    queue = get_queue(MAIL_QUEUE)
    with time_machine.travel(start, tick=False) as traveller:
        for n in range(3):
            send_email("ann@example.com", "Hi", "test", address="a")
            traveller.move_to(start + timedelta(seconds=10 * (n + 1)))
        for _ in range(2):  # as a batch claims them (app.scripts.CLAIM)
            redis_client.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
        traveller.move_to(start + timedelta(seconds=100))
        samples = scrape(client, auth)
        health = client.get("/healthz").get_json()
    assert samples['mailqueue_queue_depth{queue="mail"}'] == 3
    assert samples['mailqueue_queue_oldest_age_seconds{queue="mail"}'] == pytest.approx(100, abs=1)
    assert health["queues"]["mail"]["queued"] == 3


def test_redis_down_is_503(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    client = create_app({"TESTING": True}).test_client()
    response = client.get("/metrics", headers={"Authorization": f"Bearer {env['API_TOKEN']}"})
    assert response.status_code == 503 and response.is_json


def test_label_values_are_escaped() -> None:
    assert _escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
