"""What every probe unit is handed: where its results go, and a connection slot under the per-host limit."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable

from app.verdicts import CheckResult

Emit = Callable[[CheckResult], Awaitable[None]]  # stores and streams one finished check
SlotFactory = Callable[[], contextlib.AbstractAsyncContextManager[None]]  # hold one while a connection is open
