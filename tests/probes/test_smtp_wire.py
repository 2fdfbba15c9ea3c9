"""The SMTP layer on aiosmtplib against hostile servers on loopback: each server below is a script of bytes and
pauses, so every test controls what the client sees. What is pinned: bounded reads (line, reply, evidence),
timeouts (a silent server, one byte at a time, a STARTTLS that never completes), no control characters in
commands, exact transcripts, STARTTLS and implicit TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from app.probes.canary import self_signed_context
from app.probes.smtp_wire import (
    MAX_COMMAND,
    MAX_LINE,
    MAX_REPLY_BYTES,
    Dropped,
    ProtocolError,
    Reply,
    SmtpConnection,
    Timeout,
    TlsFailed,
    _RecordingProtocol,
    _reply,
    check_command,
)
from app.probes.transcript import Transcript
from app.verdicts import escape_bytes

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
EHLO_REPLY = b"250-fake.test.example\r\n250 STARTTLS\r\n"


@contextlib.asynccontextmanager
async def scripted(script: Script, tls: bool = False) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A one-script server on 127.0.0.1; yields its port and the lines it received."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await script(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    context = self_signed_context("wire.test.example") if tls else None
    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()


async def lines_into(reader: asyncio.StreamReader, received: list[bytes], count: int) -> None:
    for _ in range(count):
        line = await asyncio.wait_for(reader.readline(), 5)
        if not line:
            return
        received.append(line)


async def connected(port: int, timeout: float = 2.0, implicit_tls: bool = False) -> tuple[SmtpConnection, Reply]:
    conn = SmtpConnection("127.0.0.1", port, Transcript(), timeout)
    greeting = await conn.open(2.0, implicit_tls=implicit_tls)
    return conn, greeting


def seen(conn: SmtpConnection, direction: str) -> list[str]:
    return [line.text for line in conn.transcript.lines if line.dir == direction]


async def greeting_fails(script: Script, error: type[Exception], timeout: float = 5.0) -> tuple[SmtpConnection, str]:
    """Connect to the script's server; its greeting must raise `error`. The connection and the error's words."""
    async with scripted(script) as (port, _received):
        conn = SmtpConnection("127.0.0.1", port, Transcript(), timeout)
        with pytest.raises(error) as info:
            await conn.open(2.0)
        await conn.close(quit=False)
    return conn, str(info.value)


def sends(data: bytes) -> Script:
    """A server that sends `data` and then waits for a word from us."""
    async def script(reader, writer):
        writer.write(data)
        await reader.read(100)
    return script


# --- replies and the evidence -------------------------------------------------------------------------------
async def test_replies_and_the_transcript_are_exact():
    async def script(reader, writer):
        writer.write(b"220-mx.example.com says hi  \r\n220 caf\xe9 ready\r\n")
        line = await reader.readline()
        if line == b"EHLO probe.test.example\r\n":
            writer.write(b"250-mx.example.com\r\n250-SIZE 1000\r\n250 8BITMIME\r\n")
        await reader.readline()

    async with scripted(script) as (port, _received):
        conn, greeting = await connected(port)
        ehlo = await conn.command("EHLO probe.test.example")
        await conn.close(quit=False)
    assert greeting == Reply(220, ("mx.example.com says hi", "caf\ufffd ready"))  # stored text is valid UTF-8
    assert ehlo == Reply(250, ("mx.example.com", "SIZE 1000", "8BITMIME"))
    assert seen(conn, "in") == ["220-mx.example.com says hi  ", "220 caf\\xe9 ready",  # as sent, bytes escaped
                                "250-mx.example.com", "250-SIZE 1000", "250 8BITMIME"]
    assert seen(conn, "out") == ["EHLO probe.test.example"]


async def test_the_message_is_dot_stuffed_and_shown_by_its_size():
    body: list[bytes] = []

    async def script(reader, writer):
        writer.write(b"220 ready\r\n")
        while (line := await asyncio.wait_for(reader.readline(), 5)) != b".\r\n" and line:
            body.append(line)
        writer.write(b"250 2.0.0 queued\r\n")
        await reader.readline()

    async with scripted(script) as (port, _received):
        conn, _greeting = await connected(port)
        reply = await conn.send_message(b"Subject: x\n\n.hidden\nend")
        await conn.close(quit=False)
    assert reply == Reply(250, ("2.0.0 queued",))
    assert body == [b"Subject: x\r\n", b"\r\n", b"..hidden\r\n", b"end\r\n"]
    assert seen(conn, "out") == ["[message of 29 bytes]", "."]


@pytest.mark.parametrize("greeting,error", [
    (bytes(range(256)) + b"\r\nHTTP/1.1 400 Bad Request\r\n\r\n", "not an SMTP reply (Malformed SMTP response line"),
    (b"HTTP/1.1 400 Bad Request\r\n\r\n", "not an SMTP reply (Malformed SMTP response line"),
    (b"199 not a reply code\r\n", "not an SMTP reply"),
    (b"-25 negative\r\n", "not an SMTP reply"),
])
async def test_garbage_is_a_protocol_error_and_stays_in_the_evidence(greeting, error):
    conn, words = await greeting_fails(sends(greeting), ProtocolError)
    assert words.startswith(error)
    first_line = greeting.split(b"\n")[0].rstrip(b"\r")
    assert seen(conn, "in")[0] == escape_bytes(first_line)  # the evidence shows what came, escaped


async def test_an_endless_multiline_reply_is_cut_at_the_reply_bound():
    async def script(reader, writer):
        for i in range(5000):  # 300 KiB, far more than a reply may be
            writer.write(f"220-line {i:04d} of a greeting that never ends, padded to sixty b\r\n".encode())
            if i % 100 == 0:
                await writer.drain()
        await reader.read(100)

    conn, words = await greeting_fails(script, ProtocolError)
    assert "Response too long" in words
    received = seen(conn, "in")
    assert received[0] == "220-line 0000 of a greeting that never ends, padded to sixty b"
    assert MAX_REPLY_BYTES - 100 <= sum(len(text) + 2 for text in received) <= MAX_REPLY_BYTES
    assert seen(conn, "info")[-1].startswith(f"[more than {MAX_REPLY_BYTES} bytes without our next command")


@pytest.mark.parametrize("line", [
    b"220 " + b"x" * MAX_LINE + b"\r\n",  # one line over the line bound
    b"220-" + b"y" * (4 * MAX_LINE),  # a giant line that never ends
])
async def test_a_giant_line_is_a_protocol_error(line):
    conn, words = await greeting_fails(sends(line), ProtocolError)
    assert "Response too long" in words
    assert sum(len(text) for text in seen(conn, "in")) <= MAX_REPLY_BYTES


async def test_a_reply_just_under_the_bounds_is_read():
    lines = [b"250-" + bytes([0x61 + i]) * (MAX_LINE - 7) + b"\r\n" for i in range(3)]  # 3 lines of 8 KiB - 1

    async def script(reader, writer):
        writer.write(b"220 ready\r\n")
        await reader.readline()
        writer.write(b"".join(lines) + b"250 end\r\n")
        await reader.readline()

    async with scripted(script) as (port, _received):
        conn, _greeting = await connected(port)
        reply = await conn.command("EHLO probe.test.example")
        await conn.close(quit=False)
    assert reply.code == 250 and len(reply.lines) == 4 and reply.lines[3] == "end"


async def test_one_byte_at_a_time_is_a_timeout_within_the_command_timeout():
    async def script(reader, writer):
        for byte in b"220 a greeting that would take thirty seconds to arrive\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.5)

    async with scripted(script) as (port, _received):
        conn = SmtpConnection("127.0.0.1", port, Transcript(), 0.6)
        started = time.monotonic()
        with pytest.raises(Timeout) as info:
            await conn.open(2.0)
        waited = time.monotonic() - started
        await conn.close(quit=False)
    assert str(info.value) == "no complete reply within 0.6 s"
    assert waited < 5  # the whole reply is bounded, not each byte (the script would take 28 s)


async def test_a_dropped_connection_keeps_its_last_words():
    async def script(reader, writer):
        writer.write(b"220 ready\r\n")
        await reader.readline()
        writer.write(b"250-partial")
        await writer.drain()

    async with scripted(script) as (port, _received):
        conn, _greeting = await connected(port)
        with pytest.raises(Dropped) as info:
            await conn.command("EHLO probe.test.example")
        await conn.close(quit=False)
    assert str(info.value) == "the server closed the connection"
    assert seen(conn, "in")[-1] == "250-partial"


# --- our commands -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line", ["RCPT TO:<a@example.com>\r\nDATA", "MAIL FROM:<a>\nRCPT TO:<b>", "EHLO x\x00y",
                                  "EHLO x\x7f", "A" * (MAX_COMMAND + 1)])
async def test_an_unsafe_command_is_never_sent(line):
    async def script(reader, writer):
        writer.write(b"220 ready\r\n")
        await lines_into(reader, received, 2)

    async with scripted(script) as (port, received):
        conn, _greeting = await connected(port)
        with pytest.raises(ValueError):
            await conn.command(line)
        await conn.close(quit=True)
        await asyncio.sleep(0.05)
    assert received == [b"QUIT\r\n"]  # only the goodbye reached the server
    assert seen(conn, "out") == ["QUIT"]


def test_the_longest_allowed_command_passes_and_the_refusal_quotes_80_characters():
    assert check_command("A" * MAX_COMMAND) == "A" * MAX_COMMAND
    assert check_command("EHLO caf\u00e9") == "EHLO caf\u00e9"  # not a control: the ASCII encoding refuses it
    with pytest.raises(ValueError) as info:
        check_command("B" * (MAX_COMMAND + 1))
    assert str(info.value) == "refusing to send an unsafe SMTP command: " + repr("B" * 80)


# --- TLS ----------------------------------------------------------------------------------------------------
def tls_script(handshake: bool) -> Script:
    async def script(reader, writer):
        writer.write(b"220 ready\r\n")
        await reader.readline()  # EHLO
        writer.write(EHLO_REPLY)
        if await reader.readline() != b"STARTTLS\r\n":
            return
        writer.write(b"220 2.0.0 go ahead\r\n")
        await writer.drain()
        if not handshake:
            await asyncio.sleep(10)  # never completes
            return
        await writer.start_tls(self_signed_context("starttls.test.example"))
        if await reader.readline() == b"EHLO probe.test.example\r\n":
            writer.write(b"250 secure.test.example\r\n")
        await reader.readline()
    return script


async def test_starttls_upgrades_and_the_evidence_says_so():
    async with scripted(tls_script(handshake=True)) as (port, _received):
        conn, _greeting = await connected(port)
        await conn.command("EHLO probe.test.example")
        reply = await conn.starttls()
        after = await conn.command("EHLO probe.test.example")
        await conn.close(quit=False)
    assert reply.code == 220 and conn.tls and after == Reply(250, ("secure.test.example",))
    assert conn.tls_subject == "CN=starttls.test.example"
    assert any(text.startswith("TLS established (TLSv1.") for text in seen(conn, "info"))
    assert seen(conn, "out") == ["EHLO probe.test.example", "STARTTLS", "EHLO probe.test.example"]


async def test_a_starttls_that_never_completes_times_out():
    async with scripted(tls_script(handshake=False)) as (port, _received):
        conn, _greeting = await connected(port, timeout=0.5)
        await conn.command("EHLO probe.test.example")
        started = time.monotonic()
        with pytest.raises(TlsFailed) as info:
            await conn.starttls()
        waited = time.monotonic() - started
        await conn.close(quit=False)
    assert str(info.value) == "the TLS handshake did not finish in time"
    assert waited < 5 and not conn.tls  # the script would hold it 10 s


async def test_a_refused_starttls_is_a_reply_not_an_error():
    async def script(reader, writer):
        writer.write(b"220 ready\r\n")
        await reader.readline()
        writer.write(b"454 4.7.0 TLS not available due to local problem\r\n")
        await reader.readline()

    async with scripted(script) as (port, _received):
        conn, _greeting = await connected(port)
        reply = await conn.starttls()
        await conn.close(quit=False)
    assert reply == Reply(454, ("4.7.0 TLS not available due to local problem",)) and not conn.tls
    assert reply.enhanced == "4.7.0"


async def test_implicit_tls_from_the_first_byte():
    async def script(reader, writer):
        writer.write(b"220 tls.test.example ESMTP\r\n")
        await reader.readline()

    async with scripted(script, tls=True) as (port, _received):
        conn, greeting = await connected(port, implicit_tls=True)
        await conn.close(quit=False)
    assert greeting == Reply(220, ("tls.test.example ESMTP",)) and conn.tls
    assert conn.tls_subject == "CN=wire.test.example"


async def test_implicit_tls_against_a_plain_port_fails_as_tls():
    async def script(reader, writer):
        writer.write(b"220 plain.test.example ESMTP\r\n")
        await reader.read(100)

    async with scripted(script) as (port, _received):
        conn = SmtpConnection("127.0.0.1", port, Transcript(), 2.0)
        with pytest.raises(TlsFailed):
            await conn.open(2.0, implicit_tls=True)
        await conn.close(quit=False)


# --- the recorder, fed directly (no connection: aiosmtplib ignores data while not connected) ----------------
class Holder:
    def __init__(self) -> None:
        self.transcript = Transcript()


def recorder() -> tuple[Holder, _RecordingProtocol]:
    holder = Holder()
    return holder, _RecordingProtocol(holder, asyncio.get_running_loop())  # type: ignore[arg-type]


def lines_of(holder: Holder, direction: str) -> list[str]:
    return [line.text for line in holder.transcript.lines if line.dir == direction]


MARKER = f"[more than {MAX_REPLY_BYTES} bytes without our next command: the rest is not recorded]"


async def test_lines_split_across_reads_are_recorded_whole():
    holder, protocol = recorder()
    for chunk in (b"220-ab", b"c\r\n220 d", b"efX\r", b"\n"):
        protocol.data_received(chunk)
    assert lines_of(holder, "in") == ["220-abc", "220 defX"]


async def test_the_evidence_of_one_reply_stops_at_the_bound_whatever_the_reads():
    holder, protocol = recorder()
    line = b"250-" + b"x" * 994 + b"\r\n"  # 1000 bytes
    for _ in range(40):  # 40 000 bytes in 40 reads, more than one reply may be
        protocol.data_received(line)
    received = lines_of(holder, "in")
    assert sum(len(text) for text in received) + 2 * (len(received) - 1) == MAX_REPLY_BYTES  # CRLFs not shown
    assert len(received) == MAX_REPLY_BYTES // 1000 + 1  # the whole lines, then the start of the cut one
    assert lines_of(holder, "info") == [MARKER]


async def test_a_reply_of_exactly_the_bound_then_more():
    holder, protocol = recorder()
    protocol.data_received(b"250-" + b"y" * (MAX_REPLY_BYTES - 6) + b"\r\n")
    assert lines_of(holder, "info") == [MARKER]  # the bound is reached: the marker, once
    protocol.data_received(b"250 more\r\n")
    assert lines_of(holder, "info") == [MARKER]
    assert "250 more" not in lines_of(holder, "in")


async def test_one_byte_of_room_is_recorded_and_marked():
    holder, protocol = recorder()
    protocol.data_received(b"250-" + b"z" * (MAX_REPLY_BYTES - 7) + b"\r\n")  # one byte short of the bound
    assert lines_of(holder, "info") == []
    protocol.data_received(b"Qrest\r\n")
    assert lines_of(holder, "in")[-1] == "Q" and lines_of(holder, "info") == [MARKER]


@pytest.mark.parametrize("code,ok", [(199, False), (200, True), (599, True), (600, False)])
def test_reply_codes_outside_2xx_to_5xx_are_not_smtp(code, ok):
    if ok:
        assert _reply(code, "fine\nsecond") == Reply(code, ("fine", "second"))
    else:
        with pytest.raises(ProtocolError):
            _reply(code, "x")


def test_our_own_guard_refuses_delete_before_aiosmtplib_does():
    with pytest.raises(ValueError) as info:
        check_command("EHLO x\x7f")
    assert str(info.value).startswith("refusing to send an unsafe SMTP command")
