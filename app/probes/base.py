"""The shape every probe shares: what a unit is handed, how a check ends (a Finding), and the one mapping of
connection failures to verdicts, so that SMTP, proxy and reachability checks say the same thing about the same
network event."""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.probes.transcript import Transcript
from app.verdicts import CheckResult, Verdict

Emit = Callable[[CheckResult], Awaitable[None]]  # stores and streams one finished check
SlotFactory = Callable[[], contextlib.AbstractAsyncContextManager[None]]  # hold one while a connection is open

# errors that mean "something answered: nothing listens here"
_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}
# errors that mean "no answer came back on the way": an ICMP unreachable or a local routing failure
_FILTERED = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT, errno.EACCES, errno.EPERM}


@dataclass(frozen=True)
class Finding:
    """How one check ended: its verdict, the reason code (app/verdicts.py) and a note for the visitor."""

    verdict: Verdict
    reason: str
    note: str
    retry_after: float | None = None  # what a temporary SMTP refusal said about when to come back


class Ended(Exception):
    """Ends a check (or every check of a session) with a finding, raised from deep inside an exchange."""

    def __init__(self, verdict: Verdict, reason: str, note: str) -> None:
        super().__init__(note)
        self.finding = Finding(verdict, reason, note)

    @classmethod
    def of(cls, finding: Finding) -> Ended:
        return cls(finding.verdict, finding.reason, finding.note)


def connect_failure(exc: OSError, timeout: float) -> Finding:
    """Why a connection could not be made: refused, filtered (silent or unreachable), or our own failure."""
    if isinstance(exc, TimeoutError):
        return Finding(Verdict.UNREACHABLE, "filtered", f"no answer within {timeout:g} s")
    if isinstance(exc, ConnectionRefusedError) or exc.errno in _REFUSED:
        return Finding(Verdict.UNREACHABLE, "refused", "connection refused")
    if exc.errno in _FILTERED:
        return Finding(Verdict.UNREACHABLE, "filtered", f"no route: {exc.strerror or exc}")
    return Finding(Verdict.ERROR, "internal_error", f"could not connect: {exc.strerror or exc}")


def check_result(service: str, host: str, port: int, check_id: str, finding: Finding, transcript: Transcript, *,
                 fingerprint: dict[str, str | None] | None = None, confirmed: bool = False,
                 tag: str | None = None) -> CheckResult:
    """The row of one finished check, named `<service>.<check id>`, its transcript ending with the verdict."""
    transcript.info(f"verdict: {finding.verdict.value} ({finding.reason}) - {finding.note}")
    return CheckResult(service=service, host=host, port=port, name=f"{service}.{check_id}", verdict=finding.verdict,
                       reason=finding.reason, confirmed=confirmed, fingerprint=fingerprint,
                       transcript=transcript.lines, detail=finding.note, tag=tag, opening=transcript.opening)
