"""The browser sign-in shared by the /dev/ and /ops/ pages.

One rule for both: open in debug mode, else only a holder of API_TOKEN, sent as a
bearer header (scripts) or typed once into `/<area>/login` (browsers), which sets a
cookie for `/<area>/` only, derived from the token and SECRET_KEY (changing either
signs everyone out). The token is never taken from a URL: access logs record those.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from urllib.parse import urlsplit

from flask import Response, current_app, redirect, render_template, request, url_for

from app.api import bearer_token, token_matches

COOKIE_MAX_AGE = 12 * 3600


@dataclass(frozen=True)
class SignIn:
    """The sign-in of one area: `area` is its blueprint name and URL prefix."""

    area: str
    cookie: str
    cookie_label: str  # what the cookie's HMAC is over, with the token

    @property
    def path(self) -> str:
        """The area's URL prefix: where the cookie is sent and `?next=` may point."""
        return f"/{self.area}/"

    def derived(self, label: str) -> str:
        """A value only the server can make: HMAC(SECRET_KEY, label:API_TOKEN)."""
        token = current_app.config.get("API_TOKEN") or ""
        key = str(current_app.config["SECRET_KEY"]).encode()
        return hmac.new(key, label.encode() + b":" + token.encode(), hashlib.sha256).hexdigest()

    def allowed(self) -> bool:
        """Debug mode, the bearer token, or the sign-in cookie."""
        return current_app.debug or token_matches(bearer_token()) or self._cookie_ok()

    def _cookie_ok(self) -> bool:
        supplied = request.cookies.get(self.cookie, "")
        if not current_app.config.get("API_TOKEN") or not supplied:
            return False
        return hmac.compare_digest(supplied.encode(), self.derived(self.cookie_label).encode())

    def safe_next(self, target: str | None) -> str:
        """Only a local path of this area: the sign-in must not redirect anywhere else."""
        target = target or ""
        parts = urlsplit(target)
        if parts.scheme or parts.netloc or "\\" in target or not parts.path.startswith(self.path):
            return url_for(f"{self.area}.index")
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def page(self, status: int, error: str = "") -> Response:
        """The token form; after it, back to the page that asked (or to `?next=`)."""
        at_login = request.endpoint == f"{self.area}.login"
        wanted = request.values.get("next") if at_login else request.full_path
        body = render_template(
            f"{self.area}/login.html",
            next=self.safe_next(wanted),
            error=error,
            enabled=bool(current_app.config.get("API_TOKEN")),
        )
        return Response(body, status=status, content_type="text/html; charset=utf-8")

    def login(self) -> Response:
        """The login view: the token in a POST body, then the cookie and back."""
        if request.method == "GET":
            return self.page(200)
        if not token_matches(request.form.get("token", "").strip()):
            return self.page(401, "That is not the API token.")
        response: Response = redirect(self.safe_next(request.form.get("next")))  # type: ignore[assignment]
        response.set_cookie(
            self.cookie,
            self.derived(self.cookie_label),
            max_age=COOKIE_MAX_AGE,
            path=self.path,
            httponly=True,
            samesite="Lax",
            secure=request.is_secure,
        )
        return response
