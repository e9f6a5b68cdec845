"""mailqueue: background email for Flask on Redis Queue."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from flask import Flask

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app: defaults and environment (and `.env`), then `config`, then extensions.

    A malformed value raises app.errors.ConfigError naming the key.
    """
    from app import config as settings

    app = Flask(__name__, template_folder=str(PROJECT_ROOT / "templates"))
    settings.load_dotenv_file()
    app.config.update(settings.from_environ(os.environ))
    if config:
        app.config.update(config)
    settings.check(app.config)
    _derive_url_settings(app)

    from flask_mail import Mail

    from app import (
        api,
        cli,
        dev,
        events,
        i18n,
        metrics,
        ops,
        queues,
        smtp,
        suppression_cli,
        suppressions_api,
        unsubscribe,
        webhooks,
    )

    Mail(app)
    i18n.init_app(app)
    events.init_app(app)
    queues.init_app(app)
    smtp.init_app(app)
    api.init_app(app)
    suppressions_api.init_app(app)
    webhooks.init_app(app)
    unsubscribe.init_app(app)
    metrics.init_app(app)
    dev.init_app(app)
    ops.init_app(app)
    cli.init_app(app)
    suppression_cli.init_app(app)
    return app


def _derive_url_settings(app: Flask) -> None:
    """Let `url_for(..., _external=True)` work without a request (in the worker),
    building links from PUBLIC_URL. Flask 3.1 does not restrict routing to SERVER_NAME."""
    parts = urlsplit(app.config["PUBLIC_URL"])
    app.config.setdefault("SERVER_NAME", None)
    if not app.config["SERVER_NAME"]:
        app.config["SERVER_NAME"] = parts.netloc
        app.config["PREFERRED_URL_SCHEME"] = parts.scheme
        app.config["APPLICATION_ROOT"] = parts.path or "/"
    if not app.config["SECRET_KEY"]:
        # Dev default only; unsubscribe tokens need a stable key in production.
        app.config["SECRET_KEY"] = "dev-insecure-" + app.config["REDIS_URL"]
