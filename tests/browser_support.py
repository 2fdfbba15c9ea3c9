"""Helpers for the browser tests: chromium's flags, screenshots as artifacts (asyncio fakes in a thread:
support.ThreadedServer, imported from here too)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from support import ARTIFACTS, ROOT, ThreadedServer  # noqa: F401 (the browser tests import it from here)

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


