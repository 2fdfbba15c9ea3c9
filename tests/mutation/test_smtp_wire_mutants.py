"""Reply parsing and the command guard (app/probes/smtp_wire.py), pinned where mutants survived.

A hostile server's reply is read from an in-memory stream, so each test controls every byte: the limits at their
exact edges, the transcript (the evidence), and each error's words.
"""

from __future__ import annotations

import asyncio

import pytest

from app.probes.smtp_wire import (MAX_COMMAND, MAX_LINE, MAX_REPLY_BYTES, MAX_REPLY_LINES, Dropped, ProtocolError,
                                  Reply, SmtpConnection, Timeout, check_command)
from app.probes.transcript import Transcript


def connection(data: bytes = b"", eof: bool = True, timeout: float = 2.0) -> SmtpConnection:
    conn = SmtpConnection("192.0.2.1", 25, Transcript(), timeout)
    conn.reader = asyncio.StreamReader(limit=MAX_LINE)
    conn.reader.feed_data(data)
    if eof:
        conn.reader.feed_eof()
    return conn


def received(conn: SmtpConnection) -> list[str]:
    return [line.text for line in conn.transcript.lines if line.dir == "in"]


async def test_a_multiline_reply_and_its_transcript():
    conn = connection(b"250-mx.example.com says hi  \r\n250 BOX\r\n")
    assert await conn.read_reply() == Reply(250, ("mx.example.com says hi  ", "BOX"))
    assert received(conn) == ["250-mx.example.com says hi  ", "250 BOX"]


async def test_bytes_that_are_not_utf8_are_replaced_not_fatal():
    conn = connection(b"250 caf\xe9\r\n")
    assert await conn.read_reply() == Reply(250, ("caf\ufffd",))


@pytest.mark.parametrize("data,error", [
    (b"hello\r\n", "not an SMTP reply"),
    (b"250-a\r\n251 b\r\n", "the lines of one reply carry different codes"),
    (b"250-" + b"x" * (MAX_LINE + 10) + b"\r\n", f"a reply line longer than {MAX_LINE} bytes"),
])
async def test_protocol_errors_say_what_was_wrong(data, error):
    with pytest.raises(ProtocolError) as info:
        await connection(data).read_reply()
    assert str(info.value) == error


def continuation_lines(total_bytes: int, count: int) -> bytes:
    """`count` lines of `250-...` that add up to exactly `total_bytes` bytes."""
    size, extra = divmod(total_bytes, count)
    lines = [b"250-" + b"x" * (size - 6 + (1 if i < extra else 0)) + b"\r\n" for i in range(count)]
    data = b"".join(lines)
    assert len(data) == total_bytes and all(len(line) < MAX_LINE for line in lines)
    return data


async def test_a_reply_may_come_close_to_the_byte_limit():
    conn = connection(continuation_lines(MAX_REPLY_BYTES - 1, 16) + b"250 end\r\n")
    reply = await conn.read_reply()
    assert reply.code == 250 and len(reply.lines) == 17


async def test_a_reply_that_reaches_the_byte_limit_is_cut():
    conn = connection(continuation_lines(MAX_REPLY_BYTES, 16) + b"250 end\r\n")
    with pytest.raises(ProtocolError) as info:
        await conn.read_reply()
    assert str(info.value) == f"a reply of more than 16 lines / {MAX_REPLY_BYTES} bytes"


async def test_a_reply_may_have_the_most_lines():
    conn = connection(b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 end\r\n")
    assert len((await conn.read_reply()).lines) == MAX_REPLY_LINES


async def test_a_reply_with_more_lines_is_cut():
    conn = connection(b"250-x\r\n" * MAX_REPLY_LINES + b"250 end\r\n")
    with pytest.raises(ProtocolError):
        await conn.read_reply()


async def test_a_closed_connection_keeps_its_last_words():
    conn = connection(b"250-partial")
    with pytest.raises(Dropped) as info:
        await conn.read_reply()
    assert str(info.value) == "the server closed the connection"
    assert received(conn) == ["250-partial"]


async def test_a_failed_connection_says_why():
    conn = connection(eof=False)
    conn.reader.set_exception(ConnectionResetError("reset by peer"))
    with pytest.raises(Dropped) as info:
        await conn.read_reply()
    assert str(info.value) == "the connection failed: reset by peer"


async def test_silence_is_a_timeout():
    conn = connection(eof=False, timeout=0.05)
    with pytest.raises(Timeout) as info:
        await conn.read_reply()
    assert str(info.value) == "no complete reply within 0.05 s"


def test_the_longest_allowed_command_passes_and_delete_is_a_control():
    line = "A" * MAX_COMMAND
    assert check_command(line) == line
    assert check_command("EHLO caf\u00e9\u0080") == "EHLO caf\u00e9\u0080"  # not a control: the encoding refuses it later
    with pytest.raises(ValueError):
        check_command("EHLO x\x7f")


def test_the_refusal_quotes_the_first_80_characters():
    with pytest.raises(ValueError) as info:
        check_command("B" * (MAX_COMMAND + 1))
    assert str(info.value) == "refusing to send an unsafe SMTP command: " + repr("B" * 80)
