"""Unsubscribe tokens: signed with SECRET_KEY; digest mails carry them in headers and
the web blueprint (app/unsubscribe.py) reads them.
"""

from __future__ import annotations

from flask import current_app, url_for
from itsdangerous import BadSignature, URLSafeSerializer

UNSUBSCRIBE_SALT = "mailqueue.digest.unsubscribe"


def _signer() -> URLSafeSerializer:
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt=UNSUBSCRIBE_SALT)


def unsubscribe_token(email: str) -> str:
    """A token naming the subscriber, signed with SECRET_KEY (HMAC): it cannot be forged
    or edited into another subscriber's without the key."""
    return str(_signer().dumps(email))


def read_unsubscribe_token(token: str) -> str | None:
    """The subscriber a token names, or None for anything not signed by us."""
    if not isinstance(token, str) or len(token) > 1024:
        return None
    try:
        email = _signer().loads(token)
    except BadSignature:
        return None
    return email if isinstance(email, str) and email else None


def unsubscribe_url(email: str) -> str:
    """PUBLIC_URL/unsubscribe/TOKEN (needs an app context, not a request)."""
    return url_for("unsubscribe.page", token=unsubscribe_token(email), _external=True)
