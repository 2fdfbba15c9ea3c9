"""`secure-your-server listeners`: the sink and the canaries in a process of their own (SECURE_LISTENERS=external),
so that they bind their ports once however many web and worker processes run.

What they see goes into the store: an arrival at the sink is recorded (the audit waiting for it reads it there) and
confirms its row at once (Auditor.delivered: `open`, `delivered`, confirmed, its public JSON made again, also after
the audit ended); a canary observation is recorded before the canary answers its token.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

from app import PROJECT_ROOT, logs
from app.audits import Auditor
from app.config import Settings
from app.guides import GuideLibrary
from app.listeners import start_listeners
from app.store import Store
from app.web.public import Shown

log = logs.get_logger("listeners")


async def run_listeners(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Bind the configured sink and canaries and serve them until `stop` is set (by default: SIGTERM or SIGINT)."""
    stop = stop or _stop_on_signals()
    shown = Shown(GuideLibrary(PROJECT_ROOT / "guides"), settings)
    store = Store(settings.database_location, derive=shown.derive, pool_size=settings.database_pool_size)
    await store.open()
    try:
        secret = settings.secret_key or await store.secret()
        own = await start_listeners(settings, secret, [], journal=store)
        auditor = Auditor(settings, store, own.own, own_addresses=own.addresses)
        if own.sink is not None:
            own.sink.on_delivery = record_arrival(store, auditor)
        log.info("listeners.ready", extra={"listeners": [f"{o.host}:{o.port}" for o in own.own]})
        try:
            await stop.wait()
        finally:
            await own.stop()
    finally:
        await store.close()
    log.info("listeners.stopped")


def record_arrival(store: Store, auditor: Auditor) -> Callable[[str], Awaitable[None]]:
    """What the sink does with a tagged message when other processes wait for it (here; and in `serve` with the job
    queue, whose audits run in workers): recorded for them, and its row confirmed if stored already."""
    async def arrived(tag: str) -> None:
        await store.record_observation("sink", tag)  # for the audit still waiting for it, in any process
        await auditor.delivered(tag)  # its row, if stored already (the waiting process confirms it otherwise)
    return arrived


def _stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # the site runs on Linux (Debian), where the loop has it
    return stop


def main(settings: Settings) -> None:
    logs.configure(settings.log_level)
    asyncio.run(run_listeners(settings))
