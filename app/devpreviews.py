"""What a mail preview at /dev/mail shows (app/dev.py serves it): a template rendered with
its sample (`templates/email/<name>.preview.json`) through the real `prepare` and
`build_message`, so the headers, parts and attachments are what a worker would send.

A sample may carry every field a caller can (cc, bcc, reply_to, headers, attachments in
the API's JSON form, tags, metadata, locale), so a template meant for an invoice is
previewed with its PDF and its inline logo. Kept apart from the routes so that
`flask mail check-templates` (app/templatecheck.py) reads samples without the pages.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import re
from dataclasses import dataclass, field
from typing import Any

from flask import current_app
from jinja2 import TemplateNotFound

from app import status
from app.errors import InvalidMailError
from app.mail import build_message, prepare
from app.mail.attachments import split

PREVIEW_SUFFIX = ".preview.json"
DEFAULT_PREVIEW_TO = "Preview Recipient <preview@example.com>"
# The sample's keys: the message (as send_email takes it) and the template's context.
SHAPE_KEYS = ("cc", "bcc", "reply_to", "attachments", "tags", "metadata", "locale")
SAMPLE_KEYS = ("subject", "to", "context", "headers", *SHAPE_KEYS)
_LOCALE_FILE = re.compile(r"^email/(?P<name>.+)\.(?P<locale>[a-z]{2,3}(?:_[A-Za-z0-9]+)*)\.txt$")


@dataclass
class Sample:
    """The sample of one template: what a preview renders with, or why it cannot."""

    subject: str
    to: str | list[str]
    context: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    note: str = ""  # shown beside the template; set when there is no usable sample
    usable: bool = True  # false: the file exists but is broken, nothing is rendered
    shape: dict[str, Any] = field(default_factory=dict)  # cc, attachments...: as given

    def record(self, template: str, locale: str | None = None) -> status.MailRecord:
        """The (unsaved) record send_email would make of this sample, or its refusal
        (InvalidMailError); `locale` overrides the sample's ("" for none)."""
        shape = dict(self.shape)
        if locale is not None:
            shape["locale"] = locale or None
        return prepare(
            self.to,
            self.subject,
            template,
            self.context,
            headers=self.headers,
            **{k: v for k, v in shape.items() if v is not None},
        )


@dataclass
class Preview:
    name: str
    sample: Sample
    has_txt: bool
    has_html: bool
    subject: str = ""  # as sent: with MAIL_SUBJECT_PREFIX
    sender: str = ""
    to: str = ""
    cc: str = ""  # the headers as they would go out
    reply_to: str = ""
    bcc: list[str] = field(default_factory=list)  # envelope only: in no header
    extra_headers: dict[str, str] = field(default_factory=dict)
    attachments: list[dict[str, Any]] = field(default_factory=list)  # name, type, size...
    inline: dict[str, str] = field(default_factory=dict)  # Content-ID -> data: URI
    locale: str = ""
    locales: list[str] = field(default_factory=list)  # this template's languages
    text: str = ""
    html: str | None = None
    headers: str = ""
    error: str = ""
    parts: list[str] = field(default_factory=list)


def email_templates() -> list[str]:
    """Every mail template name (`email/<name>.txt` or `.html`), without `_` partials."""
    names = set()
    for path in current_app.jinja_env.list_templates(extensions=["txt", "html"]):
        if not path.startswith("email/"):
            continue
        name = path[len("email/") :].rsplit(".", 1)[0]
        # `<name>.<locale>` is a language of <name> (app.mail.render_email), not a template.
        if "." not in name and not any(part.startswith("_") for part in name.split("/")):
            names.add(name)
    return sorted(names)


def template_locales(name: str) -> list[str]:
    """The locales `name` has its own text part for (`email/<name>.<locale>.txt`)."""
    found = []
    for path in current_app.jinja_env.list_templates(extensions=["txt"]):
        match = _LOCALE_FILE.match(path)
        if match and match["name"] == name:
            found.append(match["locale"])
    return sorted(found)


def _source(path: str) -> str | None:
    """A file under the template folders (found as Jinja finds templates), or None."""
    env = current_app.jinja_env
    try:
        if env.loader is None:
            return None
        return env.loader.get_source(env, path)[0]
    except TemplateNotFound:
        return None


