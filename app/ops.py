"""The operator page, /ops/: support's "did ann@example.com get her mail?" in a browser.

Search an address (its latest mails and its suppression) or a mail id (its record,
attempts, provider events and error, with a re-send for a failed mail); the
suppression list with add and remove; the queue depths. Built for a phone as much as
a desk: one column, big touch targets.

Who may see it: the same rule and the same sign-in as the /dev/ pages (app/signin.py):
open in debug mode, else only a holder of API_TOKEN, sent as a bearer header (scripts)
or typed once into /ops/login (a cookie derived from the token and SECRET_KEY, for
/ops/ only). Never a token in a URL. The page changes things (re-send, suppress,
unsuppress), so every form also carries a token derived from the sign-in (and the
cookie is SameSite=Lax): another site cannot make a signed-in browser post to it.
"""

from __future__ import annotations

import hmac
from typing import Any

import redis.exceptions
from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)

from app import deliverability, digests, maillog, status, suppression
from app.api import MAIL_ID
from app.errors import InvalidMailError, MailNotFailedError, UnknownMailError
from app.mail import requeue_failed
from app.queues import QUEUE_NAMES, SIZE_NAMES, get_queue, get_redis, queue_sizes
from app.signin import SignIn

ops = Blueprint("ops", __name__, url_prefix="/ops")

PAGE = 50
SIGN_IN = SignIn("ops", cookie="mailqueue_ops", cookie_label="mailqueue-ops-page")


# --- access ------------------------------------------------------------------------------


def form_token() -> str:
    """What every form posts back: derived from the sign-in, unknown to another site."""
    return SIGN_IN.derived("mailqueue-ops-form")


@ops.before_request
def require_access() -> Response | None:
    if request.endpoint == "ops.login":
        return None
    if not SIGN_IN.allowed():
        return SIGN_IN.page(401)
    if request.method == "POST":
        supplied = request.form.get("form_token", "")
        if not hmac.compare_digest(supplied.encode(), form_token().encode()):
            return Response("the form is stale: reload the page", 400, mimetype="text/plain")
    return None


@ops.context_processor
def _forms() -> dict[str, Any]:
    return {"form_token": form_token}


@ops.route("/login", methods=["GET", "POST"])
def login() -> Response:
    """The API token in a POST body (never in a URL), then a cookie for /ops/ only."""
    return SIGN_IN.login()


# --- pages -------------------------------------------------------------------------------


def _queue_depths() -> dict[str, dict[str, int]] | None:
    """As /healthz reports them; None while Redis does not answer."""
    try:
        queues = [get_queue(name) for name in QUEUE_NAMES]
        with get_redis().pipeline(transaction=False) as pipe:
            for queue in queues:
                queue_sizes(pipe, queue)
            sizes: list[Any] = pipe.execute()
    except redis.exceptions.RedisError:
        return None
    return {
        queue.name: dict(zip(SIZE_NAMES, sizes[4 * i : 4 * i + 4], strict=True))
        for i, queue in enumerate(queues)
    }


@ops.get("/")
def index() -> Response | str:
    """The search box (an address or a mail id) and the queue depths."""
    query = request.args.get("q", "").strip()
    if query:
        if MAIL_ID.match(query.lower()):
            return redirect(url_for("ops.mail", mail_id=query.lower()))  # type: ignore[return-value]
        try:
            address = digests.normalize_email(query)
        except InvalidMailError:
            return render_template(
                "ops/index.html", queues=_queue_depths(), query=query,
                error="Not an address or a mail id.",
            )  # fmt: skip
        return redirect(url_for("ops.address", email=address))  # type: ignore[return-value]
    return render_template("ops/index.html", queues=_queue_depths(), query="", error="")


@ops.get("/address/<address:email>")
def address(email: str) -> str:
    try:
        plain = digests.normalize_email(email)
    except InvalidMailError:
        abort(404)
    redis_client = get_redis()
    return render_template(
        "ops/address.html",
        address=plain,
        mails=[maillog.summary(record) for record in maillog.recent(redis_client, plain)],
        entry=suppression.get(redis_client, plain),
        reasons=suppression.REASONS,
    )


@ops.get("/mail/<mail_id>")
def mail(mail_id: str) -> str:
    if not MAIL_ID.match(mail_id):
        abort(404)
    redis_client = get_redis()
    record = status.load(redis_client, mail_id)
    if record is None:
        abort(404)
    return render_template(
        "ops/mail.html",
        record=record,
        events=maillog.events(redis_client, mail_id),
        can_resend=record.status == status.FAILED and record.kind != "digest",
    )


@ops.post("/mail/<mail_id>/resend")
def resend(mail_id: str) -> Response:
    """Re-queue a failed mail: same id and Message-ID (what `flask mail retry` does)."""
    if not MAIL_ID.match(mail_id):
        abort(404)
    try:
        record = requeue_failed(mail_id)
        if record.status == status.SUPPRESSED:
            flash("Not sent: every recipient is suppressed now.")
        else:
            flash("Queued again.")
    except (UnknownMailError, MailNotFailedError) as err:
        flash(f"Not re-sent: {err}")
    return redirect(url_for("ops.mail", mail_id=mail_id))  # type: ignore[return-value]


@ops.get("/suppressions")
def suppressions() -> str:
    raw = request.args.get("cursor", "0")
    cursor = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 10 else 0
    entries, total = suppression.page(get_redis(), cursor, PAGE)
    following = cursor + PAGE if cursor + PAGE < total else None
    return render_template(
        "ops/suppressions.html",
        entries=entries,
        total=total,
        cursor=cursor,
        following=following,
        reasons=suppression.REASONS,
    )


@ops.post("/suppressions")
def add_suppression() -> Response:
    """Suppress an address from the page (source `api`: the operator's own say-so)."""
    back = SIGN_IN.safe_next(request.form.get("next"))
    reason = request.form.get("reason", suppression.MANUAL)
    detail = request.form.get("detail", "")[: suppression.MAX_DETAIL]
    try:
        plain = digests.normalize_email(request.form.get("email", ""))
    except InvalidMailError as err:
        flash(f"Not suppressed: {str(err).removeprefix('email: ')}")
        return redirect(back)  # type: ignore[return-value]
    if reason not in suppression.REASONS:
        flash("Not suppressed: pick a reason.")
        return redirect(back)  # type: ignore[return-value]
    deliverability.suppress(plain, reason, "api", detail)
    flash(f"Suppressed {plain}.")
    return redirect(back)  # type: ignore[return-value]


@ops.post("/suppressions/remove")
def remove_suppression() -> Response:
    back = SIGN_IN.safe_next(request.form.get("next"))
    given = request.form.get("email", "")
    if suppression.remove(get_redis(), given):
        flash(f"{suppression.normalize(given)} may be mailed again.")
    else:
        flash(f"{given[:100]} was not suppressed.")
    return redirect(back)  # type: ignore[return-value]


def init_app(app: Flask) -> None:
    app.register_blueprint(ops)
