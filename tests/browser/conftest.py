"""Browser fixtures: Debian's chromium through Playwright."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from browser_support import CHROMIUM_ARGS
from support import require_binary


@pytest.fixture
def browser() -> Iterator[Any]:
    executable = require_binary("/usr/bin/chromium", "chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def browser_page(browser):
    page = browser.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.problems = problems  # type: ignore[attr-defined]
    yield page
    page.close()
