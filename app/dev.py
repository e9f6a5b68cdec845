"""Developer pages: mail previews at /dev/mail, the dev SMTP sink's inbox at /dev/outbox.

Who may see them: anyone while the app runs in debug mode (`FLASK_DEBUG=1`);
otherwise only a holder of API_TOKEN, sent as `Authorization: Bearer ...`
(scripts) or typed once into the /dev/login form (browsers), which sets a
cookie derived from the token and SECRET_KEY (app/signin.py, shared with /ops/).

- /dev/mail is registered only while MAIL_PREVIEWS is true (default); each
  template under `templates/email/` is rendered with the sample in
  `email/<name>.preview.json` through the real `build_message`, so html (with
  CSS inlined), text, headers, cc, reply-to and attachments are what a worker
  would send (app/devpreviews.py builds them; `?locale=de` picks a language).
- /dev/outbox is registered only while MAIL_DEV_OUTBOX names the folder the
  dev SMTP sink writes `.eml` files to.

Mail html is only ever shown in a sandboxed iframe from a separate route that
also sends a `sandbox` Content-Security-Policy: no script in a mail runs with
the app's origin.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    current_app,
    redirect,
    render_template,
    request,
    url_for,
)

from app.devpreviews import (
    build_preview,
    email_templates,
    html_with_inline_parts,
    load_sample,
)
from app.mail import TEMPLATE_NAME
from app.signin import SignIn

dev = Blueprint("dev", __name__, url_prefix="/dev")
previews = Blueprint("previews", __name__, url_prefix="/dev/mail")
outbox = Blueprint("outbox", __name__, url_prefix="/dev/outbox")

SIGN_IN = SignIn("dev", cookie="mailqueue_dev", cookie_label="mailqueue-dev-pages")
OUTBOX_FILE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.eml$")
OUTBOX_LIMIT = 200  # newest messages listed; the folder may hold thousands
# For the mail html routes: no script, no plugin, no same-origin, no form posts;
# images and inline styles as a mail client would load them.
MAIL_CSP = (
    "sandbox; default-src 'none'; img-src https: http: data: cid:; "
    "style-src 'unsafe-inline'; font-src https: data:"
)


# --- access ------------------------------------------------------------------------------


def require_access() -> Response | None:
    """Open in debug mode; else the API token (bearer header or the login cookie)."""
    return None if SIGN_IN.allowed() else SIGN_IN.page(401)


previews.before_request(require_access)
outbox.before_request(require_access)


def _pages() -> dict[str, Any]:
    """For the pages' navigation: which dev pages this app serves."""
    return {"dev_pages": {name: name in current_app.blueprints for name in ("previews", "outbox")}}


for _blueprint in (dev, previews, outbox):
    _blueprint.context_processor(_pages)


@dev.get("/")
def index() -> Response:
    target = "previews.index" if "previews" in current_app.blueprints else "outbox.index"
    return redirect(url_for(target))  # type: ignore[return-value]


@dev.route("/login", methods=["GET", "POST"])
def login() -> Response:
    """A form for the API token (POST body, so it stays out of URLs and access logs)."""
    return SIGN_IN.login()


