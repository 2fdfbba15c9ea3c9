"""create_app(settings) -> FastAPI: routers, middleware, error handlers, lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from slowapi import Limiter
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import PROJECT_ROOT, __version__, logs
from app.access.targets import Listener
from app.audits import AuditJobs, Auditor
from app.config import Settings, get_settings
from app.fairness import AddressSlots, ConnectionSlots
from app.guides import GuideLibrary
from app.listener_process import record_arrival
from app.listeners import Listeners, external_listeners, start_listeners
from app.probes.blocklist import load_lists
from app.retention import keep_purging
from app.shared_slots import REDIS_TIMEOUT, MemorySlots, RedisSlots, Slots, is_redis, redis_client
from app.store import Store
from app.store_sql import redacted
from app.web import api, pages
from app.web.deps import AppState, AuditorDep, StoreDep
from app.web.docs import install_docs
from app.web.hygiene import BodyLimitMiddleware, CrossSiteApiMiddleware
from app.web.public import Shown
from app.web.security import SecurityHeadersMiddleware, security_headers

ROOT = PROJECT_ROOT
log = logs.get_logger("app")
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class SharedSlots:
    """The slots every process of the site must count together (app.shared_slots): open event streams per
    requester and in total, connections per target address. In memory with memory://, in Redis with redis://."""

    def __init__(self, settings: Settings) -> None:
        self.client = redis_client(settings.limits_storage) if is_redis(settings.limits_storage) else None
        self.streams: Slots
        self.connections: ConnectionSlots
        if self.client is None:
            self.streams = MemorySlots(settings.max_event_streams, settings.max_event_streams_per_requester)
            self.connections = AddressSlots(settings.max_connections_per_host)
        else:
            self._redis = [RedisSlots(self.client, "streams", settings.max_event_streams,
                                      settings.max_event_streams_per_requester),
                           RedisSlots(self.client, "connections", None, settings.max_connections_per_host)]
            self.streams, self.connections = self._redis

    async def close(self) -> None:
        if self.client is not None:
            for slots in self._redis:
                await slots.close()
            await self.client.aclose()


async def open_site(settings: Settings, listeners: Sequence[Listener],
                     shared: SharedSlots) -> tuple[AppState, Listeners]:
    """The guides and partners (read once), the store, the sink and canaries, and the auditor (which recovers what
    a crash left unfinished)."""
    guides = GuideLibrary(ROOT / "guides")
    shown = Shown(guides, settings)
    # each check's public JSON and guides, made once
    store = Store(settings.database_location, derive=shown.derive, pool_size=settings.database_pool_size)
    await store.open()
    secret = settings.secret_key or await store.secret()
    jobs = await _open_jobs(settings, store)
    if settings.listeners == "external":  # another process binds them (secure-your-server listeners)
        own = await external_listeners(settings, secret, list(listeners), store)
    else:  # with the job queue, what they see goes to the store too: the workers wait for it there
        own = await start_listeners(settings, secret, list(listeners), journal=store if jobs is not None else None)
    auditor = Auditor(settings, store, own.own, sink=own.arrivals, canary=own.targets, own_addresses=own.addresses,
                      address_slots=shared.connections, jobs=jobs)
    if own.sink is not None:
        own.sink.on_delivery = auditor.delivered if jobs is None else record_arrival(store, auditor)
    await auditor.recover()
    return AppState(settings=settings, store=store, auditor=auditor, guides=guides, secret=secret,
                    canary=own.canary, shown=shown, partners=pages.load_partners(settings.partners_file)), own


async def _open_jobs(settings: Settings, store: Store) -> AuditJobs | None:
    """With PostgreSQL as the store, the job queue that `worker` processes run audits from (app/jobs.py, which
    imports procrastinate: only then)."""
    from app.jobs import AuditQueue, uses_queue

    if not uses_queue(settings):
        return None
    queue = AuditQueue(settings, store)
    await queue.open()
    return queue


def _lifespan(settings: Settings, listeners: Sequence[Listener]) -> Lifespan:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        shared = SharedSlots(settings)
        app.state.event_streams = shared.streams
        site, own = await open_site(settings, listeners, shared)
        app.state.sys = site
        log.info("app.started", extra={"version": __version__, "database": redacted(settings.database_location)})
        # the purge runs beside the site, in short batches: never before or instead of serving (app/retention.py)
        retention = asyncio.create_task(keep_purging(site.store, settings.retention_days), name="retention")
        # this instance's heartbeat, and the sweep that interrupts the audits of instances that are gone
        heartbeat = asyncio.create_task(site.auditor.keep_alive(), name="heartbeat")
        try:
            yield
        finally:
            for task in (retention, heartbeat):
                task.cancel()
            await asyncio.gather(retention, heartbeat, return_exceptions=True)
            await site.auditor.shutdown()
            if site.auditor.jobs is not None:
                await site.auditor.jobs.close()
            await own.stop()
            await site.store.close()
            await shared.close()
            log.info("app.stopped")
    return lifespan


