"""The proxy fixtures themselves: real Squid, Dante, microsocks, tinyproxy, Apache, nginx, Privoxy and HAProxy on
loopback answer as their kind says.

Clients here are raw sockets from the standard library (no app code), talking to a tiny asyncio "target" (greets
with `220 target ready`, echoes lines) and a tiny HTTP server, both on 127.0.0.1. Every destination is 127.0.0.1
(or 127.0.0.2, where nothing listens, to prove the fences). Each test stops its instances.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pytest
from support import skip_or_fail

from servers.proxies import (
    FENCE_RESOLV,
    PACKAGES,
    ProxyInstance,
    ProxySet,
    ProxyUnavailable,
    available,
    start_apache,
    start_dante,
    start_haproxy,
    start_microsocks,
    start_nginx,
    start_privoxy,
    start_squid,
    start_tinyproxy,
)

BANNER = b"220 target ready\r\n"
IO_TIMEOUT = 5.0


def _require(binary: str) -> None:
    try:
        available(binary)
    except ProxyUnavailable as exc:
        skip_or_fail(str(exc))


# --- loopback servers the proxies reach ------------------------------------------------------------------------

class Target:
    """An asyncio TCP server on 127.0.0.1 (in its own thread) that greets and echoes lines; records its peers."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, int]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._handle, "127.0.0.1", 0), self._loop).result(timeout=5)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[:2])
        try:
            writer.write(BANNER)
            await writer.drain()
            for _ in range(100):  # bounded
                line = await asyncio.wait_for(reader.readline(), timeout=10)
                if not line:
                    break
                writer.write(line)
                await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            await asyncio.wait_for(self._server.wait_closed(), timeout=5)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=6)
        except Exception:  # noqa: BLE001 - open handler connections: the loop goes anyway
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's hook name
        body = f"hello from {self.path}\n".encode()
        self.server.requests.append((self.client_address[0], self.path))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def target() -> Iterator[Target]:
    server = Target()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def target2() -> Iterator[Target]:
    server = Target()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def http_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests = []  # type: ignore[attr-defined]
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Callable[..., ProxyInstance]]:
    """Start instances with start_* functions; all are stopped (and checked gone) after the test."""
    instances: list[ProxyInstance] = []

    def start(function: Callable[..., ProxyInstance], *args, **kwargs) -> ProxyInstance:
        binary = {start_squid: "squid", start_dante: "danted", start_microsocks: "microsocks",
                  start_tinyproxy: "tinyproxy", start_apache: "apache2", start_nginx: "nginx",
                  start_privoxy: "privoxy", start_haproxy: "haproxy"}[function]
        _require(binary)
        t0 = time.monotonic()
        instance = function(tmp_path, *args, **kwargs)
        instances.append(instance)
        print(f"{instance.name}: started in {time.monotonic() - t0:.3f} s (listening after "
              f"{instance.start_seconds:.3f} s) on 127.0.0.1:{instance.port}, dns_fenced={instance.dns_fenced}")
        _assert_loopback_only(instance)
        return instance

    try:
        yield start
    finally:
        for instance in instances:
            instance.stop()
            print(f"{instance.name}: stopped in {instance.stop_seconds:.3f} s")
        for instance in instances:
            _assert_gone(instance)


def _wait_log(instance: ProxyInstance, needle: str, seconds: float = 5.0) -> str:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 1):  # bounded
        text = instance.log()
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)
    return instance.log()


def _assert_loopback_only(instance: ProxyInstance) -> None:
    sockets = instance.sockets()
    assert ("tcp", "127.0.0.1", instance.port, "LISTEN") in sockets, sockets
    assert all(address == "127.0.0.1" for _, address, _, _ in sockets), sockets


def _assert_gone(instance: ProxyInstance) -> None:
    assert not instance.running()
    assert instance.pids() == [], f"{instance.name} left processes {instance.pids()}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", instance.port), timeout=2).close()


# --- a raw-socket client -----------------------------------------------------------------------------------------

