"""The MIME tree of a mail with attachments, which Flask-Mail 0.10 cannot shape: inline
parts referenced as `cid:` from the html (multipart/related), content types with
parameters (`text/calendar; method=REQUEST`), file names in RFC 2231.

    multipart/mixed                      (only when there are attachments proper)
      multipart/alternative
        text/plain
        multipart/related                (only when there are inline parts)
          text/html
          image/png  Content-ID: <logo>  (inline)
      application/pdf                    (attachment)
"""

from __future__ import annotations

import binascii
import secrets
from email.encoders import encode_base64
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from flask_mail import Attachment

BASE64_LINE = 76  # characters a base64 body line holds (RFC 2045), as email.encoders writes


def body_tree(
    text: str,
    html: str | None,
    attachments: list[Attachment],
    placeholders: dict[bytes, bytes] | None = None,
) -> Message:
    """The message body, without its top-level headers. With `placeholders`, each
    attachment's body is a token, and the dict maps it to the base64 lines that
    `fill_placeholders` puts in its place (see there: why)."""
    inline = [a for a in attachments if a.disposition == "inline" and _content_id(a)]
    files = [a for a in attachments if a not in inline]
    html_part: Message | None = MIMEText(html, "html", "utf-8") if html is not None else None
    if html_part is not None and inline:
        related = MIMEMultipart("related")
        related.attach(html_part)
        for attachment in inline:
            related.attach(attachment_part(attachment, placeholders))
        html_part = related
    elif inline:
        files = attachments  # no html to refer to them: plain attachments, shown inline
    body: Message = MIMEText(text, "plain", "utf-8")
    if html_part is not None:
        alternative = MIMEMultipart("alternative")
        alternative.attach(body)
        alternative.attach(html_part)
        body = alternative
    if not files:
        return body
    mixed = MIMEMultipart("mixed")
    mixed.attach(body)
    for attachment in files:
        mixed.attach(attachment_part(attachment, placeholders))
    return mixed


def attachment_part(
    attachment: Attachment, placeholders: dict[bytes, bytes] | None = None
) -> Message:
    """One attachment in base64, its type (with parameters) as given, its file name in
    RFC 2231 when not ASCII, its Content-ID if it has one."""
    part = Message()
    part["Content-Type"] = attachment.content_type
    data: bytes = attachment.data  # type: ignore[assignment]  # bytes: built so in mime.py
    if placeholders is None or not data:  # (an empty body: nothing to save)
        part.set_payload(data)
        encode_base64(part)
    else:
        token = f"mailqueue-attachment-{secrets.token_hex(16)}"
        placeholders[token.encode()] = binascii.b2a_base64(data, newline=False)
        part.set_payload(token)
        part["Content-Transfer-Encoding"] = "base64"
    filename: Any = attachment.filename or "attachment"
    if not filename.isascii():
        filename = ("utf-8", "", filename)
    part.add_header("Content-Disposition", attachment.disposition, filename=filename)
    for name, value in attachment.headers.items():
        part[name] = value
    return part


def _content_id(attachment: Attachment) -> str:
    return attachment.headers.get("Content-ID", "")


def fill_placeholders(raw: bytes, placeholders: dict[bytes, bytes]) -> bytes:
    """`raw` (a flattened message) with each token replaced by its base64, in lines of
    BASE64_LINE and the message's own line ending: the bytes email.encoders writes.

    The stdlib's generator writes a body line by line, and email.encoders encodes in
    57-byte steps: for a 200 KB PDF, ~8 ms a mail, most of what attaching it cost a
    worker (docs/performance.md, row p). One b2a_base64 and one join do the same in a
    fraction of a millisecond. A token is 128 random bits: it cannot be in the text.
    """
    for token, encoded in placeholders.items():
        at = raw.index(token)
        linesep = b"\r\n" if raw[at + len(token) : at + len(token) + 2] == b"\r\n" else b"\n"
        lines = linesep.join(
            encoded[i : i + BASE64_LINE] for i in range(0, len(encoded), BASE64_LINE)
        )
        # email.encoders ends the body with a newline too (base64.encodebytes's).
        raw = raw[:at] + lines + linesep + raw[at + len(token) :]
    return raw
