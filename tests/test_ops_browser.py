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


@pytest.fixture
def browser(tmp_path: Path) -> Browser:
    assert CHROMIUM is not None
    return Browser(tmp_path / "chromium-profile")


@pytest.fixture
def live(env: dict[str, str]) -> Iterator[Any]:
    app = create_app({"TESTING": True, "DEBUG": True})
    with LiveServer(app) as server:
        server.app = app  # type: ignore[attr-defined]
        yield server


PHONE = "390,844"
DESK = "1200,900"
AT_PHONE = f"--window-size={PHONE}"
SMALLEST = 5_000  # bytes: a blank page is smaller


def test_ops_pages_in_chromium_on_a_phone(live: Any, browser: Browser) -> None:
    with live.app.app_context():
        ids = [
            send_email("ann@example.com", f"Receipt {n}", "test", address="x").id for n in range(3)
        ]
        deliverability.suppress("ann@example.com", suppression.COMPLAINT, "ses", "abuse report")
        deliverability.suppress("bob@example.com", suppression.HARD_BOUNCE, "smtp", "550 5.1.1")

    index = browser.dom(f"{live.url}/ops/", AT_PHONE)
    assert 'name="q"' in index and "<code>mail</code>" in index  # search box, queue depths
    assert re.search(r"<td><code>mail</code></td><td>3</td>", index)

    page = browser.dom(f"{live.url}/ops/?q=ann@example.com", AT_PHONE)  # follows the redirect
    assert "<h1>ann@example.com</h1>" in page
    assert "complaint from ses" in page and "Remove from the list" in page
    assert [m for m in re.findall(r'href="/ops/mail/([0-9a-f]{32})"', page)] == ids[::-1]

    mail = browser.dom(f"{live.url}/ops/mail/{ids[0]}", AT_PHONE)
    assert "Receipt 0" in mail and "queued" in mail and "attempts" in mail

    listing = browser.dom(f"{live.url}/ops/suppressions", AT_PHONE)
    assert listing.count('class="card entry"') == 2 and 'name="email"' in listing

    browser.screenshot(f"{live.url}/ops/", "ops-index-phone", window=PHONE, smallest=SMALLEST)
    browser.screenshot(
        f"{live.url}/ops/address/ann@example.com",
        "ops-address-phone",
        window=PHONE,
        smallest=SMALLEST,
    )
    browser.screenshot(
        f"{live.url}/ops/suppressions", "ops-suppressions-phone", window=PHONE, smallest=SMALLEST
    )
    browser.screenshot(
        f"{live.url}/ops/mail/{ids[0]}", "ops-mail-desk", window=DESK, smallest=SMALLEST
    )


def test_the_sign_in_form_in_chromium(env: dict[str, str], browser: Browser) -> None:
    app = create_app({"TESTING": True})  # not debug: closed
    with LiveServer(app) as server:
        page = browser.dom(f"{server.url}/ops/suppressions", AT_PHONE)
        assert 'type="password"' in page and 'value="/ops/suppressions"' in page
        assert "Suppression list" not in page
