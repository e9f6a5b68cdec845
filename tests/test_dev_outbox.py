"""/dev/outbox: the dev SMTP sink's messages, newest first; nothing outside its folder."""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from app import create_app
from tests.conftest import API_TOKEN


@pytest.fixture
def debug_app(outbox: Path) -> Flask:
    return create_app({"TESTING": True, "DEBUG": True})


def test_not_served_without_mail_dev_outbox(env: dict[str, str]) -> None:
    client = create_app({"TESTING": True, "DEBUG": True}).test_client()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    assert client.get("/dev/outbox/", headers=auth).status_code == 404
    assert client.get("/dev/outbox/x.eml", headers=auth).status_code == 404


def test_lists_messages_newest_first(
    debug_app: Flask, outbox: Path, deliver_to_outbox: Any
) -> None:
    deliver_to_outbox(debug_app, ["First", "Second", "Third"])
    body = debug_app.test_client().get("/dev/outbox/").get_data(as_text=True)
    subjects = re.findall(r'<a href="/dev/outbox/[^"]+">([^<]+)</a>', body)
    assert subjects == ["[Example] Third", "[Example] Second", "[Example] First"]
    assert str(outbox) in body
    assert "Example App &lt;noreply@example.com&gt;" in body


def test_message_shows_html_iframe_text_and_source(
    debug_app: Flask, deliver_to_outbox: Any
) -> None:
    [path] = deliver_to_outbox(debug_app, ["Hello"])
    client = debug_app.test_client()
    page = client.get(f"/dev/outbox/{path.name}")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert f'sandbox src="/dev/outbox/{path.name}/html"' in body
    text = re.search(r'<pre id="text-part">(.*?)</pre>', body, re.S)
    assert text and "Hello Ann," in text.group(1)
    source = re.search(r'<pre id="source-block">(.*?)</pre>', body, re.S)
    assert source and html.unescape(source.group(1)) == path.read_bytes().decode()

    frame = client.get(f"/dev/outbox/{path.name}/html")
    assert frame.status_code == 200 and frame.mimetype == "text/html"
    assert frame.headers["Content-Security-Policy"].startswith("sandbox;")
    assert '<p style="font-size: 15px;' in frame.get_data(as_text=True)  # inlined when sent

    raw = client.get(f"/dev/outbox/{path.name}/source")
    assert raw.mimetype == "text/plain" and raw.data == path.read_bytes()


def test_text_only_message_has_no_iframe(debug_app: Flask, outbox: Path) -> None:
    (outbox / "plain.eml").write_bytes(
        b"From: a@example.com\r\nTo: b@example.com\r\nSubject: Plain\r\n\r\nJust text.\r\n"
    )
    client = debug_app.test_client()
    body = client.get("/dev/outbox/plain.eml").get_data(as_text=True)
    assert "This message has no HTML part." in body and "<iframe" not in body
    assert "Just text." in body
    assert client.get("/dev/outbox/plain.eml/html").status_code == 404


@pytest.mark.parametrize(
    "name",
    [
        "..%2F..%2Fetc%2Fpasswd",
        "..%2Foutside.eml",
        "%2E%2E%2Foutside.eml",
        ".hidden.eml",
        "notes.txt",
        "missing.eml",
        "folder.eml",
        "link.eml",
        "x%00.eml",
    ],
)
def test_only_plain_eml_files_inside_the_folder_are_served(
    debug_app: Flask, outbox: Path, name: str
) -> None:
    (outbox.parent / "outside.eml").write_bytes(b"Subject: secret\r\n\r\nsecret")
    (outbox / "notes.txt").write_bytes(b"Subject: notes\r\n\r\nnotes")
    (outbox / ".hidden.eml").write_bytes(b"Subject: hidden\r\n\r\nhidden")
    (outbox / "folder.eml").mkdir()
    (outbox / "link.eml").symlink_to(outbox.parent / "outside.eml")
    client = debug_app.test_client()
    for suffix in ("", "/html", "/source"):
        response = client.get(f"/dev/outbox/{name}{suffix}")
        assert response.status_code == 404, (name, suffix)
        assert b"secret" not in response.data
    listing = client.get("/dev/outbox/").get_data(as_text=True)
    assert "No messages yet" in listing  # none of those files is listed either


def test_missing_folder_is_an_empty_outbox(
    env: dict[str, str], tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setenv("MAIL_DEV_OUTBOX", str(tmp_path / "not-yet"))
    client = create_app({"TESTING": True, "DEBUG": True}).test_client()
    page = client.get("/dev/outbox/")
    assert page.status_code == 200 and "No messages yet" in page.get_data(as_text=True)


def test_listing_is_capped_to_the_newest(
    debug_app: Flask, outbox: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("app.dev.OUTBOX_LIMIT", 2)
    for index in range(3):
        path = outbox / f"m{index}.eml"
        path.write_bytes(f"Subject: number {index}\r\n\r\nbody".encode())
        os.utime(path, ns=(10**18 + index, 10**18 + index))
    body = debug_app.test_client().get("/dev/outbox/").get_data(as_text=True)
    assert "the newest 2 of 3" in body
    assert "number 2" in body and "number 1" in body and "number 0" not in body


def test_outbox_needs_the_token_outside_debug_mode(outbox: Path) -> None:
    (outbox / "a.eml").write_bytes(b"Subject: a\r\n\r\nbody")
    client = create_app({"TESTING": True}).test_client()
    for path in (
        "/dev/outbox/",
        "/dev/outbox/a.eml",
        "/dev/outbox/a.eml/html",
        "/dev/outbox/a.eml/source",
    ):
        assert client.get(path).status_code == 401
        assert client.get(path, headers={"Authorization": f"Bearer {API_TOKEN}"}).status_code in (
            200,
            404,  # a.eml has no html part
        )


def test_outbox_without_previews(outbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAIL_PREVIEWS", "false")
    client = create_app({"TESTING": True, "DEBUG": True}).test_client()
    assert client.get("/dev/mail/").status_code == 404
    assert client.get("/dev/").headers["Location"] == "/dev/outbox/"
    page = client.get("/dev/outbox/").get_data(as_text=True)
    assert "Mail previews" not in page and ">Outbox</a>" in page
