"""The worker as the Procfile runs it, and AppWorker's app-context handling."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app, has_app_context
from redis import Redis
from rq.serializers import JSONSerializer

from app import status
from app.mail import send_email
from app.worker import AppWorker
from tests.helpers import procfile, subprocess_env
from tests.servers import SMTPServer


def run_procfile_worker(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The Procfile's `worker:` line with `--burst` appended, through a shell as a
    Procfile host runs it, in a directory without a `.env`."""
    line = procfile()["worker"] + " --burst"
    assert shlex.split(line)[:2] == ["rq", "worker"]
    assert not (cwd / ".env").exists()
    return subprocess.run(
        ["/bin/sh", "-c", line],
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_procfile_worker_delivers_the_mime_we_expect(
    app_ctx: Flask, smtp_server: SMTPServer, redis_client: Redis, tmp_path: Path
) -> None:
    job = send_email("Ann <ann@example.com>", "Procfile", "test", address="<Ann & Co>")
    deferred = send_email("bob@example.com", "Later", "test", address="Bob", delay=3600)
    result = run_procfile_worker(tmp_path)
    assert result.returncode == 0, result.stderr
    [received] = smtp_server.wait_for(1)
    msg = received.message
    assert msg.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in msg.iter_parts()] == ["text/plain", "text/html"]
    assert msg["Subject"] == "[Example] Procfile"
    assert msg["From"] == "Example App <noreply@example.com>"
    assert msg["To"] == "Ann <ann@example.com>"
    assert msg["Message-ID"] == f"<{job.id}@example.com>"
    assert "Hello <Ann & Co>," in received.part("text/plain")
    html = received.part("text/html")
    assert "Hello &lt;Ann &amp; Co&gt;," in html
    assert "Sent by https://mail.example.com" in html
    assert 'href="https://mail.example.com/healthz"' in html
    assert status.load(redis_client, job.id).status == status.SENT  # type: ignore[union-attr]
    # The deferred one is still waiting for its time.
    assert status.load(redis_client, deferred.id).status == status.SCHEDULED  # type: ignore[union-attr]
    # Nothing configures logging under `rq worker` but RQ's own logger: the mail's state
    # changes still reach the process's stderr, one logfmt line each.
    assert f"event=sending mail_id={job.id}" in result.stderr
    assert f"event=sent mail_id={job.id}" in result.stderr


@pytest.mark.parametrize(
    ("key", "value"),
    [("MAIL_PORT", "abc"), ("MAIL_USE_TLS", "maybe"), ("PUBLIC_URL", "not a url")],
)
def test_procfile_worker_with_malformed_config_exits_at_start_up_naming_the_key(
    env: dict[str, str], smtp_server: SMTPServer, redis_client: Redis, tmp_path: Path,
    key: str, value: str,
) -> None:  # fmt: skip
    from app import create_app

    with create_app().app_context():
        send_email("ann@example.com", "Never", "test", address="x")
    result = run_procfile_worker(tmp_path, **{key: value})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mailqueue worker not started: {key}: "), result.stderr
    assert "Traceback" not in result.stderr
    assert smtp_server.messages == []
    assert redis_client.llen("rq:queue:mail") == 1  # the job was not touched


def test_jobs_run_inside_an_app_context_that_is_popped_afterwards(
    env: dict[str, str], redis_client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Any] = []

    def probe(mail_id: str) -> str:
        seen.append(current_app._get_current_object())  # type: ignore[attr-defined]
        return "ok"

    monkeypatch.setattr("jobs.mail.deliver", probe)
    worker = AppWorker(["mail"])
    with worker.app.app_context():
        send_email("ann@example.com", "Hi", "test")
        send_email("bob@example.com", "Hi", "test")
    assert not has_app_context()
    worker.work(burst=True, logging_level="WARNING")
    assert seen == [worker.app, worker.app]  # the app built once, at start-up
    assert not has_app_context()


def test_rq_resolves_each_serializer_once_with_the_same_answer() -> None:
    """app.queues remembers RQ's serializer check (a slow Protocol isinstance)."""
    import rq.job
    import rq.serializers

    import app.queues  # noqa: F401  (installs it)

    original = rq.serializers.resolve_serializer
    assert rq.job.resolve_serializer is not original
    for serializer in (None, "json", JSONSerializer, rq.serializers.DefaultSerializer):
        assert rq.job.resolve_serializer(serializer) is original(serializer)
    with pytest.raises(NotImplementedError):
        rq.job.resolve_serializer(object())
