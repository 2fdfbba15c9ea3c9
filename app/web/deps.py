"""FastAPI dependencies: what a handler needs from the running site, typed, instead of digging in request.app.state.

Handlers declare what they use (`store: StoreDep`, `requester: RequesterDep`, ...). The dependencies are `async`
although they never wait: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per dependency per
request for nothing. Helpers that run outside a handler (the pages' rendering, the error pages) call
`get_app_state` directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from limits.strategies import RateLimiter

from app.access.addresses import requester_key
from app.access.requester import RequesterError, requester_address
from app.audits import Auditor
from app.config import Settings
from app.guides import GuideLibrary
from app.probes.canary import Canary
from app.shared_slots import Slots
from app.store import Store
from app.web.public import Shown


@dataclass
class AppState:
    """What the lifespan builds once the store is open (request.app.state.sys)."""

    settings: Settings
    store: Store
    auditor: Auditor
    guides: GuideLibrary
    secret: str
    canary: Canary
    shown: Shown  # what the site shows of checks, made once per check (app/web/public.py)
    partners: dict[str, Any]  # the partner agencies (SECURE_PARTNERS_FILE), read once at start


def get_app_state(request: Request) -> AppState:
    app_state: AppState = request.app.state.sys
    return app_state


async def get_site_settings(request: Request) -> Settings:
    """The settings the site runs with (app.config.get_settings reads the environment; this is the app's copy)."""
    return get_app_state(request).settings


async def get_store(request: Request) -> Store:
    return get_app_state(request).store


async def get_auditor(request: Request) -> Auditor:
    return get_app_state(request).auditor


async def get_guides(request: Request) -> GuideLibrary:
    return get_app_state(request).guides


async def get_shown(request: Request) -> Shown:
    return get_app_state(request).shown


async def get_canary(request: Request) -> Canary:
    return get_app_state(request).canary


async def get_rate_limiter(request: Request) -> RateLimiter:
    """The `limits` rate limiter inside slowapi's Limiter (memory, or Redis when several processes share it)."""
    limiter: RateLimiter = request.app.state.limiter.limiter
    return limiter


async def get_stream_slots(request: Request) -> Slots:
    """The open event streams, per requester and on the site (app.shared_slots: memory, or Redis)."""
    slots: Slots = request.app.state.event_streams
    return slots


class Requester:
    """Who sends the request: its address (what a `self` audit tests) and the key the per-requester limits count
    (the address, or its IPv6 network: SECURE_IPV6_REQUESTER_PREFIX).

    Worked out when first asked, not when the handler starts, so that a handler still refuses bad input or a
    missing verification before a trusted proxy's unreadable forwarding header makes it a 400.
    """

    def __init__(self, request: Request, settings: Settings) -> None:
        self._request = request
        self._settings = settings

    @cached_property
    def address(self) -> str:
        settings = self._settings
        try:
            return str(requester_address(self._request, settings.trusted_proxy_networks, settings.forwarded_header))
        except RequesterError as exc:
            raise HTTPException(400, f"Cannot tell where this request comes from: {exc}") from None

    @cached_property
    def key(self) -> str:
        return requester_key(self.address, self._settings.ipv6_requester_prefix)


async def get_requester(request: Request, settings: Annotated[Settings, Depends(get_site_settings)]) -> Requester:
    return Requester(request, settings)


SettingsDep = Annotated[Settings, Depends(get_site_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
AuditorDep = Annotated[Auditor, Depends(get_auditor)]
GuidesDep = Annotated[GuideLibrary, Depends(get_guides)]
CanaryDep = Annotated[Canary, Depends(get_canary)]
ShownDep = Annotated[Shown, Depends(get_shown)]
RateLimiterDep = Annotated[RateLimiter, Depends(get_rate_limiter)]
StreamSlotsDep = Annotated[Slots, Depends(get_stream_slots)]
RequesterDep = Annotated[Requester, Depends(get_requester)]