class Conn:
    """One TCP connection to a proxy on 127.0.0.1 that keeps every recv() chunk (to see how replies are split)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.buffer = b""
        self.chunks: list[bytes] = []
        self.eof = False

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fill(self, done: Callable[[bytes], bool], timeout: float = IO_TIMEOUT) -> bytes:
        """Receive until done(buffer), EOF or timeout (bounded); returns the buffer."""
        deadline = time.monotonic() + timeout
        for _ in range(1000):
            if done(self.buffer) or self.eof:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            self.chunks.append(chunk)
            self.buffer += chunk
        return self.buffer

    def take(self, n: int, timeout: float = IO_TIMEOUT) -> bytes:
        self.fill(lambda b: len(b) >= n, timeout)
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def take_until(self, marker: bytes, timeout: float = IO_TIMEOUT) -> bytes:
        self.fill(lambda b: marker in b, timeout)
        if marker not in self.buffer:
            data, self.buffer = self.buffer, b""
            return data
        end = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def closed_by_peer(self, timeout: float = 2.0) -> bool:
        self.fill(lambda b: False, timeout)
        return self.eof

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Conn":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _http_head(conn: Conn) -> tuple[str, dict[str, str]]:
    head = conn.take_until(b"\r\n\r\n").decode("latin-1")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            key, value = line.split(":", 1)
            headers[key.strip().lower()] = value.strip()
    return lines[0], headers


def _connect(proxy: ProxyInstance, host: str, port: int) -> tuple[Conn, str, dict[str, str]]:
    conn = Conn(proxy.port)
    conn.send(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    status, headers = _http_head(conn)
    return conn, status, headers


def _tunnel_works(conn: Conn) -> None:
    assert conn.take_until(b"\r\n") == BANNER
    conn.send(b"ping through the tunnel\r\n")
    assert conn.take_until(b"\r\n") == b"ping through the tunnel\r\n"


def _get(proxy: ProxyInstance, url: str) -> tuple[str, dict[str, str], bytes]:
    with Conn(proxy.port) as conn:
        host = url.split("/")[2]
        conn.send(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        status, headers = _http_head(conn)
        length = int(headers.get("content-length", "0"))
        body = conn.take(length) if length else conn.fill(lambda b: False, 2.0)
    return status, headers, body


def _socks5_connect(port: int, address: bytes, dst_port: int, *, atyp: int = 1) -> tuple[Conn, bytes, bytes]:
    """SOCKS5 no-auth greeting and CONNECT; returns the connection, the method reply and the CONNECT reply."""
    conn = Conn(port)
    conn.send(b"\x05\x01\x00")
    method = conn.take(2)
    if method != b"\x05\x00":
        return conn, method, b""
    if atyp == 3:
        address = bytes([len(address)]) + address
    conn.send(b"\x05\x01\x00" + bytes([atyp]) + address + struct.pack(">H", dst_port))
    head = conn.take(4)
    if len(head) < 4:
        return conn, method, head
    if head[3] == 3:  # BND.ADDR as a name: length byte, name, port
        size = conn.take(1)
        return conn, method, head + size + (conn.take(size[0] + 2) if size else b"")
    return conn, method, head + conn.take({1: 6, 4: 18}.get(head[3], 0))


def _socks4_connect(port: int, address: bytes, dst_port: int) -> tuple[Conn, bytes]:
    conn = Conn(port)
    conn.send(b"\x04\x01" + struct.pack(">H", dst_port) + address + b"\x00")
    return conn, conn.take(8)


LOCAL = socket.inet_aton("127.0.0.1")
LOCAL2 = socket.inet_aton("127.0.0.2")  # loopback, nothing listens there: proves the fences


# --- Squid -----------------------------------------------------------------------------------------------------

def test_squid_open_connect_and_get(started, target: Target, http_server) -> None:
    squid = started(start_squid, "open")
    conn, status, headers = _connect(squid, "127.0.0.1", target.port)
    with conn:
        assert status == "HTTP/1.1 200 Connection established"
        assert headers == {}
        _tunnel_works(conn)
    assert target.peers and all(host == "127.0.0.1" for host, _ in target.peers)

    status, headers, body = _get(squid, f"http://127.0.0.1:{http_server.server_port}/x")
    assert status == "HTTP/1.1 200 OK"
    assert body == b"hello from /x\n"
    assert headers["via"].startswith("1.1 squid-test.invalid (squid/")
    assert http_server.requests == [("127.0.0.1", "/x")]  # type: ignore[attr-defined]

    # the fence: 127.0.0.2 (loopback, nothing listens) is outside 127.0.0.1/32, denied before any connection
    conn, status, headers = _connect(squid, "127.0.0.2", target.port)
    conn.close()
    assert status == "HTTP/1.1 403 Forbidden"
    assert headers["x-squid-error"] == "ERR_ACCESS_DENIED 0"
    conf = squid.config_file.read_text()
    access = [line for line in conf.splitlines() if line.startswith("http_access")]
    assert access == ["http_access deny !to_loopback", "http_access allow all"]
    assert "acl to_loopback dst 127.0.0.1/32" in conf and "tcp_outgoing_address 127.0.0.1" in conf
    log = _wait_log(squid, "TCP_DENIED/403")  # Squid logs a transaction when it ends
    assert "TCP_TUNNEL/200" in log and "TCP_DENIED/403" in log, log


def test_squid_closed_answers_403(started, target: Target, http_server) -> None:
    squid = started(start_squid, "closed")
    conn, status, headers = _connect(squid, "127.0.0.1", target.port)
    with conn:
        assert status == "HTTP/1.1 403 Forbidden"
        assert headers["server"].startswith("squid/")
        assert headers["x-squid-error"] == "ERR_ACCESS_DENIED 0"
        assert headers["via"].startswith("1.1 squid-test.invalid (squid/")
        assert headers["content-type"] == "text/html;charset=utf-8"
        assert headers["connection"] == "keep-alive"
        body = conn.take(int(headers["content-length"]))
        assert b"ERR_ACCESS_DENIED" in body
    status, headers, _ = _get(squid, f"http://127.0.0.1:{http_server.server_port}/x")
    assert status == "HTTP/1.1 403 Forbidden"
    assert target.peers == [] and http_server.requests == []  # type: ignore[attr-defined]


def test_squid_ssl_only(started, target: Target, target2: Target, http_server) -> None:
    squid = started(start_squid, "ssl_only", ssl_ports=[target2.port])
    conn, status, _ = _connect(squid, "127.0.0.1", target2.port)
    with conn:
        assert status == "HTTP/1.1 200 Connection established"
        _tunnel_works(conn)
    conn, status, headers = _connect(squid, "127.0.0.1", target.port)
    conn.close()
    assert status == "HTTP/1.1 403 Forbidden"
    assert headers["x-squid-error"] == "ERR_ACCESS_DENIED 0"
    assert target.peers == []
    # GET to a high port is allowed by the stock Safe_ports (1025-65535)
    status, _, body = _get(squid, f"http://127.0.0.1:{http_server.server_port}/y")
    assert status == "HTTP/1.1 200 OK" and body == b"hello from /y\n"
    assert f"acl SSL_ports port 443 {target2.port}" in squid.config_file.read_text()


# --- Dante -----------------------------------------------------------------------------------------------------

def test_dante_socks5_and_socks4(started, target: Target) -> None:
    dante = started(start_dante)
    conn, method, reply = _socks5_connect(dante.port, LOCAL, target.port)
    with conn:
        assert method == b"\x05\x00"
        assert reply[:8] == b"\x05\x00\x00\x01\x7f\x00\x00\x01"  # BND.ADDR 127.0.0.1, BND.PORT its own port
        _tunnel_works(conn)

    conn, reply = _socks4_connect(dante.port, LOCAL, target.port)
    with conn:
        assert reply[:2] == b"\x00\x5a" and reply[4:] == LOCAL
        _tunnel_works(conn)
    assert len(target.peers) == 2 and all(host == "127.0.0.1" for host, _ in target.peers)

    # the fence: 127.0.0.2 is not 127.0.0.1/32 -> "not allowed by ruleset", no connection attempted
    conn, method, reply = _socks5_connect(dante.port, LOCAL2, target.port)
    with conn:
        assert reply == b"\x05\x02\x00\x01" + LOCAL2 + struct.pack(">H", target.port)
        assert conn.closed_by_peer()
    conn, reply = _socks4_connect(dante.port, LOCAL2, target.port)
    with conn:
        assert reply == b"\x00\x5b" + struct.pack(">H", target.port) + LOCAL2
    assert len(target.peers) == 2
    assert "block(" in _wait_log(dante, "block(") and "to: 127.0.0.1/32" in dante.config_file.read_text()

    # a client offering only username/password gets "no acceptable methods"
    with Conn(dante.port) as conn:
        conn.send(b"\x05\x01\x02")
        assert conn.take(2) == b"\x05\xff"


# --- microsocks ------------------------------------------------------------------------------------------------

def test_microsocks_with_and_without_login(started, target: Target) -> None:
    locked = started(start_microsocks, "alice", "s3cret")
    with Conn(locked.port) as conn:
        conn.send(b"\x05\x01\x00")
        assert conn.take(2) == b"\x05\xff"
        assert conn.closed_by_peer()
    conn, reply = _socks4_connect(locked.port, LOCAL, target.port)
    with conn:
        assert reply == b"\x05\xff"  # SOCKS5-only: a SOCKS4 request gets a SOCKS5 "no method"
    with Conn(locked.port) as conn:  # the right login works
        conn.send(b"\x05\x01\x02")
        assert conn.take(2) == b"\x05\x02"
        conn.send(b"\x01\x05alice\x06s3cret")
        assert conn.take(2) == b"\x01\x00"
        conn.send(b"\x05\x01\x00\x01" + LOCAL + struct.pack(">H", target.port))
        assert conn.take(10) == b"\x05\x00\x00\x01" + b"\x00" * 6
        _tunnel_works(conn)
    with Conn(locked.port) as conn:  # a wrong one does not
        conn.send(b"\x05\x01\x02")
        assert conn.take(2) == b"\x05\x02"
        conn.send(b"\x01\x05alice\x05wrong")
        status = conn.take(2)
        assert status[0] == 1 and status[1] != 0

    open_ = started(start_microsocks)
    conn, method, reply = _socks5_connect(open_.port, LOCAL, target.port)
    with conn:
        assert method == b"\x05\x00"
        assert reply == b"\x05\x00\x00\x01" + b"\x00" * 6  # BND.ADDR 0.0.0.0:0
        _tunnel_works(conn)
    conn, method, reply = _socks5_connect(open_.port, LOCAL2, target.port)  # nothing on 127.0.0.2
    with conn:
        assert reply == b"\x05\x05\x00\x01" + b"\x00" * 6  # connection refused
    assert all(host == "127.0.0.1" for host, _ in target.peers)


# --- tinyproxy -------------------------------------------------------------------------------------------------

def test_tinyproxy_open(started, target: Target, http_server) -> None:
    tiny = started(start_tinyproxy, "open")
    conn, status, headers = _connect(tiny, "127.0.0.1", target.port)
    with conn:
        assert status == "HTTP/1.0 200 Connection established"
        assert headers["proxy-agent"].startswith("tinyproxy/")
        _tunnel_works(conn)
    status, headers, body = _get(tiny, f"http://127.0.0.1:{http_server.server_port}/z")
    assert status == "HTTP/1.1 200 OK" and body == b"hello from /z\n"
    assert headers["via"].startswith("1.1 ") and "tinyproxy" in headers["via"]
    # the fence: Filter + FilterDefaultDeny, applied to CONNECT and to IP-literal hosts
    conn, status, headers = _connect(tiny, "127.0.0.2", target.port)
    with conn:
        assert status == "HTTP/1.1 403 Filtered"
        assert headers["server"].startswith("tinyproxy/") and headers["connection"] == "close"
    status, _, _ = _get(tiny, f"http://127.0.0.2:{http_server.server_port}/z")
    assert status == "HTTP/1.1 403 Filtered"
    assert len(target.peers) == 1
    assert 'Proxying refused on filtered domain "127.0.0.2"' in _wait_log(tiny, "filtered domain")


def test_tinyproxy_restricted_refuses_loopback(started, target: Target) -> None:
    tiny = started(start_tinyproxy, "restricted")
    conn, status, headers = _connect(tiny, "127.0.0.1", target.port)
    with conn:
        assert status == "HTTP/1.0 403 Access denied"
        assert headers["server"].startswith("tinyproxy/")
        assert headers["content-type"] == "text/html" and headers["connection"] == "close"
        assert b"Access denied" in conn.fill(lambda b: False, 2.0)
        assert conn.eof
    assert target.peers == []
    assert 'Unauthorized connection from "127.0.0.1"' in _wait_log(tiny, "Unauthorized")


# --- Dante limited to a foreign network -------------------------------------------------------------------------

def test_dante_closed_drops_loopback_clients(started, target: Target) -> None:
    dante = started(start_dante, "closed")
    conn, method, reply = _socks5_connect(dante.port, LOCAL, target.port)
    with conn:
        assert method == b"" and conn.eof  # dropped before any reply (a close or a reset)
    assert target.peers == []
    assert "from: 198.51.100.0/24" in dante.config_file.read_text()


# --- Apache mod_proxy ------------------------------------------------------------------------------------------

def test_apache_open_forward_proxy(started, target: Target, http_server) -> None:
    apache = started(start_apache, "open")
    conn, status, headers = _connect(apache, "127.0.0.1", target.port)
    with conn:
        assert status == "HTTP/1.0 200 Connection Established"
        assert headers["proxy-agent"].startswith("Apache/2.4")
        _tunnel_works(conn)
    status, headers, body = _get(apache, f"http://127.0.0.1:{http_server.server_port}/a")
    assert status == "HTTP/1.1 200 OK" and body == b"hello from /a\n"
    # the fence: a <ProxyMatch> denies every URL but 127.0.0.1's, CONNECT (host:port) included
    conn, status, _ = _connect(apache, "127.0.0.2", target.port)
    conn.close()
    assert status == "HTTP/1.1 403 Forbidden"
    assert _get(apache, f"http://127.0.0.2:{http_server.server_port}/a")[0] == "HTTP/1.1 403 Forbidden"
    assert len(target.peers) == 1 and http_server.requests == [("127.0.0.1", "/a")]  # type: ignore[attr-defined]
    conf = apache.config_file.read_text()
    assert "ProxyRequests On" in conf and "Require all granted" in conf and "AllowCONNECT 25 443 563 1025-65535" in conf
    assert f'"CONNECT 127.0.0.1:{target.port} HTTP/1.1" 200' in _wait_log(apache, "CONNECT 127.0.0.1")


def test_apache_reverse_proxy_and_restricted(started, target: Target) -> None:
    reverse = started(start_apache, "reverse")
    conn, status, _ = _connect(reverse, "127.0.0.1", target.port)
    conn.close()
    assert status == "HTTP/1.1 405 Method Not Allowed"
    restricted = started(start_apache, "restricted")
    conn, status, _ = _connect(restricted, "127.0.0.1", target.port)
    conn.close()
    assert status == "HTTP/1.1 403 Forbidden"
    assert target.peers == []
    assert "AH01630: client denied by server configuration" in _wait_log(restricted, "AH01630")


# --- nginx -----------------------------------------------------------------------------------------------------

def test_nginx_forward_proxy_and_site(started, target: Target, http_server) -> None:
    forward = started(start_nginx, "forward")
    status, headers, body = _get(forward, f"http://127.0.0.1:{http_server.server_port}/n")
    assert status == "HTTP/1.1 200 OK" and body == b"hello from /n\n"
    assert headers["server"].startswith("nginx/")
    conn, status, _ = _connect(forward, "127.0.0.1", target.port)
    conn.close()
    assert status == "HTTP/1.1 400 Bad Request"  # nginx has no CONNECT
    assert _get(forward, f"http://127.0.0.2:{http_server.server_port}/n")[0] == "HTTP/1.1 403 Forbidden"  # fence
    site = started(start_nginx, "site")
    status, _, _ = _get(site, f"http://127.0.0.1:{http_server.server_port}/n")
    assert status == "HTTP/1.1 404 Not Found"  # served from its own root, not fetched
    assert http_server.requests == [("127.0.0.1", "/n")]  # type: ignore[attr-defined]
    assert target.peers == []


# --- Privoxy ---------------------------------------------------------------------------------------------------

def test_privoxy_open_and_restricted(started, target: Target, http_server) -> None:
    privoxy = started(start_privoxy, "open")
    conn, status, _ = _connect(privoxy, "127.0.0.1", target.port)  # a high port: no limit-connect applies
    with conn:
        assert status == "HTTP/1.1 200 Connection established"
        _tunnel_works(conn)
    status, _, body = _get(privoxy, f"http://127.0.0.1:{http_server.server_port}/p")
    assert status == "HTTP/1.1 200 OK" and body == b"hello from /p\n"
    conn, status, _ = _connect(privoxy, "127.0.0.2", target.port)  # the fence
    conn.close()
    assert status == "HTTP/1.1 403 Request blocked by Privoxy"
    restricted = started(start_privoxy, "restricted")
    with Conn(restricted.port) as conn:
        assert conn.closed_by_peer() and conn.buffer == b""
    assert len(target.peers) == 1
    assert "dropped due to ACL" in _wait_log(restricted, "dropped due to ACL")


# --- HAProxy ---------------------------------------------------------------------------------------------------

def test_haproxy_sends_everything_to_its_backend(started, target: Target, http_server) -> None:
    site = started(start_nginx, "site")
    haproxy = started(start_haproxy, site.port)
    status, headers, _ = _get(haproxy, f"http://127.0.0.1:{http_server.server_port}/h")
    assert status == "HTTP/1.1 404 Not Found" and headers["server"].startswith("nginx/")  # the backend answered
    conn, status, _ = _connect(haproxy, "127.0.0.1", target.port)
    conn.close()
    assert status == "HTTP/1.1 400 Bad Request"  # nginx's answer to the CONNECT HAProxy passed on
    assert http_server.requests == [] and target.peers == []  # type: ignore[attr-defined]
    assert "web/web1" in _wait_log(haproxy, "web/web1")


# --- all of them at once ---------------------------------------------------------------------------------------

def test_all_kinds_side_by_side(tmp_path: Path, target: Target, target2: Target) -> None:
    for binary in PACKAGES:
        _require(binary)
    pool = ProxySet(tmp_path / "all")
    try:
        t0 = time.monotonic()
        squid_open = pool.squid("open")
        squid_closed = pool.squid("closed")
        squid_ssl = pool.squid("ssl_only", ssl_ports=[target2.port])
        dante = pool.dante()
        socks_locked = pool.microsocks("bob", "pw")
        socks_open = pool.microsocks()
        tiny_open = pool.tinyproxy("open")
        tiny_restricted = pool.tinyproxy("restricted")
        print(f"8 instances started in {time.monotonic() - t0:.3f} s")
        ports = [i.port for i in pool.instances]
        assert len(set(ports)) == len(ports) == 8
        assert len({i.directory for i in pool.instances}) == 8
        assert all(i.directory.parent == tmp_path / "all" for i in pool.instances)
        for instance in pool.instances:
            _assert_loopback_only(instance)

        conn, status, _ = _connect(squid_open, "127.0.0.1", target.port)
        with conn:
            assert status == "HTTP/1.1 200 Connection established"
            _tunnel_works(conn)
        conn, status, _ = _connect(squid_closed, "127.0.0.1", target.port)
        conn.close()
        assert status == "HTTP/1.1 403 Forbidden"
        conn, status, _ = _connect(squid_ssl, "127.0.0.1", target.port)
        conn.close()
        assert status == "HTTP/1.1 403 Forbidden"
        conn, status, _ = _connect(squid_ssl, "127.0.0.1", target2.port)
        with conn:
            assert status == "HTTP/1.1 200 Connection established"
            _tunnel_works(conn)
        conn, method, reply = _socks5_connect(dante.port, LOCAL, target.port)
        with conn:
            assert reply[:2] == b"\x05\x00"
            _tunnel_works(conn)
        conn, method, _ = _socks5_connect(socks_locked.port, LOCAL, target.port)
        conn.close()
        assert method == b"\x05\xff"
        conn, method, reply = _socks5_connect(socks_open.port, LOCAL, target.port)
        with conn:
            assert reply[:2] == b"\x05\x00"
            _tunnel_works(conn)
        conn, status, _ = _connect(tiny_open, "127.0.0.1", target.port)
        with conn:
            assert status == "HTTP/1.0 200 Connection established"
            _tunnel_works(conn)
        conn, status, _ = _connect(tiny_restricted, "127.0.0.1", target.port)
        conn.close()
        assert status == "HTTP/1.0 403 Access denied"
    finally:
        t0 = time.monotonic()
        pool.stop_all()
        print(f"8 instances stopped in parallel in {time.monotonic() - t0:.3f} s: "
              + ", ".join(f"{i.name} {i.stop_seconds:.3f}" for i in pool.instances))
    for instance in pool.instances:
        _assert_gone(instance)
        assert not (instance.directory / "run").exists()
    assert len(target.peers) == 4 and all(host == "127.0.0.1" for host, _ in target.peers)


# --- the DNS fence ---------------------------------------------------------------------------------------------

class LoopbackDNS:
    """A UDP listener on 127.0.0.1:53 that records query names and answers REFUSED (so resolvers fail fast)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 53))
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                packet, peer = self.sock.recvfrom(2048)
            except socket.timeout:
                continue
            except OSError:
                return
            if len(packet) < 12:
                continue
            labels, i = [], 12
            while i < len(packet) and packet[i] != 0 and len(labels) < 64:
                labels.append(packet[i + 1:i + 1 + packet[i]].decode(errors="replace"))
                i += 1 + packet[i]
            self.names.append(".".join(labels))
            flags = 0x8000 | (packet[2] & 0x01) << 8 | 5  # QR, RD copied, RCODE 5 = REFUSED
            question = packet[12:i + 5]
            self.sock.sendto(packet[:2] + struct.pack(">HHHHH", flags, 1, 0, 0, 0) + question, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def test_hostname_lookups_stay_on_loopback(started, target: Target) -> None:
    """A hostname destination may only ever be looked up at 127.0.0.1:53 (the instance's private resolv.conf)."""
    squid = started(start_squid, "open")
    dante = started(start_dante)
    socks = started(start_microsocks)
    tiny = started(start_tinyproxy, "open")
    for instance in (squid, dante, socks, tiny):
        if not instance.dns_fenced:
            skip_or_fail("no mount namespace here (unshare --mount): hostname lookups are not fenced, not tried")
        for pid in instance.pids():
            assert Path(f"/proc/{pid}/root/etc/resolv.conf").read_text() == FENCE_RESOLV
    try:
        dns = LoopbackDNS()
    except OSError as exc:
        skip_or_fail(f"127.0.0.1:53 is taken ({exc})")
    try:
        name = "fence-check.invalid"
        conn, method, reply = _socks5_connect(dante.port, name.encode(), target.port, atyp=3)
        conn.close()
        dante_reply = reply
        conn, method, reply = _socks5_connect(socks.port, name.encode(), target.port, atyp=3)
        conn.close()
        socks_reply = reply
        conn, squid_status, _ = _connect(squid, name, target.port)
        conn.close()
        conn, tiny_status, _ = _connect(tiny, name, target.port)
        conn.close()
        print(f"dante {dante_reply!r}, microsocks {socks_reply!r}, squid {squid_status!r}, "
              f"tinyproxy {tiny_status!r}, queries seen on 127.0.0.1:53: {dns.names}")
    finally:
        dns.close()
    assert dante_reply[:2] not in (b"", b"\x05\x00")
    assert socks_reply[:2] not in (b"", b"\x05\x00")
    assert squid_status == "HTTP/1.1 403 Forbidden"
    assert tiny_status == "HTTP/1.1 403 Filtered"  # matched as a string before any lookup
    assert name in dns.names  # the lookups that did happen came here
    assert target.peers == []


# --- availability and the conftest fixture ---------------------------------------------------------------------

def test_available_explains_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ProxyUnavailable, match="/nonexistent/squid is missing"):
        available("/nonexistent/squid")
    with pytest.raises(ValueError):
        start_squid(tmp_path, "wide-open")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        start_dante(tmp_path, fence="0.0.0.0/0")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    for binary in ("squid", "danted", "microsocks", "tinyproxy", "apache2", "nginx", "privoxy", "haproxy"):
        _require(binary)


def test_proxies_fixture_starts_and_stops(proxies, target: Target) -> None:
    instance = proxies.dante()
    conn, method, reply = _socks5_connect(instance.port, LOCAL, target.port)
    with conn:
        assert reply[:2] == b"\x05\x00"
        _tunnel_works(conn)
    assert proxies.instances == [instance]
