"""TCP reachability of one port: the check a service gets when it has nothing better (a proxy port without a
canary configured).

A port that accepts the connection is `inconclusive`/`port_open` (reachable, not tested for proxying), a refused
one `unreachable`/`refused`, a silent one `unreachable`/`filtered` (base.connect_failure).
"""

from __future__ import annotations

import asyncio

from app.probes.base import Finding, check_result, connect_failure
from app.probes.transcript import Transcript
from app.verdicts import CheckResult, Verdict

NAME = "reachable"
REASONS = ("port_open", "refused", "filtered", "internal_error")


async def check(service: str, host: str, port: int, timeout: float) -> CheckResult:
    transcript = Transcript()
    transcript.info(f"connecting to {host} port {port} (timeout {timeout:g} s)")
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:  # TimeoutError included
        return check_result(service, host, port, NAME, connect_failure(exc, timeout), transcript)
    writer.close()
    try:
        async with asyncio.timeout(1):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        pass
    finding = Finding(Verdict.INCONCLUSIVE, "port_open", "the port accepts connections")
    return check_result(service, host, port, NAME, finding, transcript)
