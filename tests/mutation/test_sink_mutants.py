"""Our sink (app/probes/sink.py), pinned where mutants survived `make mutation`.

An arrival at the sink is what turns `open` into `delivered`, so which addresses and headers count as a tag, what
is remembered, and how the listener is set up are each pinned here. Everything listens on loopback only.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from aiosmtpd.smtp import Envelope
from support import free_port

from app.probes import sink as sink_module
from app.probes.sink import TAG_HEADER, Sink, _Handler

DOMAIN = "sink.test.example"
TAG = "sys0123456789abcdef"


def test_the_probe_domain_is_compared_without_case_or_trailing_dot():
    sink = Sink("Sink.Test.Example.")
    assert sink.probe_domain == DOMAIN
    assert sink.tag_of(f"{TAG}@SINK.test.example.") == TAG


@pytest.mark.parametrize("address,tag", [
    (f'"{TAG}"@{DOMAIN}', TAG),  # a quoted local part (the quoting variants arrive like this)
    (f"{TAG.upper()}@{DOMAIN}", TAG),
    (f"X{TAG}@{DOMAIN}", None),
    (f" {TAG}@{DOMAIN}", None),
    (f"{TAG}@other.example", None),
    (f"{TAG}@{DOMAIN}.evil.example", None),
])
def test_which_recipients_are_ours(address, tag):
    assert Sink(DOMAIN).tag_of(address) == tag


def test_a_sink_that_never_started_has_no_port_and_stops_quietly():
    sink = Sink(DOMAIN)
    assert sink.port is None
    asyncio.run(sink.stop())
    assert sink.port is None


async def test_an_arrival_is_timed_logged_and_passed_on_once(caplog):
    seen: list[str] = []

    async def on_delivery(tag: str) -> None:
        seen.append(tag)

    sink = Sink(DOMAIN, on_delivery)
    before = time.time()
    with caplog.at_level(logging.INFO, logger="secure.sink"):
        await sink.record(TAG)
        await sink.record(TAG)
    assert seen == [TAG]
    assert before <= sink.arrivals[TAG] <= time.time()
    delivered = [r for r in caplog.records if r.getMessage() == "sink.delivered"]
    assert len(delivered) == 1 and delivered[0].tag == TAG


async def test_a_failing_callback_is_logged_with_its_tag_and_does_not_lose_the_arrival(caplog):
    async def on_delivery(tag: str) -> None:
        raise RuntimeError("store is down")

    sink = Sink(DOMAIN, on_delivery)
    with caplog.at_level(logging.INFO, logger="secure.sink"):
        await sink.record(TAG)
    assert TAG in sink.arrivals
    failed = [r for r in caplog.records if r.getMessage() == "sink.on_delivery_failed"]
    assert len(failed) == 1 and failed[0].tag == TAG and failed[0].exc_info is not None


async def test_the_oldest_arrivals_are_forgotten_first(monkeypatch):
    monkeypatch.setattr(sink_module, "MAX_REMEMBERED", 3)
    sink = Sink(DOMAIN)
    tags = [f"sys{n:016x}" for n in range(4)]
    for tag in tags:
        await sink.record(tag)
    assert list(sink.arrivals) == tags[1:]


async def test_waiting_sees_an_arrival_that_comes_a_little_later():
    sink = Sink(DOMAIN)

    async def later() -> None:
        await asyncio.sleep(0.1)
        await sink.record(TAG)

    task = asyncio.create_task(later())
    assert await sink.wait_for({TAG}, 0.6) == {TAG}
    await task


def envelope(rcpts: list[str], content: bytes | None) -> Envelope:
    env = Envelope()
    env.rcpt_tos = list(rcpts)
    env.original_content = content
    return env


async def data(content: bytes | None, rcpts: list[str] | None = None) -> tuple[str, list[str]]:
    sink = Sink(DOMAIN)
    reply = await _Handler(sink).handle_DATA(None, None, envelope(rcpts or [], content))  # type: ignore[arg-type]
    return reply, list(sink.arrivals)


async def test_the_tag_header_alone_proves_an_arrival():
    content = (b"Received: from relay\r\nSubject: test\r\n" + TAG_HEADER.upper().encode() + b":  "
               + TAG.upper().encode() + b" \r\n\r\nbody\r\n")
    assert await data(content) == ("250 2.0.0 Received, thank you", [TAG])


async def test_only_the_tag_header_counts():
    assert await data(b"Subject: " + TAG.encode() + b"\r\nX-Other: sysaaaaaaaaaaaaaaaa\r\n\r\n") == (
        "250 2.0.0 Received, thank you", [])


async def test_only_the_first_200_lines_are_read():
    filler = b"".join(b"X-Filler-%d: x\r\n" % n for n in range(200))
    assert (await data(filler + TAG_HEADER.encode() + b": " + TAG.encode() + b"\r\n"))[1] == []
    filler = b"".join(b"X-Filler-%d: x\r\n" % n for n in range(199))
    assert (await data(filler + TAG_HEADER.encode() + b": " + TAG.encode() + b"\r\n"))[1] == [TAG]


async def test_a_header_that_is_not_ascii_is_no_tag_and_no_crash():
    content = TAG_HEADER.encode() + b": sys\xff\xfe0123456789abcdef\r\n\r\n"
    assert await data(content, [f"{TAG}@{DOMAIN}"]) == ("250 2.0.0 Received, thank you", [TAG])


async def test_recipients_the_sink_does_not_own_are_refused():
    sink = Sink(DOMAIN)
    handler = _Handler(sink)
    env = Envelope()
    refused = await handler.handle_RCPT(None, None, env, "someone@example.com", [])  # type: ignore[arg-type]
    accepted = await handler.handle_RCPT(None, None, env, f"{TAG}@{DOMAIN}", [])  # type: ignore[arg-type]
    assert refused == "550 5.1.1 This server accepts only Secure Your Server test messages"
    assert accepted == "250 2.1.5 OK"
    assert env.rcpt_tos == [f"{TAG}@{DOMAIN}"]


async def test_the_listener_is_bounded_and_named(monkeypatch):
    made: list[dict] = []
    real = sink_module.SMTP

    def recording_smtp(handler, **kwargs):
        made.append(kwargs)
        return real(handler, **kwargs)

    monkeypatch.setattr(sink_module, "SMTP", recording_smtp)
    port = free_port()
    sink = Sink(DOMAIN)
    await sink.start("127.0.0.1", port)
    try:
        assert sink.port == port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        banner = await asyncio.wait_for(reader.readline(), 5)
        writer.write(b"EHLO probe.test.example\r\n")
        ehlo = b""
        while not ehlo.endswith(b"\r\n") or ehlo.splitlines()[-1][3:4] != b" ":
            ehlo += await asyncio.wait_for(reader.readline(), 5)
        writer.close()
    finally:
        await sink.stop()
    assert sink.port is None
    await sink.stop()  # stopping twice is harmless
    assert banner == b"220 sink.test.example Secure Your Server sink\r\n"
    assert b"250-SIZE 65536\r\n" in ehlo and b"SMTPUTF8" not in ehlo
    assert made[0] == {"hostname": DOMAIN, "data_size_limit": 64 * 1024, "enable_SMTPUTF8": False,
                       "ident": "Secure Your Server sink", "timeout": 30}


async def test_the_sink_listens_only_where_it_is_told():
    """A sink told to listen on 127.0.0.2 is not on 127.0.0.3 (nor on every address: the listener of the
    site's own address must not answer elsewhere)."""
    import socket

    sink = Sink("sink.test.example")
    await sink.start("127.0.0.2", 0)
    try:
        port = sink._server.sockets[0].getsockname()[1]
        assert [s.getsockname()[0] for s in sink._server.sockets] == ["127.0.0.2"]
        with socket.socket() as other, pytest.raises(ConnectionRefusedError):
            other.settimeout(2)
            other.connect(("127.0.0.3", port))
    finally:
        await sink.stop()
