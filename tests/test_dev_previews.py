"""/dev/mail: who may see it, what it lists, and that it shows what a worker would send."""

from __future__ import annotations

import html
import json
import re
from typing import Any

import pytest
from flask import Flask
from redis import Redis

from app import PROJECT_ROOT, create_app, digests
from app.mail import send_email
from tests.conftest import API_TOKEN
from tests.servers import SMTPServer


@pytest.fixture
def debug_app(env: dict[str, str]) -> Flask:
    return create_app({"TESTING": True, "DEBUG": True})


def test_index_lists_templates_but_not_layout_partials(debug_app: Flask) -> None:
    page = debug_app.test_client().get("/dev/mail/")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert 'href="/dev/mail/test"' in body
    assert "_layout" not in body
    assert "test.preview.json" in body


def test_preview_shows_html_iframe_text_and_the_headers_that_would_be_sent(
    debug_app: Flask, redis_client: Redis
) -> None:
    page = debug_app.test_client().get("/dev/mail/test")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert '<iframe class="mail"' in body and 'sandbox src="/dev/mail/test.html"' in body
    text = re.search(r'<pre id="text-part">(.*?)</pre>', body, re.S)
    assert text and "Hello ann@example.com," in text.group(1)
    headers = re.search(r'<pre id="headers-block">(.*?)</pre>', body, re.S)
    assert headers is not None
    block = headers.group(1)
    assert "Subject: [Example] Test message" in block  # the real subject prefix
    assert "From: Example App &lt;noreply@example.com&gt;" in block
    assert "To: Ann Example &lt;ann@example.com&gt;" in block
    assert re.search(r"Message-ID: &lt;[0-9a-f]{32}@example.com&gt;", block)
    assert "Content-Type: multipart/alternative" in block
    # A throw-away record: previews never write to Redis.
    assert redis_client.dbsize() == 0


def test_preview_html_is_sandboxed_and_has_css_inlined(debug_app: Flask) -> None:
    response = debug_app.test_client().get("/dev/mail/test.html")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    csp = response.headers["Content-Security-Policy"]
    assert csp.startswith("sandbox;") and "default-src 'none'" in csp
    body = response.get_data(as_text=True)
    assert '<p style="font-size: 15px;' in body
    assert "Hello ann@example.com," in body


def test_preview_headers_match_a_delivered_message(
    debug_app: Flask, smtp_server: SMTPServer, work: Any
) -> None:
    body = debug_app.test_client().get("/dev/mail/test").get_data(as_text=True)
    block = re.search(r'<pre id="headers-block">(.*?)</pre>', body, re.S)
    assert block is not None
    preview_names = re.findall(r"^([A-Za-z-]+):", block.group(1), re.M)
    with debug_app.app_context():
        send_email("Ann Example <ann@example.com>", "Test message", "test", address="a")
    work()
    [received] = smtp_server.wait_for(1)
    assert preview_names == list(received.message.keys())


def test_flask_debug_environment_opens_the_pages(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASK_DEBUG", "1")
    app = create_app({"TESTING": True})
    assert app.test_client().get("/dev/mail/").status_code == 200


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({}, "", 401),
        ({"Authorization": "Bearer wrong"}, "", 401),
        ({"Authorization": f"Bearer {API_TOKEN}"}, "", 200),
        ({"Authorization": f"Basic {API_TOKEN}"}, "", 401),
        # Never in a URL: access logs keep query strings.
        ({}, f"?token={API_TOKEN}", 401),
    ],
)
def test_outside_debug_mode_the_api_token_is_required(
    client: Any, headers: dict[str, str], query: str, expected: int
) -> None:
    for path in ("/dev/mail/", "/dev/mail/test", "/dev/mail/test.html"):
        response = client.get(path + query, headers=headers)
        assert response.status_code == expected, path
    if expected == 401:
        assert 'name="token"' in response.get_data(as_text=True)  # the login form


