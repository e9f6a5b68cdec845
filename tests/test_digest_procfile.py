"""The deployed path, as processes: `flask --app app digest run` twice, then the Procfile's
`worker:` line with --burst. Real time (no clock moving across processes), so
subscribers are made due or not due relative to now in each zone."""

from __future__ import annotations

import shlex
import subprocess
from collections import Counter
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from flask import Flask

from app import digests
from tests.helpers import PROJECT_ROOT, VENV_BIN, procfile, subprocess_env
from tests.servers import SMTPServer

ZONES = [
    "UTC",
    "Asia/Tokyo",
    "Asia/Kolkata",
    "Europe/Berlin",
    "America/New_York",
    "Pacific/Auckland",
    "America/Los_Angeles",
]


def flask_cli(*args: str) -> str:
    flask = str(VENV_BIN / "flask")
    result = subprocess.run(
        [flask, "--app", "app", *args],
        cwd=PROJECT_ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_digest_run_twice_then_the_procfile_worker_sends_one_digest_per_due_subscriber(
    app: Flask, smtp_server: SMTPServer
) -> None:
    now = datetime.now(UTC)
    due, later = [], []
    with app.app_context():
        for zone in ZONES:
            local = now.astimezone(ZoneInfo(zone))
            if local.hour == 23 and local.minute >= 58:
                continue  # its local day may end before the dispatch runs
            slug = zone.split("/")[-1].lower()
            email = f"due-{slug}@example.com"
            digests.upsert_subscriber(email, zone, "daily", local.hour)  # hour:00 has passed
            digests.add_item(email, f"News for <{zone}>", url="https://example.com/?a=1&b=2")
            due.append(email)
            if local.hour <= 21:
                email = f"later-{slug}@example.com"
                digests.upsert_subscriber(email, zone, "daily", local.hour + 2)
                digests.add_item(email, "Not yet")
                later.append(email)
    first = flask_cli("digest", "run")
    second = flask_cli("digest", "run")
    assert f"due: {len(due)}, enqueued: {len(due)}, skipped: 0" in first
    assert "due: 0, enqueued: 0, skipped: 0" in second
    preview = flask_cli("digest", "preview", later[0]) if later else ""
    assert not later or "Not yet" in preview

    command = [*shlex.split(procfile()["worker"]), "--burst"]
    assert command[:2] == ["rq", "worker"]
    command[0] = str(VENV_BIN / "rq")
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr

    received = smtp_server.wait_for(len(due))
    per_recipient = Counter(r.rcpt_tos[0] for r in received)
    assert per_recipient == dict.fromkeys(due, 1)
    for message in received:
        html = message.part("text/html")
        assert "News for &lt;" in html and 'href="https://example.com/?a=1&amp;b=2"' in html
        assert message.message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
