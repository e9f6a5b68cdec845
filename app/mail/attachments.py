"""Attachments: `Attachment`, their validation, and their bytes beside the mail record.

The web process and the worker may run on different hosts, so a mail's attachment
bytes travel through Redis: concatenated in order into one string key
(`status.attachments_key`), written in the enqueue's transaction, read by the worker,
deleted when the mail is sent or has failed. The record keeps each attachment's name,
type and size (and, for an inline one, its Content-ID), never its bytes.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.client import Pipeline

from app import status
from app.errors import InvalidAttachmentError
from app.mail.headers import check_header

# More would only be a way to make one mail expensive to build; a real one has a few.
MAX_ATTACHMENTS = 1000
MAX_FILENAME = 255
# type/subtype and optional ;name=value parameters (tokens or quoted strings), RFC 2045.
_MIME_WORD = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
CONTENT_TYPE = re.compile(
    rf'^{_MIME_WORD}/{_MIME_WORD}(\s*;\s*{_MIME_WORD}=({_MIME_WORD}|"[^"\\\x00-\x1f\x7f]*"))*$'
)
# A Content-ID's inside (without the angle brackets): what an addr-spec may hold.
CONTENT_ID = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.@-]{1,200}$")
_KEYS = frozenset({"filename", "data", "content", "content_type", "inline", "content_id"})


@dataclass(frozen=True)
class Attachment:
    """One file to attach. `content_type` is guessed from the filename when None; an
    `inline` one with a `content_id` is what the html refers to as `cid:<content_id>`."""

    filename: str
    data: bytes
    content_type: str | None = None
    inline: bool = False
    content_id: str | None = None


def validate_attachments(items: Any, max_bytes: int) -> tuple[list[dict[str, Any]], bytes]:
    """Each attachment checked: its record entry (name, type, size...) and all the bytes,
    concatenated. Takes Attachment objects or mappings of the same keys, with `data`
    (bytes) or `content` (base64, as JSON carries it)."""
    if isinstance(items, str | bytes | Mapping) or not isinstance(items, Iterable):
        raise InvalidAttachmentError("attachments", "expected a list of attachments")
    items = list(items)
    if len(items) > MAX_ATTACHMENTS:
        raise InvalidAttachmentError("attachments", f"at most {MAX_ATTACHMENTS} per mail")
    entries: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    total = 0
    for index, item in enumerate(items):
        where = f"attachments[{index}]"
        entry, data = _one(where, item, max_bytes - total)
        total += len(data)
        entries.append(entry)
        chunks.append(data)
    return entries, b"".join(chunks)


def _one(where: str, item: Any, room: int) -> tuple[dict[str, Any], bytes]:
    if isinstance(item, Attachment):
        fields: Mapping[str, Any] = vars(item)
    elif isinstance(item, Mapping):
        unknown = sorted(str(key) for key in set(item) - _KEYS)
        if unknown:
            raise InvalidAttachmentError(f"{where}.{unknown[0]}", "is not an attachment field")
        fields = item
    else:
        raise InvalidAttachmentError(where, "expected an Attachment or a mapping")
    filename = check_filename(f"{where}.filename", fields.get("filename"))
    data = _data(where, fields, room)
    content_type = fields.get("content_type")
    if content_type is None:
        content_type = mimetypes.guess_type(filename, strict=False)[0] or "application/octet-stream"
    elif not isinstance(content_type, str) or not CONTENT_TYPE.fullmatch(content_type):
        raise InvalidAttachmentError(
            f"{where}.content_type", f"{content_type!r} is not a MIME type"
        )
    inline = fields.get("inline", False)
    if not isinstance(inline, bool):
        raise InvalidAttachmentError(f"{where}.inline", "must be a boolean")
    entry: dict[str, Any] = {"filename": filename, "content_type": content_type, "size": len(data)}
    content_id = fields.get("content_id")
    if content_id is not None:
        if not isinstance(content_id, str) or not CONTENT_ID.fullmatch(content_id):
            raise InvalidAttachmentError(
                f"{where}.content_id", "expected 1-200 characters of an address, no <>"
            )
        entry["content_id"] = content_id
    if inline:
        entry["inline"] = True
    return entry, data


def check_filename(where: str, filename: Any) -> str:
    """A bare file name: no folders (`../x`), no control characters, at most 255 long."""
    if not isinstance(filename, str) or not filename.strip():
        raise InvalidAttachmentError(where, "expected a non-empty file name")
    check_header(where, filename)
    if "/" in filename or "\\" in filename or filename in (".", ".."):
        raise InvalidAttachmentError(where, f"{filename!r}: a file name, without a path")
    if len(filename) > MAX_FILENAME:
        raise InvalidAttachmentError(where, f"longer than {MAX_FILENAME} characters")
    return filename


def _data(where: str, fields: Mapping[str, Any], room: int) -> bytes:
    """The attachment's bytes, from `data` or base64 `content`, within `room` bytes."""
    if "data" in fields and fields.get("data") is not None:
        data = fields["data"]
        if not isinstance(data, bytes | bytearray | memoryview):
            raise InvalidAttachmentError(f"{where}.data", "expected bytes")
        data = bytes(data)
    else:
        content = fields.get("content")
        if not isinstance(content, str):
            raise InvalidAttachmentError(f"{where}.content", "expected base64 text")
        if len(content) // 4 * 3 - 2 > room:  # decoded, it could not fit: do not decode it
            raise _over_cap(where)
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidAttachmentError(f"{where}.content", "is not valid base64") from None
    if len(data) > room:
        raise _over_cap(where)
    return data


def _over_cap(where: str) -> InvalidAttachmentError:
    return InvalidAttachmentError(
        where, "the attachments add up to more than MAIL_MAX_ATTACHMENT_BYTES"
    )


def split(entries: list[dict[str, Any]], data: bytes) -> list[bytes]:
    """The bytes of each attachment, from their concatenation."""
    parts, at = [], 0
    for entry in entries:
        parts.append(data[at : at + entry["size"]])
        at += entry["size"]
    return parts


def queue_write(pipe: Pipeline, record: status.MailRecord) -> None:
    """Queue the write of `record`'s attachment bytes (if any) on the enqueue's pipeline."""
    if record.attachments:
        pipe.set(status.attachments_key(record.id), record.attachment_data)


def load(redis: Redis, record: status.MailRecord) -> bytes | None:
    """The attachment bytes of `record` (b"" when it has none; None when they are gone)."""
    if not record.attachments:
        return b""
    data: Any = redis.get(status.attachments_key(record.id))
    return data
