"""Our canaries (app/probes/canary.py), pinned where mutants survived `make mutation`.

A proxy is `open` only when a canary's token comes back through it, so the token's making, what each canary
answers to exactly what, and the record of who reached it are pinned here. Loopback only.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac

import pytest

from app.probes import canary as canary_module
from app.probes.canary import CHECK_ID, MAX_LINES, Canary, HttpCanary, SmtpCanary

SECRET = "test-secret"
CID = "cid0123456789abcdef"


def test_check_ids_are_fresh_well_formed_and_ours():
    canary = Canary(SECRET)
    ids = {canary.new_check_id() for _ in range(50)}
    assert len(ids) == 50 and all(CHECK_ID.match(i) and canary.issued(i) for i in ids)
    one = next(iter(ids))
    assert not Canary("other").issued(one)  # another secret did not issue it
    assert not canary.issued(CID)  # well formed, but not ours
    assert not canary.issued(one[:-1] + ("0" if one[-1] != "0" else "1"))  # one digit of the MAC changed
    assert not canary.issued(one + "0") and not canary.issued("x" + one[1:])


async def test_only_ids_we_issued_reach_the_shared_journal():
    written = []

    class Journal:
        async def record_observation(self, kind, key, source="", via=""):
            written.append(key)

        async def observed(self, kind, keys):
            return {}

    canary = Canary(SECRET, journal=Journal())
    ours = canary.new_check_id()
    await canary.note(CID, "192.0.2.1", "http")  # a stranger's request for a well-formed id
    await canary.note(ours, "192.0.2.1", "http")
    assert written == [ours]
    assert canary.seen_from(CID) == ["192.0.2.1"]  # still seen by this process (bounded in memory)


def test_the_token_is_an_hmac_of_the_check_id_under_a_key_of_its_own():
    key = hashlib.sha256(b"canary:" + SECRET.encode()).digest()
    expected = "tok" + hmac.new(key, CID.encode(), hashlib.sha256).hexdigest()[:32]
    assert Canary(SECRET).token(CID) == expected
    assert Canary("other").token(CID) != expected
    assert Canary(SECRET).token("cid0123456789abcdee") != expected


def test_the_record_keeps_at_most_20_sources_per_check_and_only_check_ids():
    canary = Canary(SECRET)
    canary.record("not-a-check-id", "192.0.2.1", "http")
    assert not canary.sources
    for n in range(25):
        canary.record(CID, f"192.0.2.{n}", "smtp")
    assert len(canary.sources[CID]) == 20
    assert canary.sources[CID][0][:2] == ("192.0.2.0", "smtp")
    assert canary.seen_from(CID) == sorted(f"192.0.2.{n}" for n in range(20))
    assert canary.seen_from("cid" + "f" * 16) == []


def test_the_record_forgets_the_least_recently_seen_check(monkeypatch):
    monkeypatch.setattr(canary_module, "MAX_REMEMBERED", 2)
    canary = Canary(SECRET)
    a, b, c = ("cid" + ch * 16 for ch in "abc")
    canary.record(a, "192.0.2.1", "http")
    canary.record(b, "192.0.2.1", "http")
    canary.record(a, "192.0.2.2", "http")  # a is seen again: b is now the oldest
    canary.record(c, "192.0.2.1", "http")
    assert list(canary.sources) == [a, c]


def test_the_record_of_connections_is_bounded(monkeypatch):
    monkeypatch.setattr(canary_module, "MAX_REMEMBERED", 3)
    canary = Canary(SECRET)
    for n in range(5):
        canary.connected(f"192.0.2.{n}", "smtp")
    assert [c[0] for c in canary.connections] == ["192.0.2.2", "192.0.2.3", "192.0.2.4"]


def test_seen_from_names_each_source_once():
    canary = Canary(SECRET)
    for source in ("192.0.2.9", "192.0.2.1", "192.0.2.9"):
        canary.record(CID, source, "http")
    assert canary.seen_from(CID) == ["192.0.2.1", "192.0.2.9"]


# --- the SMTP canary ---------------------------------------------------------------------------------------
async def smtp_dialogue(lines: list[bytes], read: int) -> tuple[list[bytes], Canary]:
    canary = Canary(SECRET)
    server = SmtpCanary(canary)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for line in lines:
            writer.write(line)
        await writer.drain()
        replies = [await asyncio.wait_for(reader.readline(), 5) for _ in range(read)]
        try:
            replies.append(await asyncio.wait_for(reader.read(), 5))  # what comes before the canary hangs up
        except ConnectionResetError:  # it hung up on bytes it had not read
            replies.append(b"")
        writer.close()
    finally:
        await server.stop()
    return replies, canary


async def test_the_smtp_canary_answers_ehlo_and_helo_with_the_token():
    replies, canary = await smtp_dialogue([f"ehlo {CID}\r\n".encode(), b"\r\n", f"HELO {CID}\r\n".encode(),
                                           b"QUIT\r\n"], 4)
    token = canary.token(CID).encode()
    assert replies == [b"220 canary ready\r\n", b"250 " + token + b"\r\n", b"250 " + token + b"\r\n",
                       b"221 bye\r\n", b""]
    assert canary.sources[CID][0][:2] == ("127.0.0.1", "smtp")
    assert [c[:2] for c in canary.connections] == [("127.0.0.1", "smtp")]


@pytest.mark.parametrize("line", [f"EHLO {CID} extra\r\n", "EHLO cid0123\r\n", "MAIL FROM:<a@b>\r\n", "EHLO\r\n"])
async def test_the_smtp_canary_answers_nothing_else(line):
    replies, canary = await smtp_dialogue([line.encode(), b"QUIT\r\n"], 3)
    assert replies[1] == b"502 5.5.2 this server only answers EHLO\r\n"
    assert replies[2] == b"221 bye\r\n" and not canary.sources


async def test_the_smtp_canary_hangs_up_after_its_line_limit():
    replies, _canary = await smtp_dialogue([b"NOOP\r\n"] * (MAX_LINES + 5), 1)
    rest = replies[1].split(b"\r\n")
    assert rest.count(b"502 5.5.2 this server only answers EHLO") == MAX_LINES


async def test_the_smtp_canary_hangs_up_on_an_overlong_line():
    replies, canary = await smtp_dialogue([b"EHLO " + b"x" * 3000 + b"\r\n", f"EHLO {CID}\r\n".encode()], 1)
    assert replies[1] == b"" and not canary.sources


# --- the HTTP canary ---------------------------------------------------------------------------------------
async def http_exchange(request: bytes, via: str = "http") -> tuple[bytes, Canary]:
    canary = Canary(SECRET)
    server = HttpCanary(canary, via)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    finally:
        await server.stop()
    return answer, canary


def response(status: bytes, body: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nConnection: close\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


@pytest.mark.parametrize("request_line", [f"GET /canary/{CID} HTTP/1.1", f"HEAD /canary/{CID} HTTP/1.0",
                                          f"POST http://192.0.2.1:8080/canary/{CID} HTTP/1.1"])
async def test_the_http_canary_answers_the_token(request_line):
    answer, canary = await http_exchange(request_line.encode() + b"\r\nHost: x\r\nUser-Agent: y\r\n\r\n", "tls")
    assert answer == response(b"200 OK", canary.token(CID).encode() + b"\n")
    assert canary.sources[CID][0][:2] == ("127.0.0.1", "tls")
    assert [c[:2] for c in canary.connections] == [("127.0.0.1", "tls")]


@pytest.mark.parametrize("request_line", [b"GET /canary/cid0123 HTTP/1.1", b"GET / HTTP/1.1",
                                          f"DELETE /canary/{CID} HTTP/1.1".encode(),
                                          f"GET /canary/{CID} HTTP/2.0".encode(),
                                          f"GET /canary/{CID} HTTP/1.1 ".encode(),  # the exact request line only
                                          f"GET /canary/{CID} HTTP/1.1X".encode()])
async def test_the_http_canary_answers_404_to_anything_else(request_line):
    answer, canary = await http_exchange(request_line + b"\r\n\r\n")
    assert answer == response(b"404 Not Found", b"not found\n") and not canary.sources


async def test_only_the_newline_is_taken_off_the_request_line():
    answer, canary = await http_exchange(f"GET /canary/{CID} HTTP/1.1X\n\n".encode())
    assert answer == response(b"404 Not Found", b"not found\n") and not canary.sources


async def test_a_bare_newline_ends_the_headers():
    answer, canary = await http_exchange(f"GET /canary/{CID} HTTP/1.1\nHost: x\nUser-Agent: y\n\n".encode())
    assert answer == response(b"200 OK", canary.token(CID).encode() + b"\n")


async def test_the_http_canary_reads_past_many_headers_and_bare_newlines():
    headers = b"".join(b"X-H%d: v\n" % n for n in range(MAX_LINES - 1))
    answer, canary = await http_exchange(f"GET /canary/{CID} HTTP/1.1\n".encode() + headers + b"\n")
    assert answer == response(b"200 OK", canary.token(CID).encode() + b"\n")


async def test_the_smtp_canary_answers_a_line_that_is_not_ascii():
    replies, _canary = await smtp_dialogue([b"\xff\xfe hello\r\n", b"QUIT\r\n"], 3)
    assert replies[1:] == [b"502 5.5.2 this server only answers EHLO\r\n", b"221 bye\r\n", b""]


async def silent_client(server, monkeypatch, send: bytes = b"") -> bytes:
    """Connect, send `send` and then nothing: what the canary says before it hangs up (READ_TIMEOUT made short)."""
    monkeypatch.setattr(canary_module, "READ_TIMEOUT", 0.2)
    port = await server.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(send)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 3)
        writer.close()
    finally:
        await server.stop()
    return answer


async def test_a_silent_client_cannot_hold_the_smtp_canary(monkeypatch):
    assert await silent_client(SmtpCanary(Canary(SECRET)), monkeypatch) == b"220 canary ready\r\n"


async def test_a_silent_client_cannot_hold_the_http_canary(monkeypatch):
    assert await silent_client(HttpCanary(Canary(SECRET)), monkeypatch) == b""


async def test_the_http_canary_answers_only_after_the_headers(monkeypatch):
    canary = Canary(SECRET)
    answer = await silent_client(HttpCanary(canary), monkeypatch, f"GET /canary/{CID} HTTP/1.1\r\nHost: x\r\n".encode())
    assert answer == b"" and not canary.sources
