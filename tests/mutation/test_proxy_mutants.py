"""Proxy proof (app/probes/proxy.py): each runner's token check, pinned where mutants survived `make mutation`.

The exchanges run against a scripted peer in memory: what the "proxy" answers to each write is given by the
test, so every finding (verdict, reason and the note the owner reads) is the one under test.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Callable

import pytest

from app.probes import proxy
from app.probes.canary import Canary
from app.probes.base import Ended, Finding
from app.probes.proxy import CanaryTargets, Exchange, ProxyOptions
from app.probes.transcript import Transcript
from app.verdicts import Verdict

CID = "cid0123456789abcdef"
CANARY = Canary("test-secret")
TOKEN = CANARY.token(CID)
TARGETS = CanaryTargets(canary=CANARY, address="192.0.2.10", name="canary.example", http_base="http://192.0.2.10:80",
                        smtp_port=2525, tls_port=8443)


class Peer:
    """The writer side of a scripted peer: each write is recorded, and `answer` may feed the reader."""

    def __init__(self, reader: asyncio.StreamReader, answer: Callable[[bytes], bytes | None]) -> None:
        self.reader, self.answer, self.written = reader, answer, []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        reply = self.answer(data)
        if reply:
            self.reader.feed_data(reply)

    async def drain(self) -> None:
        return None


def exchange(first: bytes = b"", answer: Callable[[bytes], bytes | None] = lambda data: None,
             step_timeout: float = 0.2) -> tuple[Exchange, Peer]:
    options = ProxyOptions(targets=TARGETS, connect_timeout=1.0, step_timeout=step_timeout)
    ex = Exchange("192.0.2.1", 8080, options, Transcript())
    reader = asyncio.StreamReader()
    reader.feed_data(first)
    peer = Peer(reader, answer)
    ex.attach(reader, peer)  # type: ignore[arg-type]
    return ex, peer


def canary_after_ehlo(data: bytes) -> bytes | None:
    return f"250 {TOKEN}\r\n".encode() if data.startswith(b"EHLO ") else None


async def finding_of(run) -> tuple[Verdict, str, str]:
    with pytest.raises(Ended) as info:
        await run
    found = info.value.finding
    return found.verdict, found.reason, found.note


# --- through a tunnel to the mail canary -------------------------------------------------------------------
async def test_the_mail_canary_through_a_tunnel_proves_it():
    ex, peer = exchange(b"220 canary ready\r\n", canary_after_ehlo)
    await proxy._smtp_through(ex, CID, TOKEN)  # nothing already read: the greeting comes from the tunnel
    assert peer.written == [f"EHLO {CID}\r\n".encode(), b"QUIT\r\n"]


async def test_no_greeting_means_no_tunnel():
    ex, _peer = exchange(b"HTTP/1.0 200 OK\r\n\r\n", canary_after_ehlo)
    assert await finding_of(proxy._smtp_through(ex, CID, TOKEN)) == (
        Verdict.CLOSED, "answers_without_tunnel", "the tunnel did not lead to our mail canary (no SMTP greeting)")


async def test_silence_in_the_tunnel_is_a_timeout_named_by_what_was_awaited():
    ex, _peer = exchange()
    assert await finding_of(proxy._smtp_through(ex, CID, TOKEN)) == (
        Verdict.INCONCLUSIVE, "timeout", "no our mail canary's greeting within 0.2 s")
    ex, _peer = exchange(b"220 canary ready\r\n")
    assert await finding_of(proxy._smtp_through(ex, CID, TOKEN)) == (
        Verdict.INCONCLUSIVE, "timeout", "no our canary's token within 0.2 s")


async def test_three_lines_without_the_token_end_the_wait():
    ex, peer = exchange(b"220 something else\r\n",
                        lambda data: b"250-a\r\n250-b\r\n250 c\r\n" if data.startswith(b"EHLO") else None)
    assert await finding_of(proxy._smtp_through(ex, CID, TOKEN)) == (
        Verdict.CLOSED, "answers_without_tunnel", "our mail canary's token did not come back")
    assert peer.written == [f"EHLO {CID}\r\n".encode()]  # no QUIT: nothing was proven


# --- the runners, against a scripted "proxy" on loopback -----------------------------------------------------
class LoopbackPeer:
    """A server on 127.0.0.1 that answers what it received so far with `answer(received)`: (bytes, hang up?)."""

    def __init__(self, answer: Callable[[bytes], tuple[bytes, bool]], tls_after: bytes | None = None,
                 tls_answer: Callable[[bytes], bytes] | None = None, tls_hang_up: bool = True) -> None:
        self.answer, self.tls_after, self.tls_answer = answer, tls_after, tls_answer
        self.tls_hang_up = tls_hang_up
        self.received = b""
        self.after_tls = b""
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> "LoopbackPeer":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self.writers:  # connections still held open end with the test
            writer.close()
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            while True:
                data = await asyncio.wait_for(reader.read(4096), 6)
                if not data:
                    break
                self.received += data
                reply, hang_up = self.answer(self.received)
                if reply:
                    writer.write(reply)
                    await writer.drain()
                if self.tls_after is not None and self.received.endswith(self.tls_after):
                    from app.probes.canary import self_signed_context

                    await writer.start_tls(self_signed_context())
                    request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 3)
                    self.after_tls = request
                    writer.write(self.tls_answer(request) if self.tls_answer else b"")
                    await writer.drain()
                    if not self.tls_hang_up:
                        await asyncio.sleep(5)
                    break
                if hang_up:
                    break
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()


def check_named(check_id: str) -> proxy.ProxyCheck:
    return next(c for c in proxy.PROXY_CHECKS if c.id == check_id)


def options(step_timeout: float = 1.0) -> ProxyOptions:
    return ProxyOptions(targets=TARGETS, connect_timeout=1.0, step_timeout=step_timeout)


def live(peer: LoopbackPeer, step_timeout: float = 1.0) -> Exchange:
    return Exchange("127.0.0.1", peer.port, options(step_timeout), Transcript())


GET_REQUEST = (f"GET http://192.0.2.10:80/canary/{CID} HTTP/1.1\r\nHost: 192.0.2.10:80\r\n"
               f"User-Agent: SecureYourServer-proxy-test\r\nConnection: close\r\n\r\n").encode()


async def test_get_without_the_token_is_a_web_server_not_a_proxy():
    async with LoopbackPeer(lambda received: (b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n<html>hi</html>", True)) as peer:
        ex = live(peer)
        assert await finding_of(proxy.http_get(ex, TARGETS, CID, TOKEN)) == (
            Verdict.CLOSED, "answers_without_tunnel",
            "GET answered HTTP 200 but our canary's token did not come back: a web server or portal, not a proxy")
    assert ex.bodies == [b"<html>hi</html>"]


async def test_get_with_the_token_is_proven():
    # the token comes in the same packet as the head: the bytes after the blank line are part of the page
    async with LoopbackPeer(lambda received: (b"HTTP/1.1 200 OK\r\n\r\n" + TOKEN.encode() + b"\n", True)) as peer:
        ex = live(peer)
        await proxy.http_get(ex, TARGETS, CID, TOKEN)
    assert peer.received == GET_REQUEST and ex.bodies == [TOKEN.encode() + b"\n"]


POST_PAYLOAD = f"EHLO {CID}\r\nQUIT\r\n".encode()
POST_REQUEST = (f"POST http://192.0.2.10:2525/ HTTP/1.0\r\nHost: 192.0.2.10:2525\r\n"
                f"User-Agent: SecureYourServer-proxy-test\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(POST_PAYLOAD)}\r\n\r\n").encode() + POST_PAYLOAD


async def test_post_is_proven_by_the_mail_canary_answering_through_it():
    async with LoopbackPeer(lambda received: (b"220 canary ready\r\n250 " + TOKEN.encode() + b"\r\n", True)) as peer:
        ex = live(peer)
        await proxy.http_post(ex, TARGETS, CID, TOKEN)
    assert peer.received == POST_REQUEST


async def test_post_refused_is_reported_with_its_head_and_body():
    async with LoopbackPeer(lambda received: (b"HTTP/1.0 403 Forbidden\r\nServer: x\r\n\r\nno", True)) as peer:
        ex = live(peer)
        assert await finding_of(proxy.http_post(ex, TARGETS, CID, TOKEN)) == (
            Verdict.CLOSED, "destination_denied", "POST answered HTTP 403: the proxy refused our destination")
    assert ex.heads == [{":reason": "Forbidden", "server": "x"}] and ex.bodies == [b"no"]


CONNECT_TLS = (b"CONNECT 192.0.2.10:8443 HTTP/1.1\r\nHost: 192.0.2.10:8443\r\n"
               b"User-Agent: SecureYourServer-proxy-test\r\n\r\n")


def established(received: bytes) -> tuple[bytes, bool]:
    return (b"HTTP/1.1 200 Connection established\r\n\r\n", False) if received.endswith(b"\r\n\r\n") else (b"", False)


async def test_a_tls_tunnel_is_proven_by_the_tls_canary_page():
    page = b"HTTP/1.1 200 OK\r\n\r\n" + TOKEN.encode()
    async with LoopbackPeer(established, tls_after=CONNECT_TLS, tls_answer=lambda request: page) as peer:
        ex = live(peer)
        await proxy.connect_tls(ex, TARGETS, CID, TOKEN)
    assert peer.received == CONNECT_TLS  # no extra empty line: it would go into the TLS handshake
    assert peer.after_tls == (f"GET /canary/{CID} HTTP/1.1\r\nHost: 192.0.2.10:8443\r\nConnection: close\r\n\r\n"
                              .encode())
    assert "TLS with our canary established through the tunnel" in [line.text for line in ex.transcript.lines]


async def test_a_tls_tunnel_without_the_token_is_no_proof():
    async with LoopbackPeer(established, tls_after=CONNECT_TLS,
                            tls_answer=lambda request: b"HTTP/1.1 200 OK\r\n\r\nhello") as peer:
        ex = live(peer)
        assert await finding_of(proxy.connect_tls(ex, TARGETS, CID, TOKEN)) == (
            Verdict.CLOSED, "answers_without_tunnel", "our TLS canary's token did not come back")


async def test_bytes_before_the_tls_handshake_mean_no_tunnel():
    async with LoopbackPeer(lambda received: (b"HTTP/1.1 200 OK\r\n\r\n220 mail\r\n", False)) as peer:
        ex = live(peer)
        assert await finding_of(proxy.connect_tls(ex, TARGETS, CID, TOKEN)) == (
            Verdict.CLOSED, "answers_without_tunnel", "bytes came before our TLS handshake: no tunnel")


async def test_no_tls_through_the_tunnel_is_no_proof():
    async with LoopbackPeer(lambda received: (b"HTTP/1.1 200 OK\r\n\r\n", True)) as peer:
        ex = live(peer, step_timeout=0.5)
        verdict, reason, note = await finding_of(proxy.connect_tls(ex, TARGETS, CID, TOKEN))
    assert (verdict, reason) == (Verdict.CLOSED, "answers_without_tunnel")
    assert note.startswith("no TLS with our canary through the tunnel (") and note.endswith(")")


# --- one check: OPEN only when the runner returned, and the row it makes ------------------------------------
def canary_page(*sources: str):
    """A "proxy" that reaches our HTTP canary: it answers the token of the check id it was asked for, and the
    canary records `source` as where the request came from."""

    def answer(received: bytes) -> tuple[bytes, bool]:
        if not received.endswith(b"\r\n\r\n"):
            return b"", False
        check_id = received.split(b"/canary/", 1)[1].split(b" ", 1)[0].decode()
        for source in sources:
            CANARY.record(check_id, source, "http")
        return b"HTTP/1.1 200 OK\r\n\r\n" + CANARY.token(check_id).encode(), True

    return answer


@pytest.mark.parametrize("sources,where", [
    (("127.0.0.1",), "; our canary saw it arrive from 127.0.0.1 (your server's address)"),
    (("192.0.2.99",), "; our canary saw it arrive from 192.0.2.99"),
    (("192.0.2.99", "192.0.2.98"), "; our canary saw it arrive from 192.0.2.98, 192.0.2.99"),
    ((), ""),  # the token came back, but the canary did not see where from (e.g. the app's own route)
])
async def test_a_returned_token_is_open_and_says_where_the_canary_saw_it_arrive(sources, where):
    from support import Slots

    check = check_named("http_get")
    async with LoopbackPeer(canary_page(*sources)) as peer:
        ran = await proxy._run_check(check, Slots(), "127.0.0.1", peer.port, options())
    finding, ex = ran.finding, ran.ex
    assert (finding.verdict, finding.reason) == (Verdict.OPEN, "token_returned")
    assert finding.note == "HTTP GET (web): our canary's token came back through this port" + where
    texts = [line.text for line in ex.transcript.lines]
    assert texts[0] == f"HTTP GET: {check.explanation}"
    assert ex.writer is None  # the connection is closed


async def test_a_check_whose_runner_fails_is_an_error_not_a_verdict():
    from support import Slots

    async def broken(ex, targets, check_id, token):
        await ex.open()
        raise RuntimeError("boom " * 60)

    check = dataclasses.replace(check_named("http_get"), run=broken)
    async with LoopbackPeer(lambda received: (b"", False)) as peer:
        ran = await proxy._run_check(check, Slots(), "127.0.0.1", peer.port, options())
    finding, ex = ran.finding, ran.ex
    assert (finding.verdict, finding.reason) == (Verdict.ERROR, "internal_error")
    assert finding.note == f"the check failed: RuntimeError: {'boom ' * 60}"[:200]
    assert ex.writer is None


def test_the_row_of_a_check():
    check = check_named("connect_smtp")
    gate = Transcript()
    gate.info("connecting")
    transcript = gate.fork()  # shares the gate's opening
    transcript.info("line")
    fingerprint = {"product": "Squid", "version": None, "raw": "x"}
    exchange = Exchange("192.0.2.1", 3128, options(), transcript)
    opened = proxy._row(proxy._Ran(check, Finding(Verdict.OPEN, "token_returned", "note"), exchange), "192.0.2.1",
                        3128, fingerprint)
    assert (opened.service, opened.host, opened.port, opened.name, opened.verdict, opened.reason, opened.confirmed,
            opened.fingerprint, opened.transcript, opened.detail) == (
        "proxy", "192.0.2.1", 3128, "proxy.connect_smtp", Verdict.OPEN, "token_returned", True, fingerprint,
        transcript.lines, "note")
    assert opened.transcript[-1].text == "verdict: open (token_returned) - note"
    assert opened.opening is transcript.opening and opened.opening is not None
    closed = proxy._row(proxy._Ran(check, Finding(Verdict.CLOSED, "not_a_proxy", "n"), exchange), "192.0.2.1", 3128,
                        None)
    assert closed.confirmed is False and closed.fingerprint is None


# --- the token ends the wait; without it, the wait ends at the step timeout, named by what was awaited --------
async def test_get_stops_reading_at_the_token():
    async with LoopbackPeer(lambda received: (b"HTTP/1.1 200 OK\r\n\r\n" + TOKEN.encode(), False)) as peer:
        await asyncio.wait_for(proxy.http_get(live(peer, step_timeout=5.0), TARGETS, CID, TOKEN), 2.5)


async def test_post_stops_reading_at_the_token():
    async with LoopbackPeer(lambda received: (b"250 " + TOKEN.encode() + b"\r\n", False)) as peer:
        await asyncio.wait_for(proxy.http_post(live(peer, step_timeout=5.0), TARGETS, CID, TOKEN), 2.5)


async def test_a_page_that_never_ends_without_the_token_is_a_timeout():
    async with LoopbackPeer(lambda received: (b"HTTP/1.1 200 OK\r\n\r\nhello", False)) as peer:
        assert await finding_of(proxy.http_get(live(peer, step_timeout=0.3), TARGETS, CID, TOKEN)) == (
            Verdict.INCONCLUSIVE, "timeout", "no the page within 0.3 s")


async def test_a_post_without_any_reply_is_a_timeout():
    async with LoopbackPeer(lambda received: (b"", False)) as peer:
        assert await finding_of(proxy.http_post(live(peer, step_timeout=0.3), TARGETS, CID, TOKEN)) == (
            Verdict.INCONCLUSIVE, "timeout", "no a reply within 0.3 s")


@pytest.mark.parametrize("runner,what", [(proxy.http_get, "GET"), (proxy.http_post, "POST")])
async def test_a_500_that_could_not_connect_is_unreachable_not_closed(runner, what):
    async with LoopbackPeer(lambda received: (b"HTTP/1.1 500 Unable to connect\r\n\r\noops", True)) as peer:
        assert await finding_of(runner(live(peer), TARGETS, CID, TOKEN)) == (
            Verdict.INCONCLUSIVE, "destination_unreachable",
            f"{what} answered HTTP 500: the proxy could not reach our canary")


async def test_the_tls_page_stops_at_the_token():
    page = b"HTTP/1.1 200 OK\r\n\r\n" + TOKEN.encode()
    async with LoopbackPeer(established, tls_after=CONNECT_TLS, tls_answer=lambda request: page,
                            tls_hang_up=False) as peer:
        await asyncio.wait_for(proxy.connect_tls(live(peer, step_timeout=4.0), TARGETS, CID, TOKEN), 3.0)


async def test_a_tls_page_that_never_ends_without_the_token_is_a_timeout():
    async with LoopbackPeer(established, tls_after=CONNECT_TLS, tls_answer=lambda request: b"HTTP/1.1 200 OK\r\n\r\n",
                            tls_hang_up=False) as peer:
        assert await finding_of(proxy.connect_tls(live(peer, step_timeout=0.5), TARGETS, CID, TOKEN)) == (
            Verdict.INCONCLUSIVE, "timeout", "no our canary's page within 0.5 s")


async def test_a_tunnel_that_never_answers_the_tls_hello_is_no_proof():
    async with LoopbackPeer(established) as peer:
        finding = await asyncio.wait_for(finding_of(proxy.connect_tls(live(peer, step_timeout=0.3), TARGETS, CID,
                                                                      TOKEN)), 2)
    assert finding == (Verdict.CLOSED, "answers_without_tunnel",
                       "no TLS with our canary through the tunnel (TimeoutError)")


async def test_the_tls_check_needs_a_connection_of_its_own():
    ex, _peer = exchange()
    with pytest.raises(AssertionError):
        await proxy.connect_tls(ex, TARGETS, CID, TOKEN)


async def test_a_check_our_canary_saw_arrive_is_never_could_not_reach():
    """The runner ends without the token, but our canary recorded the check's id: reached, answer not returned."""
    from support import Slots

    async def relayed_then_502(ex, targets, check_id, token):
        await ex.open()
        for source in ("192.0.2.9", "192.0.2.8"):
            targets.canary.record(check_id, source, "smtp")
        raise Ended.of(proxy.http_status_finding(502, {":reason": "Bad Gateway"}, "POST"))

    check = dataclasses.replace(check_named("http_post"), run=relayed_then_502)
    async with LoopbackPeer(lambda received: (b"", False)) as peer:
        ran = await proxy._run_check(check, Slots(), "127.0.0.1", peer.port, options())
    assert (ran.finding.verdict, ran.finding.reason) == (Verdict.INCONCLUSIVE, "answer_not_returned")
    assert ran.finding.note == ("our canary saw this check arrive from 192.0.2.8, 192.0.2.9: the port passed our "
                                "request on, but our canary's answer did not come back through it (POST answered "
                                "HTTP 502)")
