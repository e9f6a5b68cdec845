"""/ops/ as a person sees it in headless Chromium, at a phone's width and a desk's.

The app runs in debug mode (open, as the /dev/ pages are on a developer machine) on a
real HTTP server; tests/test_ops.py covers the sign-in. Screenshots go to
test-artifacts/ for a human to look at.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app import PROJECT_ROOT, create_app, deliverability, suppression
from app.mail import send_email
from tests.test_dev_browser import CHROMIUM, Browser, LiveServer, _need_chromium

__all__ = ["_need_chromium"]  # the autouse fixture: skip or fail without chromium

ARTIFACTS = PROJECT_ROOT / "test-artifacts"


class PhoneBrowser(Browser):
    def screenshot_at(self, url: str, name: str, size: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        path.unlink(missing_ok=True)
        self._run(url, f"--screenshot={path}", f"--window-size={size}")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "no screenshot written"
        assert path.stat().st_size > 5_000, "screenshot suspiciously small (blank page?)"
        return path

    def dom_at(self, url: str, size: str) -> str:
        return self._run(url, "--dump-dom", f"--window-size={size}")


@pytest.fixture
def browser(tmp_path: Path) -> PhoneBrowser:
    assert CHROMIUM is not None
    return PhoneBrowser(tmp_path / "chromium-profile")


@pytest.fixture
def live(env: dict[str, str]) -> Iterator[Any]:
    app = create_app({"TESTING": True, "DEBUG": True})
    with LiveServer(app) as server:
        server.app = app  # type: ignore[attr-defined]
        yield server


PHONE = "390,844"
DESK = "1200,900"


def test_ops_pages_in_chromium_on_a_phone(live: Any, browser: PhoneBrowser) -> None:
    with live.app.app_context():
        ids = [
            send_email("ann@example.com", f"Receipt {n}", "test", address="x").id for n in range(3)
        ]
        deliverability.suppress("ann@example.com", suppression.COMPLAINT, "ses", "abuse report")
        deliverability.suppress("bob@example.com", suppression.HARD_BOUNCE, "smtp", "550 5.1.1")

    index = browser.dom_at(f"{live.url}/ops/", PHONE)
    assert 'name="q"' in index and "<code>mail</code>" in index  # search box, queue depths
    assert re.search(r"<td><code>mail</code></td><td>3</td>", index)

    page = browser.dom_at(f"{live.url}/ops/?q=ann@example.com", PHONE)  # follows the redirect
    assert "<h1>ann@example.com</h1>" in page
    assert "complaint from ses" in page and "Remove from the list" in page
    assert [m for m in re.findall(r'href="/ops/mail/([0-9a-f]{32})"', page)] == ids[::-1]

    mail = browser.dom_at(f"{live.url}/ops/mail/{ids[0]}", PHONE)
    assert "Receipt 0" in mail and "queued" in mail and "attempts" in mail

    listing = browser.dom_at(f"{live.url}/ops/suppressions", PHONE)
    assert listing.count('class="card entry"') == 2 and 'name="email"' in listing

    browser.screenshot_at(f"{live.url}/ops/", "ops-index-phone", PHONE)
    browser.screenshot_at(f"{live.url}/ops/address/ann@example.com", "ops-address-phone", PHONE)
    browser.screenshot_at(f"{live.url}/ops/suppressions", "ops-suppressions-phone", PHONE)
    browser.screenshot_at(f"{live.url}/ops/mail/{ids[0]}", "ops-mail-desk", DESK)


def test_the_sign_in_form_in_chromium(env: dict[str, str], browser: PhoneBrowser) -> None:
    app = create_app({"TESTING": True})  # not debug: closed
    with LiveServer(app) as server:
        page = browser.dom_at(f"{server.url}/ops/suppressions", PHONE)
        assert 'type="password"' in page and 'value="/ops/suppressions"' in page
        assert "Suppression list" not in page
