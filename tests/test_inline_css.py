"""CSS inlining in the one html rendering path: delivered html carries its styles inline."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from flask import Flask

from app.mail import inline_css, render_email, send_email
from app.mail import rendering as mail
from tests.servers import SMTPServer


class _CountingHandler(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        body = b"p { color: red; }"
        self.send_response(200)
        self.send_header("Content-Type", "text/css")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stylesheet_server() -> Iterator[tuple[str, list[str]]]:
    """An HTTP server that would serve any stylesheet, and records every request."""
    _CountingHandler.hits = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CountingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _CountingHandler.hits
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_layout_styles_are_inlined_and_the_style_block_is_gone(app_ctx: Flask) -> None:
    rendered = render_email("test", address="Ann")
    assert rendered.html is not None
    assert "<style" not in rendered.html
    assert '<p style="font-size: 15px;line-height: 1.5;margin: 0 0 12px;">Hello Ann,</p>' in (
        rendered.html
    )
    assert '<div class="container" style="max-width: 600px;' in rendered.html
    assert "Hello Ann," in rendered.text


def test_at_rules_stay_in_a_style_block_for_clients_that_honour_them() -> None:
    html = (
        "<html><head><style>p { color: #111; } "
        "@media (max-width: 600px) { p { font-size: 18px; } }</style></head>"
        "<body><p>x</p></body></html>"
    )
    out = inline_css(html)
    assert '<p style="color: #111;">x</p>' in out
    assert "@media (max-width: 600px)" in out


def test_remote_stylesheets_are_never_fetched(stylesheet_server: tuple[str, list[str]]) -> None:
    base, hits = stylesheet_server
    html = (
        f'<html><head><link rel="stylesheet" href="{base}/link.css">'
        f'<style>@import url("{base}/import.css"); h1 {{ margin: 0; }}</style></head>'
        "<body><h1>x</h1><p>y</p></body></html>"
    )
    out = inline_css(html)
    assert '<h1 style="margin: 0;">x</h1>' in out
    assert "<link" not in out and "color: red" not in out
    assert hits == []


def test_the_inliner_is_built_once() -> None:
    assert mail._inliner() is mail._inliner()


def test_delivered_html_is_inlined_and_text_part_is_present(
    app_ctx: Flask, smtp_server: SMTPServer, work: Any
) -> None:
    send_email("ann@example.com", "Styled", "test", address="Ann")
    work()
    [received] = smtp_server.wait_for(1)
    assert [p.get_content_type() for p in received.message.walk()] == [
        "multipart/alternative",
        "text/plain",
        "text/html",
    ]
    html = received.part("text/html")
    assert "<style" not in html
    assert '<h1 style="font-size: 20px;margin: 0 0 16px;">It works</h1>' in html
    assert "Hello Ann," in received.part("text/plain")
