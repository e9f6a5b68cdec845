"""Fixtures: one real redis-server and SMTP servers per session, flushed per test."""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from flask import Flask
from flask.testing import FlaskClient
from jinja2 import ChoiceLoader, FileSystemLoader
from redis import Redis

from app import create_app, queues, smtp
from app.config import SPEC
from app.devsink import make_controller
from app.queues import QUEUE_NAMES, get_redis
from app.smtp import get_mailer
from app.worker import AppWorker
from tests.servers import RedisServer, SMTPServer, free_port

API_TOKEN = "test-token-not-secret"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[SMTPServer]:
    server = SMTPServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def smtp_tls_server(tls_ca: trustme.CA) -> Iterator[SMTPServer]:
    """STARTTLS required, AUTH LOGIN/PLAIN required (user `mailer`, password `s3cret`)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    server = SMTPServer(tls_context=context, users={"mailer": "s3cret"}).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No developer `.env` or exported MAIL_* value may leak into a test."""
    monkeypatch.setattr("app.config.load_dotenv_file", lambda: None)
    monkeypatch.delenv("FLASK_DEBUG", raising=False)  # opens /dev pages without a token
    for key, (_parse, _default, aliases) in SPEC.items():
        for name in (key, *aliases):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _close_every_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every app a test builds (the fixture's, a create_app() in the test, an
    AppWorker's) has its Redis pool and SMTP connection closed after the test: a
    socket left to the garbage collector is a ResourceWarning, an error here, raised
    in whichever later test happens to be running."""
    built: list[Flask] = []
    init_app = queues.init_app

    def init_and_track(app: Flask) -> None:
        init_app(app)
        built.append(app)

    monkeypatch.setattr(queues, "init_app", init_and_track)
    yield
    for app in built:
        if smtp.EXTENSION in app.extensions:
            get_mailer(app).close()
        get_redis(app).close()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[Redis]:
    client = Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def env(
    monkeypatch: pytest.MonkeyPatch,
    redis_server: RedisServer,
    smtp_server: SMTPServer,
    redis_client: Redis,
) -> dict[str, str]:
    """The environment of a configured deployment: what the app and AppWorker read."""
    smtp_server.handler.reset()
    values = {
        "REDIS_URL": redis_server.url,
        "MAIL_SERVER": "127.0.0.1",
        "MAIL_PORT": str(smtp_server.port),
        "MAIL_DEFAULT_SENDER": "Example App <noreply@example.com>",
        "MAIL_SUBJECT_PREFIX": "[Example]",
        "MAIL_TIMEOUT": "5",
        "PUBLIC_URL": "https://mail.example.com",
        "SECRET_KEY": "test-secret-key",
        "API_TOKEN": API_TOKEN,
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    return values


@pytest.fixture
def app(env: dict[str, str]) -> Flask:
    return create_app({"TESTING": True})


@pytest.fixture
def app_ctx(app: Flask) -> Iterator[Flask]:
    with app.app_context():
        yield app


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_TOKEN}"}


def run_worker(queues: tuple[str, ...] = QUEUE_NAMES, *, with_scheduler: bool = False) -> AppWorker:
    """Work every queued job in this process, as `rq worker --burst` would (with RQ's
    scheduler pass first if asked: due scheduled jobs and retries are queued too)."""
    worker = AppWorker(list(queues))
    worker.work(burst=True, logging_level="WARNING", with_scheduler=with_scheduler)
    return worker


@pytest.fixture
def work(env: dict[str, str]) -> Callable[..., AppWorker]:
    """Call `work()` to drain the queues with an AppWorker built from the environment."""
    return run_worker


@pytest.fixture
def outbox(tmp_path: Path, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The dev stack's mail setup: the dev SMTP sink (app.devsink) on a free port as
    MAIL_SERVER, storing `.eml` files in the MAIL_DEV_OUTBOX folder this returns."""
    folder = tmp_path / "outbox"
    controller = make_controller(folder, free_port())
    controller.start()
    monkeypatch.setenv("MAIL_SERVER", "127.0.0.1")
    monkeypatch.setenv("MAIL_PORT", str(controller.port))
    monkeypatch.setenv("MAIL_DEV_OUTBOX", str(folder))
    yield folder
    controller.stop()


@pytest.fixture
def deliver_to_outbox(outbox: Path) -> Callable[[Flask, list[str]], list[Path]]:
    """Call `deliver_to_outbox(app, subjects)`: send one test mail per subject, in order,
    through a worker to the dev sink; returns the stored `.eml` files, oldest first."""

    def deliver(app: Flask, subjects: list[str]) -> list[Path]:
        from app.mail import send_email

        with app.app_context():
            for subject in subjects:
                send_email("Ann Example <ann@example.com>", subject, "test", address="Ann")
        run_worker()
        paths = sorted(outbox.glob("*.eml"))  # the sink names files by arrival time
        assert len(paths) == len(subjects)
        return paths

    return deliver


@pytest.fixture
def extra_templates(tmp_path: Path) -> Callable[[Flask, dict[str, str]], None]:
    """Add templates (path under templates/ -> source) to an app, in front of the real ones."""

    def add(app: Flask, files: dict[str, str]) -> None:
        for name, source in files.items():
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(source)
        original = app.jinja_env.loader
        assert original is not None
        app.jinja_env.loader = ChoiceLoader([FileSystemLoader(str(tmp_path)), original])

    return add
