"""Helpers for tests: real-binary requirement, free ports, the app with its lifespan, waiting for audits."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import AsyncIterator

import httpx
import pytest

from app.config import Settings
from app.main import create_app

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SYS_ARTIFACTS", ROOT / "artifacts"))


def require_binary(path: str, package: str) -> str:
    found = shutil.which(path)
    if found:
        return found
    message = f"{path} is missing: install the Debian package {package} (make test does it as root)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def running_app(settings: Settings, peer: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan, and a client whose requests come from `peer`."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=(peer, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


async def wait_done(client: httpx.AsyncClient, audit_id: str, seconds: float = 20.0) -> dict:
    """Poll an audit until it has finished (bounded in time)."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        data = (await client.get(f"/api/v1/audits/{audit_id}")).json()
        if data["status"] not in ("queued", "running"):
            return data
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"audit {audit_id} still {data['status']} after {seconds} s")
        await asyncio.sleep(0.05)
