"""TCP reachability of one port: the first real check, which the relay and proxy checks will replace.

A port that accepts the connection is `inconclusive`/`port_open` (reachable, not yet tested for relaying or
proxying), a refused one `unreachable`/`refused`, a silent one `unreachable`/`filtered`.
"""

from __future__ import annotations

import asyncio
import errno
import time

from app.verdicts import CheckResult, TranscriptLine, Verdict

NAME = "reachable"
REASONS = ("port_open", "refused", "filtered", "internal_error")

# errors that mean "something answered: nothing listens here"
_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}
# errors that mean "no answer came back on the way": an ICMP unreachable or a local routing failure
_FILTERED = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EACCES, errno.EPERM}


async def check(service: str, host: str, port: int, timeout: float) -> CheckResult:
    started = time.monotonic()
    transcript = [TranscriptLine(0.0, "info", f"connecting to {host} port {port} (timeout {timeout:g} s)")]

    def result(verdict: Verdict, reason: str, note: str) -> CheckResult:
        transcript.append(TranscriptLine(round(time.monotonic() - started, 3), "info", note))
        return CheckResult(service=service, host=host, port=port, name=f"{service}.{NAME}", verdict=verdict,
                           reason=reason, transcript=transcript, detail=note)

    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return result(Verdict.UNREACHABLE, "filtered", f"no answer within {timeout:g} s")
    except OSError as exc:
        if exc.errno in _REFUSED:
            return result(Verdict.UNREACHABLE, "refused", "connection refused")
        if exc.errno in _FILTERED:
            return result(Verdict.UNREACHABLE, "filtered", f"no route: {exc.strerror}")
        return result(Verdict.ERROR, "internal_error", f"could not connect: {exc.strerror or exc}")
    writer.close()
    try:
        async with asyncio.timeout(1):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        pass
    return result(Verdict.INCONCLUSIVE, "port_open", "the port accepts connections")
