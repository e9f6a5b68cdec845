"""Unsubscribe pages: `GET /unsubscribe/<token>` asks, `POST` unsubscribes.

GET never changes anything: mail scanners and link previews fetch every link
in a message. POST is both the page's button and RFC 8058 one-click (a mail
client posts `List-Unsubscribe=One-Click` to the List-Unsubscribe URL); it sets
the subscriber's frequency to `off` and answers 200 even if they were already
off or are gone, so a repeated click is harmless. A token that is not ours
gets the same 404 page whatever is wrong with it.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, make_response, render_template, url_for

from app import digests

bp = Blueprint("unsubscribe", __name__)


@bp.get("/unsubscribe/<token>")
def page(token: str) -> Response:
    email = digests.read_unsubscribe_token(token)
    if email is None:
        return _invalid()
    action = url_for("unsubscribe.confirm", token=token)
    html = render_template("web/unsubscribe_confirm.html", masked=mask(email), action=action)
    return _page(html, 200)


@bp.post("/unsubscribe/<token>")
def confirm(token: str) -> Response:
    email = digests.read_unsubscribe_token(token)
    if email is None:
        return _invalid()
    digests.unsubscribe(email)
    return _page(render_template("web/unsubscribe_done.html", masked=mask(email)), 200)


def mask(email: str) -> str:
    """`a***@example.com`: enough to recognise, not enough to harvest from a shared link."""
    local, _, domain = email.partition("@")
    return f"{local[:1]}***@{domain}"


def _invalid() -> Response:
    return _page(render_template("web/unsubscribe_invalid.html"), 404)


def _page(html: str, code: int) -> Response:
    response = make_response(html, code)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"  # the URL carries the token
    response.headers["X-Robots-Tag"] = "noindex"
    return response


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