def load_sample(name: str) -> Sample:
    """Read `email/<name>.preview.json`: {"subject"?, "to"?, "context"?: {...}, "headers"?,
    and any of send_email's message fields (cc, attachments...)}."""
    fallback_subject = f"Preview of {name}"
    path = f"email/{name}{PREVIEW_SUFFIX}"
    source = _source(path)
    if source is None:
        return Sample(
            fallback_subject,
            DEFAULT_PREVIEW_TO,
            {},
            note=f"No sample context: add templates/{path} to preview with real data. "
            "Rendered here with an empty context.",
        )
    try:
        data = json.loads(source)
    except ValueError as err:
        return _broken(name, f"templates/{path} is not valid JSON: {err}")
    if not isinstance(data, dict):
        return _broken(name, f'templates/{path} must be a JSON object {{"context": {{...}}}}')
    unknown = sorted(set(data) - set(SAMPLE_KEYS))
    if unknown:
        return _broken(
            name,
            f"templates/{path}: unknown key {unknown[0]!r} (expected {', '.join(SAMPLE_KEYS)}; "
            "the template variables go inside context)",
        )
    subject = data.get("subject", fallback_subject)
    to = data.get("to", DEFAULT_PREVIEW_TO)
    context = data.get("context", {})
    if not isinstance(subject, str):
        return _broken(name, f"templates/{path}: subject must be a string")
    if not (isinstance(to, str) or (isinstance(to, list) and all(isinstance(a, str) for a in to))):
        return _broken(name, f"templates/{path}: to must be an address or a list of addresses")
    if not isinstance(context, dict):
        return _broken(name, f"templates/{path}: context must be a JSON object")
    headers = data.get("headers", {})
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return _broken(name, f"templates/{path}: headers must map names to strings")
    shape = {key: data[key] for key in SHAPE_KEYS if key in data}
    return Sample(subject, to, context, headers, shape=shape)


def _broken(name: str, note: str) -> Sample:
    return Sample(f"Preview of {name}", DEFAULT_PREVIEW_TO, {}, note=note, usable=False)


def build_preview(name: str, locale: str | None = None) -> Preview:
    """Render `name` as a worker would, from a throw-away (never saved) mail record.
    `locale`: preview that language instead of the sample's ("" for none)."""
    preview = Preview(
        name=name,
        sample=load_sample(name),
        has_txt=_source(f"email/{name}.txt") is not None,
        has_html=_source(f"email/{name}.html") is not None,
        locales=template_locales(name),
    )
    if not preview.has_txt:
        preview.error = f"templates/email/{name}.txt is missing: a mail needs its text part."
        return preview
    if not preview.sample.usable:
        return preview
    sample = preview.sample
    try:
        record = sample.record(name, locale)
        message = build_message(record)
        raw = message.as_bytes()
    except InvalidMailError as err:
        preview.error = f"send_email would refuse this sample: {err}"
        return preview
    except Exception as err:  # a template bug is exactly what a preview is for
        preview.error = f"Rendering failed: {type(err).__name__}: {err}"
        return preview
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    head, _, _ = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    preview.headers = head.decode("ascii", "replace")
    preview.subject = str(parsed["Subject"])
    preview.sender = str(parsed["From"])
    preview.to = str(parsed["To"])
    preview.cc = str(parsed["Cc"] or "")
    preview.reply_to = str(parsed["Reply-To"] or "")
    preview.bcc = list(record.bcc)
    preview.extra_headers = dict(record.headers)
    preview.attachments = list(record.attachments)
    preview.locale = record.locale
    for entry, data in zip(
        record.attachments, split(record.attachments, record.attachment_data), strict=True
    ):
        if entry.get("inline") and entry.get("content_id"):
            encoded = base64.b64encode(data).decode()
            preview.inline[entry["content_id"]] = f"data:{entry['content_type']};base64,{encoded}"
    preview.text = message.body or ""
    preview.html = message.html
    preview.parts = [part.get_content_type() for part in parsed.walk()]
    return preview


def html_with_inline_parts(preview: Preview) -> str | None:
    """The html as the preview's iframe shows it: `cid:` references (inline parts, which
    a mail client resolves from the message) as data: URIs, which a browser can load."""
    if preview.html is None or not preview.inline:
        return preview.html

    def resolve(match: re.Match[str]) -> str:
        return preview.inline.get(match["cid"], match[0])

    return re.sub(r"cid:(?P<cid>[^\s\"'<>)]+)", resolve, preview.html)
