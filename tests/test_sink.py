"""The benchmark's SMTP sink reads pipelined input however TCP happens to cut it.

Fed straight to its asyncio Protocol, so every cut can be tried."""

from __future__ import annotations

import asyncio
from typing import Any

from bench.sink import EHLO_CHUNKING, EHLO_REPLY, SMTPSession, Stats

BODY = b"Message-ID: <one@example.com>\r\nSubject: x\r\n\r\n..dot-stuffed\r\nlast"
STREAM = (
    b"EHLO client\r\n"
    b"MAIL FROM:<a@example.com> size=99\r\nRCPT TO:<b@example.com>\r\nRCPT TO:<c@example.com>\r\n"
    b"DATA\r\n" + BODY + b"\r\n.\r\n"
    b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n.\r\n"  # an empty body
    b"QUIT\r\n"
)
REPLIES = (
    EHLO_REPLY
    + b"250 OK\r\n" * 3 + b"354 go ahead\r\n" + b"250 2.0.0 OK\r\n"
    + b"250 OK\r\n" * 2 + b"354 go ahead\r\n" + b"250 2.0.0 OK\r\n"
    + b"221 bye\r\n"
)  # fmt: skip


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: Any) -> None:
        if data:
            self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def feed(*chunks: bytes) -> tuple[Transport, Stats]:
    stats, transport = Stats(), Transport()
    session = SMTPSession(stats)
    session.connection_made(transport)
    for chunk in chunks:
        session.data_received(chunk)
    return transport, stats


def test_the_sink_offers_pipelining() -> None:
    assert b"250-PIPELINING\r\n" in EHLO_REPLY


def test_what_arrives_together_is_answered_in_one_write() -> None:
    transport, stats = feed(STREAM)
    assert transport.writes == [b"220 bench-sink ESMTP\r\n", REPLIES]
    assert transport.closed
    assert stats.messages == 2
    assert set(stats.seen) == {b"<one@example.com>", b"<none-2>"}


def test_every_cut_of_the_stream_gives_the_same_replies() -> None:
    for cut in range(1, len(STREAM)):
        transport, stats = feed(STREAM[:cut], STREAM[cut:])
        assert b"".join(transport.writes[1:]) == REPLIES, cut
        assert stats.messages == 2, cut
        assert b"<one@example.com>" in stats.seen, cut


def test_with_a_lag_replies_come_late_and_in_order() -> None:
    """A provider a round trip away: every reply, the greeting first, held back."""

    async def run() -> tuple[Transport, Stats, list[bytes], float]:
        loop = asyncio.get_running_loop()
        stats, transport = Stats(), Transport()
        stats.lag = 0.05
        session = SMTPSession(stats)
        started = loop.time()
        session.connection_made(transport)
        for cut in range(0, len(STREAM), 40):  # as TCP might cut it
            session.data_received(STREAM[cut : cut + 40])
        early = list(transport.writes)
        while not transport.closed and loop.time() - started < 5:
            await asyncio.sleep(0.01)
        return transport, stats, early, loop.time() - started

    transport, stats, early, took = asyncio.run(run())
    assert early == []  # nothing went out at once
    assert b"".join(transport.writes) == b"220 bench-sink ESMTP\r\n" + REPLIES
    assert transport.closed and stats.messages == 2
    assert took >= 0.05


CHUNKED = b"Message-ID: <two@example.com>\r\nSubject: y\r\n\r\n.not stuffed\r\n"
CHUNKED_STREAM = (
    b"EHLO client\r\n"
    b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
    b"BDAT 20\r\n" + CHUNKED[:20] + b"BDAT %d LAST\r\n" % (len(CHUNKED) - 20) + CHUNKED[20:]
    + b"QUIT\r\n"
)  # fmt: skip


def test_with_chunking_on_bdat_chunks_make_one_message_in_every_cut() -> None:
    for cut in range(1, len(CHUNKED_STREAM)):
        stats, transport = Stats(), Transport()
        stats.chunking = True
        session = SMTPSession(stats)
        session.connection_made(transport)
        session.data_received(CHUNKED_STREAM[:cut])
        session.data_received(CHUNKED_STREAM[cut:])
        replies = b"".join(transport.writes[1:])
        assert replies == EHLO_CHUNKING + b"250 OK\r\n" * 2 + b"250 2.0.0 OK\r\n" * 2 + (
            b"221 bye\r\n"
        ), cut
        assert list(stats.seen) == [b"<two@example.com>"], cut
    assert b"250-CHUNKING\r\n" in EHLO_CHUNKING and b"CHUNKING" not in EHLO_REPLY
