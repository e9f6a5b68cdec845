"""/dev/mail shows the whole message shape (issue 15): cc, bcc (envelope only), reply-to,
extra headers, attachments (names, types, sizes, inline Content-IDs) and the template's
languages, from a sample that carries them; the iframe resolves `cid:` images."""

from __future__ import annotations

import base64
import html
import json
import re

import pytest
from flask import Flask
from redis import Redis

from app import PROJECT_ROOT, create_app

SAMPLE = json.loads((PROJECT_ROOT / "templates/email/invoice.preview.json").read_text())


@pytest.fixture
def debug_app(env: dict[str, str]) -> Flask:
    return create_app({"TESTING": True, "DEBUG": True})


def _block(body: str, element_id: str) -> str:
    found = re.search(rf'id="{element_id}"[^>]*>(.*?)</(?:dd|pre|table)>', body, re.S)
    assert found, f"no #{element_id} on the page"
    return html.unescape(found.group(1))


def test_the_invoice_preview_shows_cc_reply_to_headers_and_attachments(
    debug_app: Flask, redis_client: Redis
) -> None:
    body = debug_app.test_client().get("/dev/mail/invoice").get_data(as_text=True)
    assert "Carl Example <carl@example.com>" in _block(body, "cc")
    assert "accounting@example.com" in _block(body, "bcc")
    assert "envelope only" in _block(body, "bcc")
    assert "Billing <billing@example.com>" in _block(body, "reply-to")
    assert "X-Invoice-Number: INV-2030-0042" in _block(body, "extra-headers")
    table = _block(body, "attachments-table")
    pdf = base64.b64decode(SAMPLE["attachments"][0]["content"])
    assert "INV-2030-0042.pdf" in table and "application/pdf" in table
    assert f"{len(pdf):,} bytes" in table
    assert "cid:logo@example.com" in table and "inline" in table
    assert "text/calendar; method=REQUEST; charset=utf-8" in table
    headers = _block(body, "headers-block")
    assert "Cc: Carl Example <carl@example.com>" in headers
    assert "Reply-To: Billing <billing@example.com>" in headers
    assert "X-Invoice-Number: INV-2030-0042" in headers
    assert "accounting@example.com" not in headers  # bcc: in no header
    assert "Content-Type: multipart/mixed" in headers
    assert "multipart/related" in body  # the MIME line: html with its inline logo
    assert redis_client.dbsize() == 0  # a preview writes nothing, attachments neither


def test_the_iframe_html_resolves_cid_images_as_data_uris(debug_app: Flask) -> None:
    response = debug_app.test_client().get("/dev/mail/invoice.html")
    assert response.status_code == 200
    assert "img-src" in response.headers["Content-Security-Policy"]
    page = response.get_data(as_text=True)
    logo = SAMPLE["attachments"][1]["content"]
    assert f'src="data:image/png;base64,{logo}"' in page
    assert "cid:" not in page


def test_a_localized_template_lists_its_languages_and_previews_each(debug_app: Flask) -> None:
    client = debug_app.test_client()
    default = client.get("/dev/mail/test").get_data(as_text=True)
    languages = _block(default, "locales")
    assert "default" in languages and 'href="/dev/mail/test?locale=de"' in default
    german = client.get("/dev/mail/test?locale=de").get_data(as_text=True)
    assert "Hallo ann@example.com" in _block(german, "text-part")
    assert 'src="/dev/mail/test.html?locale=de"' in german
    frame = client.get("/dev/mail/test.html?locale=de").get_data(as_text=True)
    assert "Es funktioniert" in frame
    digest = client.get("/dev/mail/digest?locale=de").get_data(as_text=True)
    assert "Ihre tägliche Übersicht" in html.unescape(digest)


def test_a_hostile_locale_is_shown_as_refused(
    debug_app: Flask,
) -> None:
    page = debug_app.test_client().get("/dev/mail/test?locale=../etc").get_data(as_text=True)
    assert "send_email would refuse this sample" in page and "locale" in page
