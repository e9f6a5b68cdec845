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

from email.encoders import encode_base64
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from typing import Any

from flask_mail import Attachment


def body_tree(text: str, html: str | None, attachments: list[Attachment]) -> Message:
    """The message body, without its top-level headers."""
    inline = [a for a in attachments if a.disposition == "inline" and _content_id(a)]
    files = [a for a in attachments if a not in inline]
    html_part: Message | None = MIMEText(html, "html", "utf-8") if html is not None else None
    if html_part is not None and inline:
        related = MIMEMultipart("related")
        related.attach(html_part)
        for attachment in inline:
            related.attach(attachment_part(attachment))
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
        mixed.attach(attachment_part(attachment))
    return mixed


def attachment_part(attachment: Attachment) -> Message:
    """One attachment in base64, its type (with parameters) as given, its file name in
    RFC 2231 when not ASCII, its Content-ID if it has one."""
    part = Message()
    part["Content-Type"] = attachment.content_type
    part.set_payload(attachment.data)
    encode_base64(part)
    filename: Any = attachment.filename or "attachment"
    if not filename.isascii():
        filename = ("utf-8", "", filename)
    part.add_header("Content-Disposition", attachment.disposition, filename=filename)
    for name, value in attachment.headers.items():
        part[name] = value
    return part


def _content_id(attachment: Attachment) -> str:
    return attachment.headers.get("Content-ID", "")
