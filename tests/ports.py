"""Ports for the tests' servers on loopback, chosen below the kernel's ephemeral range.

A port found by binding port 0 is an ephemeral one: between the test's choice and the server's own bind, any other
bind to port 0 or outgoing connection, in this process (a canary, the sink) or another, may be given the same
number, and the test then talks to the wrong server or to our own listener (a CI run lost a port's row so: the port
had become a canary's, which an audit never tests). The kernel never hands out a port below the range itself, and
this process never hands one out twice.
"""

from __future__ import annotations

import random
import socket
from contextlib import closing
from pathlib import Path

LOW = 15000  # the well-known and most registered services' ports stay below
_given: set[int] = set()


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(host: str, port: int) -> bool:
    """Free now for TCP and UDP (no SO_REUSEADDR: a port still in TIME_WAIT counts as taken)."""
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with closing(socket.socket(socket.AF_INET, kind)) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port of `host` free now, below the ephemeral range, not handed out before in this run."""
    high = _ephemeral_start()
    if high - LOW >= 1000:
        for _ in range(200):  # bounded
            port = random.randrange(LOW, high)
            if port not in _given and _bindable(host, port):
                _given.add(port)
                return port
    for _ in range(20):  # no room below the range (an unusual ip_local_port_range): the kernel's choice
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _given:
            _given.add(port)
            return port
    raise RuntimeError(f"no free port on {host}")
