"""Flask-Babel: mail renders under its record's locale (app.mail.render_email); templates
get gettext (the i18n extension) and the `format_date`/`format_datetime` helpers.
"""

from __future__ import annotations

from flask import Flask
from flask_babel import Babel, format_date, format_datetime, format_number


def init_app(app: Flask) -> None:
    app.config.setdefault("BABEL_DEFAULT_LOCALE", "en")
    app.config.setdefault("BABEL_DEFAULT_TIMEZONE", "UTC")
    Babel(app)
    app.jinja_env.globals.update(
        format_date=format_date, format_datetime=format_datetime, format_number=format_number
    )
