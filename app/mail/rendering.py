"""Rendering: `render_email`, the one template helper, and the CSS inlining its html
goes through.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import css_inline
from flask import current_app, render_template
from flask_babel import force_locale
from jinja2 import TemplateNotFound


@dataclass
class RenderedEmail:
    text: str
    html: str | None


def render_email(template: str, locale: str = "", **context: Any) -> RenderedEmail:
    """Render `email/<template>.txt` and, if present, `.html` (the one template helper).

    With a `locale` (`de`, `pt_BR`), `email/<template>.<locale>.txt`/`.html` are used
    where they exist (then those of its language, `.pt.`), else the plain ones, and
    everything renders under that locale with Flask-Babel (gettext, format_date).
    The html comes out with its `<style>` rules inlined (see `inline_css`), so
    transactional mail, digests and previews all look alike in every client.
    Needs an app context, not a request: links come out absolute from PUBLIC_URL.
    """
    if not locale:
        return _render(f"email/{template}", f"email/{template}", context)
    with force_locale(locale):
        return _render(
            _localized(template, locale, "txt"), _localized(template, locale, "html"), context
        )


def _render(text_name: str, html_name: str, context: dict[str, Any]) -> RenderedEmail:
    text = render_template(f"{text_name}.txt", **context)
    try:
        html: str | None = render_template(f"{html_name}.html", **context)
    except TemplateNotFound:
        html = None
    return RenderedEmail(text=text, html=inline_css(html) if html is not None else None)


def _localized(template: str, locale: str, extension: str) -> str:
    """`email/<template>.<locale>`, `.<language>` or plain: the first whose file exists."""
    names = [f"email/{template}.{locale}"]
    if "_" in locale:
        names.append(f"email/{template}.{locale.partition('_')[0]}")
    for name in names:
        try:
            current_app.jinja_env.get_template(f"{name}.{extension}")
        except TemplateNotFound:
            continue
        return name
    return f"email/{template}"


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
