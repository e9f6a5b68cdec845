"""Developer pages: mail previews at /dev/mail, the dev SMTP sink's inbox at /dev/outbox.

Who may see them: anyone while the app runs in debug mode (`FLASK_DEBUG=1`);
otherwise only a holder of API_TOKEN, sent as `Authorization: Bearer ...`
(scripts) or typed once into the /dev/login form (browsers), which sets a
cookie derived from the token and SECRET_KEY (changing either logs everyone
out). The token is never accepted in a query string: access logs record those.

- /dev/mail is registered only while MAIL_PREVIEWS is true (default); each
  template under `templates/email/` is rendered with the sample in
  `email/<name>.preview.json` through the real `build_message`, so html (with
  CSS inlined), text and headers are what a worker would send.
- /dev/outbox is registered only while MAIL_DEV_OUTBOX names the folder the
  dev SMTP sink writes `.eml` files to.

Mail html is only ever shown in a sandboxed iframe from a separate route that
also sends a `sandbox` Content-Security-Policy: no script in a mail runs with
the app's origin.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
from jinja2 import TemplateNotFound

from app.api import bearer_token, token_matches
from app.errors import InvalidMailError
from app.mail import TEMPLATE_NAME, build_message, prepare

dev = Blueprint("dev", __name__, url_prefix="/dev")
previews = Blueprint("previews", __name__, url_prefix="/dev/mail")
outbox = Blueprint("outbox", __name__, url_prefix="/dev/outbox")

COOKIE = "mailqueue_dev"
COOKIE_MAX_AGE = 12 * 3600
PREVIEW_SUFFIX = ".preview.json"
DEFAULT_PREVIEW_TO = "Preview Recipient <preview@example.com>"
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
    if current_app.debug:
        return None
    if token_matches(bearer_token()) or _cookie_ok(request.cookies.get(COOKIE, "")):
        return None
    return _login_page(status=401)


previews.before_request(require_access)
outbox.before_request(require_access)


def _pages() -> dict[str, Any]:
    """For the pages' navigation: which dev pages this app serves."""
    return {"dev_pages": {name: name in current_app.blueprints for name in ("previews", "outbox")}}


for _blueprint in (dev, previews, outbox):
    _blueprint.context_processor(_pages)


def _cookie_value() -> str:
    token = current_app.config.get("API_TOKEN") or ""
    key = str(current_app.config["SECRET_KEY"]).encode()
    return hmac.new(key, b"mailqueue-dev-pages:" + token.encode(), hashlib.sha256).hexdigest()


def _cookie_ok(supplied: str) -> bool:
    if not current_app.config.get("API_TOKEN") or not supplied:
        return False
    return hmac.compare_digest(supplied.encode(), _cookie_value().encode())


def _safe_next(target: str | None) -> str:
    """Only a local /dev/ path: the login form must not redirect anywhere else."""
    target = target or ""
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target or not parts.path.startswith("/dev/"):
        return url_for("dev.index")
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _login_page(status: int, error: str = "") -> Response:
    """The token form; after it, back to the page that asked (or to `?next=`)."""
    wanted = request.values.get("next") if request.endpoint == "dev.login" else request.full_path
    body = render_template(
        "dev/login.html",
        next=_safe_next(wanted),
        error=error,
        enabled=bool(current_app.config.get("API_TOKEN")),
    )
    return Response(body, status=status, content_type="text/html; charset=utf-8")


@dev.get("/")
def index() -> Response:
    target = "previews.index" if "previews" in current_app.blueprints else "outbox.index"
    return redirect(url_for(target))  # type: ignore[return-value]


@dev.route("/login", methods=["GET", "POST"])
def login() -> Response:
    """A form for the API token (POST body, so it stays out of URLs and access logs)."""
    if request.method == "GET":
        return _login_page(status=200)
    if not token_matches(request.form.get("token", "").strip()):
        return _login_page(status=401, error="That is not the API token.")
    response: Response = redirect(_safe_next(request.form.get("next")))  # type: ignore[assignment]
    response.set_cookie(
        COOKIE,
        _cookie_value(),
        max_age=COOKIE_MAX_AGE,
        path="/dev/",
        httponly=True,
        samesite="Lax",
        secure=request.is_secure,
    )
    return response