def test_login_form_sets_a_cookie_that_opens_the_pages(client: Any) -> None:
    wrong = client.post("/dev/login", data={"token": "nope", "next": "/dev/mail/test"})
    assert wrong.status_code == 401
    assert "not the API token" in wrong.get_data(as_text=True)
    assert client.get("/dev/mail/test").status_code == 401

    response = client.post("/dev/login", data={"token": API_TOKEN, "next": "/dev/mail/test"})
    assert response.status_code == 302
    assert response.headers["Location"] == "/dev/mail/test"
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Path=/dev/" in cookie
    assert API_TOKEN not in cookie
    assert client.get("/dev/mail/test").status_code == 200
    assert client.get("/dev/mail/test.html").status_code == 200


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/dev/", "/api/mail", "/\\evil.example"]
)
def test_login_only_redirects_to_dev_pages(client: Any, target: str) -> None:
    response = client.post("/dev/login", data={"token": API_TOKEN, "next": target})
    assert response.status_code == 302
    assert response.headers["Location"] == "/dev/"


def test_cookie_stops_working_when_the_token_changes(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = create_app({"TESTING": True}).test_client()
    first.post("/dev/login", data={"token": API_TOKEN})
    [cookie] = [c for c in first._cookies.values() if c.key == "mailqueue_dev"]
    monkeypatch.setenv("API_TOKEN", "a-new-token")
    second = create_app({"TESTING": True}).test_client()
    second.set_cookie("mailqueue_dev", cookie.value, domain=cookie.domain, path="/dev/")
    assert first.get("/dev/mail/").status_code == 200
    assert second.get("/dev/mail/").status_code == 401


def test_without_api_token_or_debug_the_pages_are_closed(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("API_TOKEN")
    client = create_app({"TESTING": True}).test_client()
    page = client.get("/dev/mail/")
    assert page.status_code == 401
    assert "API_TOKEN</code> is not set" in page.get_data(as_text=True)
    assert client.post("/dev/login", data={"token": ""}).status_code == 401
    assert client.get("/dev/mail/", headers={"Authorization": "Bearer "}).status_code == 401


@pytest.mark.parametrize("value", ["false", "0", "no"])
def test_mail_previews_false_removes_the_pages(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MAIL_PREVIEWS", value)
    client = create_app({"TESTING": True, "DEBUG": True}).test_client()
    auth = {"Authorization": f"Bearer {API_TOKEN}"}
    for path in ("/dev/mail/", "/dev/mail/test", "/dev/mail/test.html", "/dev/", "/dev/login"):
        assert client.get(path, headers=auth).status_code == 404, path


@pytest.mark.parametrize(
    "path", ["/dev/mail/nope", "/dev/mail/_layout", "/dev/mail/../api", "/dev/mail/TEST"]
)
def test_unknown_templates_are_404(debug_app: Flask, path: str) -> None:
    assert debug_app.test_client().get(path).status_code == 404


def test_template_without_sample_is_listed_with_a_note_and_still_rendered(
    debug_app: Flask, extra_templates: Any
) -> None:
    extra_templates(debug_app, {"email/nosample.txt": "Hi {{ name }}!"})
    client = debug_app.test_client()
    index = client.get("/dev/mail/").get_data(as_text=True)
    assert "/dev/mail/nosample" in index
    assert "No sample context: add templates/email/nosample.preview.json" in index
    page = client.get("/dev/mail/nosample")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert "No sample context" in body
    assert '<pre id="text-part">Hi !</pre>' in body
    assert "no <code>.html</code>: the mail is sent as plain text only" in body
    assert "<iframe" not in body
    assert client.get("/dev/mail/nosample.html").status_code == 404


@pytest.mark.parametrize(
    ("sample", "note"),
    [
        ('{"context": {', "is not valid JSON: Expecting"),
        ("[1, 2]", "must be a JSON object"),
        ('{"name": "Ann"}', "unknown key 'name'"),
        ('{"context": []}', "context must be a JSON object"),
        ('{"subject": 3}', "subject must be a string"),
        ('{"to": 3}', "to must be an address"),
        ('{"headers": {"X-A": 1}}', "headers must map names to strings"),
    ],
)
def test_broken_sample_is_a_clear_note_not_a_crash(
    debug_app: Flask, extra_templates: Any, sample: str, note: str
) -> None:
    extra_templates(
        debug_app, {"email/broken.txt": "Hi {{ name }}", "email/broken.preview.json": sample}
    )
    client = debug_app.test_client()
    index = client.get("/dev/mail/")
    assert index.status_code == 200 and note in html.unescape(index.get_data(as_text=True))
    page = client.get("/dev/mail/broken")
    assert page.status_code == 200
    body = page.get_data(as_text=True)
    assert note in html.unescape(body)
    assert "text-part" not in body  # nothing rendered from a broken sample


@pytest.mark.parametrize(
    ("files", "error"),
    [
        (
            {"email/bad.txt": "Hi {% if %}", "email/bad.preview.json": "{}"},
            "Rendering failed: TemplateSyntaxError",
        ),
        (
            {"email/bad.txt": "x", "email/bad.preview.json": '{"to": "not an address"}'},
            "send_email would refuse this sample: to:",
        ),
        ({"email/bad.html": "<p>html only</p>"}, "templates/email/bad.txt is missing"),
    ],
)
def test_template_errors_are_shown_on_the_page(
    debug_app: Flask, extra_templates: Any, files: dict[str, str], error: str
) -> None:
    extra_templates(debug_app, files)
    page = debug_app.test_client().get("/dev/mail/bad")
    assert page.status_code == 200
    assert error in html.unescape(page.get_data(as_text=True))


def test_templates_in_subfolders_are_previewed(debug_app: Flask, extra_templates: Any) -> None:
    extra_templates(
        debug_app,
        {
            "email/account/welcome.txt": "Welcome {{ name }}",
            "email/account/welcome.html": '{% extends "email/_layout.html" %}'
            "{% block content %}<p>Welcome {{ name }}</p>{% endblock %}",
            "email/account/welcome.preview.json": '{"context": {"name": "Ann"}}',
            "email/account/_partial.html": "<p>partial</p>",
        },
    )
    client = debug_app.test_client()
    index = client.get("/dev/mail/").get_data(as_text=True)
    assert "/dev/mail/account/welcome" in index and "_partial" not in index
    assert "Welcome Ann" in client.get("/dev/mail/account/welcome").get_data(as_text=True)
    raw = client.get("/dev/mail/account/welcome.html").get_data(as_text=True)
    assert '<p style="font-size: 15px;' in raw and "Welcome Ann" in raw


def test_login_page_and_dev_index(client: Any) -> None:
    page = client.get("/dev/login?next=/dev/mail/test")
    assert page.status_code == 200
    assert 'name="next" value="/dev/mail/test"' in page.get_data(as_text=True)
    assert client.get("/dev/").headers["Location"] == "/dev/mail/"


def test_digest_is_previewed_with_sample_items_and_its_list_headers(debug_app: Flask) -> None:
    client = debug_app.test_client()
    assert 'href="/dev/mail/digest"' in client.get("/dev/mail/").get_data(as_text=True)
    body = html.unescape(client.get("/dev/mail/digest").get_data(as_text=True))
    assert "Subject: [Example] Your daily digest: 4 new items" in body
    assert "List-Unsubscribe: <https://mail.example.com/unsubscribe/preview-token>" in body
    assert "List-Unsubscribe-Post: List-Unsubscribe=One-Click" in body
    text = re.search(r'<pre id="text-part">(.*?)</pre>', body, re.S)
    assert text is not None
    assert text.group(1).index("Comment") < text.group(1).index("Update")
    assert "* Bob replied to your post (Tue 15 Jan, 07:41)" in text.group(1)
    frame = client.get("/dev/mail/digest.html").get_data(as_text=True)
    assert 'style="color: #2563eb;">Release 2.3 is out</a>' in frame
    assert "Faster digests &amp; &lt;safer&gt; unsubscribe links." in frame


def test_digest_sample_has_the_shape_the_digest_job_renders(app_ctx: Flask) -> None:
    """The sample context must keep up with app.digests.digest_context."""
    sample = json.loads((PROJECT_ROOT / "templates/email/digest.preview.json").read_text())
    digests.upsert_subscriber("ann@example.com", "Europe/Paris", "daily")
    digests.add_item("ann@example.com", "A", url="https://example.com/a", body="b", kind="x")
    subscriber = digests.get_subscriber("ann@example.com")
    assert subscriber is not None
    item = {"title": "A", "url": "", "body": "", "kind": "x", "at": "2030-01-15T07:41:00+00:00"}
    real = digests.digest_context(subscriber, "2030-01-15", [item])
    context = sample["context"]
    assert set(context) == set(real)
    assert set(context["groups"][0]) == set(real["groups"][0])
    entry_keys = set(real["groups"][0]["entries"][0]) - {"at", "order"}  # not JSON; unused
    assert all(set(e) == entry_keys for g in context["groups"] for e in g["entries"])
    assert set(sample["headers"]) == set(digests.digest_headers("ann@example.com"))
