"""The application factory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from app import PROJECT_ROOT, create_app
from tests.helpers import subprocess_env


def test_create_app_without_argument_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MAIL_SERVER", "smtp.example.com")
    monkeypatch.setenv("MAIL_PORT", "2525")
    monkeypatch.setenv("MAIL_USE_TLS", "yes")
    monkeypatch.setenv("PUBLIC_URL", "https://example.org/")
    app = create_app()
    assert app.config["MAIL_SERVER"] == "smtp.example.com"
    assert app.config["MAIL_PORT"] == 2525
    assert app.config["MAIL_USE_TLS"] is True
    assert app.config["PUBLIC_URL"] == "https://example.org"
    assert app.config["SERVER_NAME"] == "example.org"
    assert app.config["PREFERRED_URL_SCHEME"] == "https"
    assert not app.testing


def test_create_app_wires_extensions_blueprints_and_commands() -> None:
    app = create_app({"TESTING": True})
    assert {"mail", "mailqueue.redis", "mailqueue.smtp"} <= set(app.extensions)
    assert {"api", "health"} <= set(app.blueprints)
    assert "mail" in app.cli.commands
    assert app.template_folder == str(PROJECT_ROOT / "templates")
    # Flask-Mail reads TESTING when init_app runs: the mapping came first.
    assert app.extensions["mail"].suppress is True


def test_each_call_builds_an_independent_app() -> None:
    first, second = create_app({"MAIL_PORT": 1025}), create_app()
    assert first is not second
    assert first.config["MAIL_PORT"] == 1025 and second.config["MAIL_PORT"] == 25


def test_importing_the_worker_and_jobs_pushes_no_app_context() -> None:
    code = (
        "import app.worker, jobs.mail, app.mail, app.api, app.cli, scheduler\n"
        "from flask import has_app_context, has_request_context\n"
        "assert not has_app_context() and not has_request_context()\n"
        "print('clean')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