def _add_limits_and_middleware(app: FastAPI, settings: Settings) -> None:
    # slowapi's limiter holds the verification counters (memory by default; with a redis:// URI, Redis, shared by
    # every process); the other shared slots are built in the lifespan (SharedSlots)
    # slowapi's `limits` calls are synchronous: with Redis each blocks the event loop for one round trip, at most
    # REDIS_TIMEOUT when Redis stalls (then the request fails: nothing passes uncounted). Floats, though typed str.
    timeouts: dict[str, Any] = {"socket_timeout": REDIS_TIMEOUT, "socket_connect_timeout": REDIS_TIMEOUT}
    app.state.limiter = Limiter(key_func=lambda request: request.client.host if request.client else "",
                                storage_uri=settings.limits_storage, strategy="moving-window",
                                storage_options=timeouts if is_redis(settings.limits_storage) else {})
    # outermost last: the security headers also go on the hygiene middleware's own 403 and 413 answers
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(CrossSiteApiMiddleware,
                       own_origins=(settings.public_url, settings.ipv4_url, settings.ipv6_url))
    app.add_middleware(SecurityHeadersMiddleware, public_https=settings.public_url.startswith("https://"),
                       connect=tuple(url for url in (settings.ipv4_url, settings.ipv6_url) if url))


async def healthz(store: StoreDep, auditor: AuditorDep) -> dict[str, object]:
    """`instance`: which process answered (a random id per process; with `serve --workers N`, one per worker)."""
    return {"status": "ok", "version": __version__, "schema": await store.schema_version(),
            "instance": auditor.instance_id}


def _add_routes(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=ROOT / "static"), name="static")
    app.state.rendered_pages = pages.RenderedPages()  # pages the same for every visitor, rendered once
    # the pages first: a request's route is found by trying each in turn, and the pages are asked for most (the API's
    # paths, all under /api/v1, share none with them)
    app.include_router(pages.router)
    app.include_router(api.router)
    app.add_api_route("/healthz", healthz, methods=["GET"], include_in_schema=False)
    install_docs(app, title="Secure Your Server API")
    api.document_event_stream(app)


def _wants_json(request: Request) -> bool:
    """The API, and any request before the site has started (no state for the HTML error page yet)."""
    path = request.url.path
    return path.startswith("/api/") or path == "/healthz" or not hasattr(request.app.state, "sys")


async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if _wants_json(request):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
    return pages.error_page(request, exc.status_code, str(exc.detail), exc.headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
              for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)


def _add_error_handlers(app: FastAPI, settings: Settings) -> None:
    app.exception_handler(StarletteHTTPException)(_http_error)
    app.exception_handler(RequestValidationError)(_validation_error)
    https = settings.public_url.startswith("https://")

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request.failed", extra={"path": request.url.path})
        # this handler runs outside the middleware stack, so it adds the security headers itself
        headers = security_headers(https)
        if _wants_json(request):
            return JSONResponse({"detail": "Internal error; it has been logged."}, status_code=500,
                                headers=headers)
        response = pages.error_page(request, 500, "Something went wrong on our side; it has been logged.")
        response.headers.update(headers)
        return response

    app.exception_handler(Exception)(server_error)


def create_app(settings: Settings | None = None, listeners: Sequence[Listener] = ()) -> FastAPI:
    """Build the site. `listeners` are the site's own listening sockets, which are never tested."""
    settings = settings or get_settings()
    if not settings.public_url:
        settings = settings.model_copy(update={"public_url": "http://127.0.0.1:8000"})
    logs.configure(settings.log_level)
    load_lists(settings.blocklists_file)  # a bad SECURE_BLOCKLISTS_FILE stops the start here, saying what is wrong
    app = FastAPI(title="Secure Your Server", version=__version__, lifespan=_lifespan(settings, listeners),
                  docs_url=None, redoc_url=None,
                  description="Test whether your own server is an open mail relay or an open proxy.")
    _add_limits_and_middleware(app, settings)
    _add_routes(app)
    _add_error_handlers(app, settings)
    return app
