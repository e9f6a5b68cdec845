"""Rendering: `render_email`, the one template helper, and the CSS inlining its html
goes through.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import css_inline
from flask import render_template
from jinja2 import TemplateNotFound


@dataclass
class RenderedEmail:
    text: str
    html: str | None


def render_email(template: str, **context: Any) -> RenderedEmail:
    """Render `email/<template>.txt` and, if present, `.html` (the one template helper).

    The html comes out with its `<style>` rules inlined (see `inline_css`), so
    transactional mail, digests and previews all look alike in every client.
    Needs an app context, not a request: links come out absolute from PUBLIC_URL.
    """
    text = render_template(f"email/{template}.txt", **context)
    try:
        html: str | None = render_template(f"email/{template}.html", **context)
    except TemplateNotFound:
        html = None
    return RenderedEmail(text=text, html=inline_css(html) if html is not None else None)


def inline_css(html: str) -> str:
    """Move `<style>` rules into `style=""` attributes: many mail clients (Gmail's
    apps, Outlook) drop or ignore `<style>` blocks. @media and other at-rules stay
    in a `<style>` block for the clients that honour them. `<link>` stylesheets are
    dropped, never fetched: rendering must not depend on (or leak to) the network."""
    return _inliner().inline(html)


@functools.cache
def _inliner() -> css_inline.CSSInliner:
    # Built once per process: it holds the (immutable) options only, and is thread-safe.
    return css_inline.CSSInliner(
        load_remote_stylesheets=False,
        keep_link_tags=False,
        keep_style_tags=False,
        keep_at_rules=True,
    )