def _mail_html_response(html: str) -> Response:
    response = Response(html, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = MAIL_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


# --- previews ------------------------------------------------------------------------------


def _preview_name(name: str) -> str:
    if not TEMPLATE_NAME.match(name) or name not in email_templates():
        abort(404)
    return name


@previews.get("/", endpoint="index")
def previews_index() -> str:
    items = [(name, load_sample(name)) for name in email_templates()]
    return render_template("dev/mail_index.html", items=items)


def _locale() -> str | None:
    """`?locale=de`: preview that language (`?locale=` for none); absent: the sample's."""
    return request.args.get("locale")


@previews.get("/<path:name>")
def preview(name: str) -> str:
    result = build_preview(_preview_name(name), _locale())
    return render_template("dev/mail_preview.html", preview=result, asked_locale=_locale())


@previews.get("/<path:name>.html")
def preview_html(name: str) -> Response:
    """The rendered html alone, for the sandboxed iframe (inline parts as data: URIs)."""
    result = build_preview(_preview_name(name), _locale())
    html = html_with_inline_parts(result)
    if html is None:
        abort(404)
    return _mail_html_response(html)


# --- outbox --------------------------------------------------------------------------------


@dataclass
class OutboxEntry:
    filename: str
    received: datetime
    size: int
    subject: str
    sender: str
    to: str


def outbox_dir() -> Path:
    return Path(current_app.config["MAIL_DEV_OUTBOX"])


def outbox_entries() -> tuple[list[OutboxEntry], int]:
    """The newest OUTBOX_LIMIT messages, newest first, and how many there are in all."""
    folder = outbox_dir()
    try:
        files = [
            (entry.stat().st_mtime_ns, entry.name, entry.stat().st_size)
            for entry in os.scandir(folder)
            if entry.is_file(follow_symlinks=False) and OUTBOX_FILE.match(entry.name)
        ]
    except FileNotFoundError:
        return [], 0
    files.sort(reverse=True)
    entries = []
    parser = BytesHeaderParser(policy=email.policy.default)
    for mtime_ns, filename, size in files[:OUTBOX_LIMIT]:
        try:
            with open(folder / filename, "rb") as handle:
                headers = parser.parse(handle)
        except OSError:
            continue  # deleted since the listing
        entries.append(
            OutboxEntry(
                filename=filename,
                received=datetime.fromtimestamp(mtime_ns / 1e9, UTC),
                size=size,
                subject=str(headers.get("Subject", "")),
                sender=str(headers.get("From", "")),
                to=str(headers.get("To", "")),
            )
        )
    return entries, len(files)


def read_outbox_message(filename: str) -> tuple[bytes, EmailMessage]:
    """One stored message by file name: 404 for any name that is not a plain `.eml` file
    directly inside the outbox folder (no path separators, no `..`, no symlink escape)."""
    if not OUTBOX_FILE.match(filename):
        abort(404)
    folder = outbox_dir().resolve()
    path = (folder / filename).resolve()
    if path.parent != folder or not path.is_file():
        abort(404)
    raw = path.read_bytes()
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return raw, message


def _body(message: EmailMessage, kind: str) -> str | None:
    part = message.get_body(preferencelist=(kind,))
    if part is None:
        return None
    content = part.get_content()
    return content if isinstance(content, str) else None


@outbox.get("/", endpoint="index")
def outbox_index() -> str:
    entries, total = outbox_entries()
    return render_template(
        "dev/outbox_index.html", entries=entries, total=total, folder=str(outbox_dir())
    )


@outbox.get("/<filename>")
def outbox_message(filename: str) -> str:
    raw, message = read_outbox_message(filename)
    return render_template(
        "dev/outbox_message.html",
        filename=filename,
        message=message,
        text=_body(message, "plain"),
        has_html=_body(message, "html") is not None,
        source=raw.decode("utf-8", "replace"),
    )


@outbox.get("/<filename>/html")
def outbox_html(filename: str) -> Response:
    _raw, message = read_outbox_message(filename)
    html = _body(message, "html")
    if html is None:
        abort(404)
    return _mail_html_response(html)


@outbox.get("/<filename>/source")
def outbox_source(filename: str) -> Response:
    raw, _message = read_outbox_message(filename)
    response = Response(raw, content_type="text/plain; charset=utf-8")
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


# --- wiring --------------------------------------------------------------------------------


def init_app(app: Flask) -> None:
    """Register only what is on: a switched-off page is a 404, not a login prompt."""
    enabled = []
    if app.config["MAIL_PREVIEWS"]:
        enabled.append(previews)
    if app.config["MAIL_DEV_OUTBOX"]:
        enabled.append(outbox)
    if not enabled:
        return
    for blueprint in (dev, *enabled):
        app.register_blueprint(blueprint)