def _mail_html_response(html: str) -> Response:
    response = Response(html, content_type="text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = MAIL_CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    return response


# --- previews ------------------------------------------------------------------------------


@dataclass
class Sample:
    """The sample of one template: what a preview renders with, or why it cannot."""

    subject: str
    to: str | list[str]
    context: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    note: str = ""  # shown beside the template; set when there is no usable sample
    usable: bool = True  # false: the file exists but is broken, nothing is rendered


@dataclass
class Preview:
    name: str
    sample: Sample
    has_txt: bool
    has_html: bool
    subject: str = ""  # as sent: with MAIL_SUBJECT_PREFIX
    sender: str = ""
    text: str = ""
    html: str | None = None
    headers: str = ""
    error: str = ""
    parts: list[str] = field(default_factory=list)


def email_templates() -> list[str]:
    """Every mail template name (`email/<name>.txt` or `.html`), without `_` partials."""
    names = set()
    for path in current_app.jinja_env.list_templates(extensions=["txt", "html"]):
        if not path.startswith("email/"):
            continue
        name = path[len("email/") :].rsplit(".", 1)[0]
        # `<name>.<locale>` is a language of <name> (app.mail.render_email), not a template.
        if "." not in name and not any(part.startswith("_") for part in name.split("/")):
            names.add(name)
    return sorted(names)


def _source(path: str) -> str | None:
    """A file under the template folders (found as Jinja finds templates), or None."""
    env = current_app.jinja_env
    try:
        if env.loader is None:
            return None
        return env.loader.get_source(env, path)[0]
    except TemplateNotFound:
        return None


def load_sample(name: str) -> Sample:
    """Read `email/<name>.preview.json`: {"subject"?, "to"?, "context"?: {...}, "headers"?}."""
    fallback_subject = f"Preview of {name}"
    path = f"email/{name}{PREVIEW_SUFFIX}"
    source = _source(path)
    if source is None:
        return Sample(
            fallback_subject,
            DEFAULT_PREVIEW_TO,
            {},
            note=f"No sample context: add templates/{path} to preview with real data. "
            "Rendered here with an empty context.",
        )
    try:
        data = json.loads(source)
    except ValueError as err:
        return _broken(name, f"templates/{path} is not valid JSON: {err}")
    if not isinstance(data, dict):
        return _broken(name, f'templates/{path} must be a JSON object {{"context": {{...}}}}')
    unknown = sorted(set(data) - {"subject", "to", "context", "headers"})
    if unknown:
        return _broken(
            name,
            f"templates/{path}: unknown key {unknown[0]!r} (expected subject, to, context, "
            "headers; the template variables go inside context)",
        )
    subject = data.get("subject", fallback_subject)
    to = data.get("to", DEFAULT_PREVIEW_TO)
    context = data.get("context", {})
    if not isinstance(subject, str):
        return _broken(name, f"templates/{path}: subject must be a string")
    if not (isinstance(to, str) or (isinstance(to, list) and all(isinstance(a, str) for a in to))):
        return _broken(name, f"templates/{path}: to must be an address or a list of addresses")
    if not isinstance(context, dict):
        return _broken(name, f"templates/{path}: context must be a JSON object")
    headers = data.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return _broken(name, f"templates/{path}: headers must map names to strings")
    return Sample(subject, to, context, headers)


def _broken(name: str, note: str) -> Sample:
    return Sample(f"Preview of {name}", DEFAULT_PREVIEW_TO, {}, note=note, usable=False)


def build_preview(name: str) -> Preview:
    """Render `name` as a worker would, from a throw-away (never saved) mail record."""
    preview = Preview(
        name=name,
        sample=load_sample(name),
        has_txt=_source(f"email/{name}.txt") is not None,
        has_html=_source(f"email/{name}.html") is not None,
    )
    if not preview.has_txt:
        preview.error = f"templates/email/{name}.txt is missing: a mail needs its text part."
        return preview
    if not preview.sample.usable:
        return preview
    sample = preview.sample
    try:
        record = prepare(sample.to, sample.subject, name, sample.context, headers=sample.headers)
        message = build_message(record)
        raw = message.as_bytes()
    except InvalidMailError as err:
        preview.error = f"send_email would refuse this sample: {err}"
        return preview
    except Exception as err:  # a template bug is exactly what a preview is for
        preview.error = f"Rendering failed: {type(err).__name__}: {err}"
        return preview
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    head, _, _ = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    preview.headers = head.decode("ascii", "replace")
    preview.subject = str(parsed["Subject"])
    preview.sender = str(parsed["From"])
    preview.text = message.body or ""
    preview.html = message.html
    preview.parts = [part.get_content_type() for part in parsed.walk()]
    return preview


def _preview_name(name: str) -> str:
    if not TEMPLATE_NAME.match(name) or name not in email_templates():
        abort(404)
    return name


@previews.get("/", endpoint="index")
def previews_index() -> str:
    items = [(name, load_sample(name)) for name in email_templates()]
    return render_template("dev/mail_index.html", items=items)


@previews.get("/<path:name>")
def preview(name: str) -> str:
    return render_template("dev/mail_preview.html", preview=build_preview(_preview_name(name)))


@previews.get("/<path:name>.html")
def preview_html(name: str) -> Response:
    """The rendered html alone, for the sandboxed iframe."""
    result = build_preview(_preview_name(name))
    if result.html is None:
        abort(404)
    return _mail_html_response(result.html)


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
