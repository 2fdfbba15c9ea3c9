"""Helpers for the browser tests: chromium's flags, screenshots as artifacts, asyncio fakes in a thread."""

from __future__ import annotations

import asyncio
import shlex
import threading
from pathlib import Path
from typing import Any

from support import ARTIFACTS, ROOT

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]
AXE = ROOT / "node_modules" / "axe-core" / "axe.min.js"
CHROMIUM = "/usr/bin/chromium"


def screenshot(page: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def chromium_inside(wrap: list[str], directory: Path) -> Path:
    """A wrapper script that runs Debian's chromium through `wrap` (a namespace's `ip netns exec NAME`, from
    servers.netns.Place.wrap): given to Playwright as its `executable_path`, the browser runs inside the
    namespace, so its requests leave from the namespace's address, as a browser on that server would. Playwright
    talks to it over the pipes the browser inherits, which a network namespace does not touch."""
    wrapper = directory / "chromium-in-netns"
    wrapper.write_text("#!/bin/sh\nexec " + shlex.join([*wrap, CHROMIUM]) + ' "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


class ThreadedServer:
    """An asyncio fake (an async context manager with .port) served from its own thread and event loop."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            self._stop = asyncio.Event()
            async with self.server:
                self._ready.set()
                await self._stop.wait()
        self.loop.run_until_complete(main())

    def __enter__(self) -> "ThreadedServer":
        self.thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fake did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)

    @property
    def port(self) -> int:
        return self.server.port
