"""Server hygiene against a real `secure-your-server serve` (issue 10, part 7): slow and idle connections, oversized
heads and bodies, event streams. Attackers connect from other loopback addresses (127.0.0.2 and up) than the
visitor whose `/healthz` must keep answering (127.0.0.1). Every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import select
import socket
import time

import httpx
import pytest
from support import ServedSite

HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # never finished


async def connect(site: ServedSite, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", site.port, local_addr=(source, 0)), 5)


async def closed_after(reader: asyncio.StreamReader, start: float, seconds: float) -> float | None:
    """Seconds from `start` until the server closed the connection (None: still open after `seconds`)."""
    try:
        while await asyncio.wait_for(reader.read(65536), seconds):  # bounded by the wait
            pass
    except asyncio.TimeoutError:
        return None
    except ConnectionError:
        pass
    return time.monotonic() - start


async def still_open(reader: asyncio.StreamReader) -> bool:
    """True if the server has not closed the connection (what it sent so far is read and dropped)."""
    for _ in range(20):  # bounded: a stream sends little
        try:
            if not await asyncio.wait_for(reader.read(65536), 0.2):
                return False
        except asyncio.TimeoutError:
            return True
        except ConnectionError:
            return False
    return True


async def healthz_seconds(site: ServedSite, timeout: float = 5.0) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=timeout) as client:
        response = await client.get(site.url + "/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    return time.monotonic() - started


def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()


# --- the request-head timeout ------------------------------------------------------------------------------------
def test_half_sent_requests_are_closed_after_the_head_timeout(tmp_path):
    timeout = 2.0
    env = {"SECURE_REQUEST_HEAD_TIMEOUT": str(timeout), "SECURE_MAX_CONNECTIONS_PER_PEER": "100"}

    async def attack(site: ServedSite) -> None:
        sources = [f"127.0.0.{2 + i % 4}" for i in range(200)]  # 4 addresses x 50, under the per-address cap
        pairs = await asyncio.gather(*(connect(site, source) for source in sources))
        for _reader, writer in pairs:
            writer.write(HALF_REQUEST)
        start = time.monotonic()

        async def trickle(writer: asyncio.StreamWriter) -> None:
            for _ in range(int(timeout * 4)):  # a byte every 0.25 s: sending keeps no connection alive
                await asyncio.sleep(0.25)
                if writer.is_closing():
                    return
                try:
                    writer.write(b"x")
                except ConnectionError:
                    return

        trickles = [asyncio.create_task(trickle(writer)) for _reader, writer in pairs[:50]]
        answered = await healthz_seconds(site)  # while all 200 are held
        closes = await asyncio.gather(*(closed_after(reader, start, timeout + 5) for reader, _w in pairs))
        await asyncio.gather(*trickles, return_exceptions=True)
        close_all([writer for _r, writer in pairs])
        print(f"200 half-sent requests: closed after {min(closes or [0]):.2f}..{max(c or 99 for c in closes):.2f} s "
              f"(timeout {timeout} s); /healthz answered in {answered:.3f} s while they were held")
        assert answered < 3.0
        assert all(c is not None for c in closes), f"{closes.count(None)} of 200 still open"
        assert min(closes) > timeout - 0.5 and max(closes) < timeout + 2  # closed by the timer, not earlier

    with ServedSite(tmp_path, env) as site:
        asyncio.run(attack(site))


def test_a_keep_alive_connection_gets_the_same_bound_for_its_next_request(tmp_path):
    env = {"SECURE_REQUEST_HEAD_TIMEOUT": "1.5", "SECURE_KEEP_ALIVE_TIMEOUT": "30"}

    async def scenario(site: ServedSite) -> None:
        reader, writer = await connect(site, "127.0.0.2")
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        writer.write(HALF_REQUEST)  # the second request on the connection never finishes
        closed = await closed_after(reader, start, 6)
        writer.close()
        assert closed is not None and 1.0 < closed < 3.5, closed

    with ServedSite(tmp_path, env) as site:
        asyncio.run(scenario(site))


# --- idle connections against a small descriptor limit ----------------------------------------------------------
# the bounds leave room for a loaded CI machine: on the old main /healthz did not answer at all (5 s timeout)
async def healthz_while_held(site: ServedSite, pairs: list) -> tuple[float, list, int]:
    """How fast /healthz answers while `pairs` are held, which of them the site closed within 3 s, how many stayed
    open; then closes them all."""
    start = time.monotonic()
    answered = await healthz_seconds(site)
    closes = await asyncio.gather(*(closed_after(reader, start, 3.0) for reader, _w in pairs))
    close_all([writer for _r, writer in pairs])
    return answered, closes, sum(c is None for c in closes)


def test_idle_connections_do_not_starve_the_site_with_128_descriptors(tmp_path):
    env = {"SECURE_REQUEST_HEAD_TIMEOUT": "30"}  # long: the caps, not the timer, must keep the site answering

    async def attack(site: ServedSite) -> None:
        # one address: the per-address cap (32) closes the rest at once
        pairs = await asyncio.gather(*(connect(site, "127.0.0.2") for _ in range(150)))
        answered, closes, still_open = await healthz_while_held(site, pairs)
        print(f"150 idle connections from one address, ulimit -n 128: {still_open} kept open, "
              f"/healthz answered in {answered:.3f} s")
        assert answered < 3.0 and still_open == 32
        await asyncio.sleep(0.3)

        # 15 addresses x 10: the total cap (128 - 64 descriptors kept = 64) evicts the oldest idle ones
        sources = [f"127.0.0.{10 + i % 15}" for i in range(150)]
        pairs = []
        for source in sources:  # one by one, so that the oldest are the first ones
            pairs.append(await connect(site, source))
        answered, closes, still_open = await healthz_while_held(site, pairs)
        print(f"150 idle connections from 15 addresses, ulimit -n 128: {still_open} kept open, "
              f"/healthz answered in {answered:.3f} s")
        assert answered < 3.0 and still_open <= 64
        assert closes[-1] is None and closes[0] is not None  # the oldest made room, the newest stay

    with ServedSite(tmp_path, env, open_files=128) as site:
        asyncio.run(attack(site))


# --- oversized heads and bodies ----------------------------------------------------------------------------------
def test_an_oversized_request_head_is_refused(tmp_path):
    with ServedSite(tmp_path, {"SECURE_MAX_HEADER_BYTES": "4096"}) as site:
        response = httpx.get(site.url + "/healthz", headers={"X-Big": "a" * 8000}, timeout=5)
        assert response.status_code == 431
        # the same head in small pieces: refused once the unfinished head passes the cap
        sock = socket.create_connection(("127.0.0.1", site.port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _piece in range(10):
            # stop once the server answered: writing on after its close would meet a reset, and a reset can
            # discard its answer before we read it
            if select.select([sock], [], [], 0.2)[0]:
                break
            try:
                sock.sendall(b"X-Piece: " + b"a" * 800 + b"\r\n")
            except OSError:
                break
        answer = sock.recv(4096)
        sock.close()
        assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 431")), answer  # ours, or h11's own cap
        response = httpx.get(site.url + "/healthz", headers={"X-Small": "a" * 2000}, timeout=5)
        assert response.status_code == 200


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def send_chunked(port: int, total: int) -> tuple[bytes, int]:
    """POST a chunked body of up to `total` bytes, as fast as the server takes it, until it answers."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
    sock.sendall(b"POST /api/v1/audits HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = memoryview(b"%x\r\n%s\r\n" % (65536, b"[" * 65536))
    sent = position = 0
    deadline = time.monotonic() + 20
    try:
        while sent < total and time.monotonic() < deadline:  # bounded in bytes and time
            readable, writable, _ = select.select([sock], [sock], [], 1)
            if readable:
                break
            if writable:
                count = sock.send(chunk[position:])
                sent += count
                position = (position + count) % len(chunk)
    except ConnectionError:
        pass
    answer = b""
    try:  # the head and the body may come in separate segments: read until the server closes (bounded)
        sock.settimeout(2)
        for _ in range(16):
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    except (ConnectionError, TimeoutError):
        pass
    sock.close()
    return answer, sent


def test_a_20_mb_chunked_body_is_413_and_memory_stays_flat(tmp_path):
    with ServedSite(tmp_path, {}) as site:
        httpx.get(site.url + "/api/v1/reasons", timeout=5)  # warm up what a request loads
        before = rss_kib(site.process.pid)
        answer, sent = send_chunked(site.port, 20 * 2**20)
        after = rss_kib(site.process.pid)
        status_line = answer.split(b"\r\n", 1)[0]
        print(f"20 MiB chunked body: answered {status_line!r} after {sent / 2**20:.2f} MiB "
              f"were accepted by the socket; RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")
        assert answer.startswith(b"HTTP/1.1 413") and b'"detail"' in answer
        assert after - before < 4 * 1024


def test_a_declared_60_mb_body_is_413_at_once(tmp_path):
    async def declare(site: ServedSite) -> tuple[bytes, float]:
        reader, writer = await connect(site, "127.0.0.2")
        start = time.monotonic()
        writer.write(b"POST /api/v1/audits/self HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n{" % (60 * 2**20))
        answer = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        return answer, time.monotonic() - start

    with ServedSite(tmp_path, {}) as site:
        before = rss_kib(site.process.pid)
        answer, seconds = asyncio.run(declare(site))
        assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
        assert rss_kib(site.process.pid) - before < 4 * 1024 and seconds < 1


# --- event streams ---------------------------------------------------------------------------------------------
async def open_stream(site: ServedSite, source: str, audit_id: str):
    reader, writer = await connect(site, source)
    writer.write(f"GET /api/v1/audits/{audit_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return int(head.split()[1]), head.decode("latin-1").lower(), reader, writer


def test_event_streams_are_capped_per_requester_and_in_total(tmp_path, refused_port, silent_port):
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(refused_port),
           "SECURE_PROXY_PORTS": str(silent_port), "SECURE_CONNECT_TIMEOUT": "60",  # the audit keeps running
           "SECURE_MAX_EVENT_STREAMS": "6", "SECURE_REQUEST_HEAD_TIMEOUT": "1"}

    async def scenario(site: ServedSite, audit_id: str) -> None:
        first = await asyncio.gather(*(open_stream(site, "127.0.0.1", audit_id) for _ in range(6)))
        statuses = sorted(status for status, *_ in first)
        assert statuses == [200, 200, 200, 200, 429, 429], statuses  # 4 per requester
        refused = next(head for status, head, *_ in first if status == 429)
        assert "retry-after: 10" in refused and "application/json" in refused
        second = [await open_stream(site, "127.0.0.2", audit_id) for _ in range(2)]
        third = await open_stream(site, "127.0.0.3", audit_id)
        assert [s for s, *_ in second] == [200, 200] and third[0] == 429  # 6 on the whole site
        await asyncio.sleep(1.5)  # past the head timeout: a stream is the app's time, it stays open
        held = [entry for entry in first + second if entry[0] == 200]
        for _status, _head, reader, _writer in held:
            assert await still_open(reader)
        held[0][3].close()  # one stream ends: its slot is given back
        await asyncio.sleep(0.3)
        again = await open_stream(site, "127.0.0.3", audit_id)
        assert again[0] == 200
        close_all([entry[3] for entry in first + second + [third, again]])

    with ServedSite(tmp_path, env) as site:
        response = httpx.post(site.url + "/api/v1/audits/self", json={"checks": ["proxy"]}, timeout=5)
        assert response.status_code == 202, response.text
        asyncio.run(scenario(site, response.json()["id"]))


@pytest.mark.parametrize("origin", ["https://evil.example"])
def test_a_cross_site_post_to_a_real_serve_is_403_and_curl_works(tmp_path, origin, refused_port):
    env = {"SECURE_ALLOW_NETWORKS": "127.0.0.0/8", "SECURE_RELAY_PORTS": str(refused_port), "SECURE_PROXY_PORTS": ""}
    with ServedSite(tmp_path, env) as site:
        forged = httpx.post(site.url + "/api/v1/audits/self",
                            headers={"Origin": origin, "Sec-Fetch-Site": "cross-site"}, timeout=5)
        assert forged.status_code == 403 and forged.json()["detail"]
        assert forged.headers["x-content-type-options"] == "nosniff"  # the security headers are on it too
        assert httpx.post(site.url + "/api/v1/audits/self", timeout=5).status_code == 202


def test_serve_hands_uvicorn_the_limits(monkeypatch):
    import resource

    from app import serving
    from app.config import Settings

    settings = Settings(max_http_connections=1000, keep_alive_timeout=3, max_header_bytes=8192)
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (128, 4096))
    options = serving.uvicorn_options(settings)
    assert options["http"].max_connections == 64  # 128 descriptors minus the 64 kept for the rest
    assert options["limit_concurrency"] == 65 and options["timeout_keep_alive"] == 3
    assert options["h11_max_incomplete_event_size"] == 8192 and options["http"].max_head == 8192
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1 << 20, 1 << 20))
    assert serving.uvicorn_options(settings)["http"].max_connections == 1000
