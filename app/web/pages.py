"""HTML pages: home, start a test, the audit page, guides, privacy, errors. Forms carry a CSRF token."""

from __future__ import annotations

import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from functools import lru_cache
from html import escape
from ipaddress import ip_address
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import pass_context
from markupsafe import Markup

from app import ENGINE_VERSION, PROJECT_ROOT, i18n
from app.access.domains import DomainError, normalise_domain
from app.config import Settings
from app.guides import FIX_ANCHOR, PRODUCT_SECTIONS, guide_url
from app.i18n import N_
from app.probes.blocklist import load_lists
from app.probes.canary import CHECK_ID
from app.verdicts import REASONS, SERVICES
from app.web import listings, verifications
from app.web.blocks import Block, NextStep, blocks, next_step
from app.web.common import AUDIT_ID, absolute_url, load_audit
from app.web.deps import AuditorDep, CanaryDep, GuidesDep, Requester, RequesterDep, SettingsDep, StoreDep, get_app_state
from app.web.report import Report, build_report
from app.web.security import CSRF_COOKIE, csrf_token, csrf_valid, new_csrf_cookie
from app.web.starts import StarterDep, in_cooldown
from app.web.summary import step_text, summary_text
from app.web.verifications import VerifierDep

ROOT = PROJECT_ROOT
templates = Jinja2Templates(directory=ROOT / "templates")
router = APIRouter(include_in_schema=False)


def _utc(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp)) if timestamp else ""


templates.env.filters["utc"] = _utc
templates.env.auto_reload = False  # templates change with a deploy, not while the site runs: no stat per render


@pass_context
def _url_for(context: Mapping[str, Any], name: str, /, **path_params: Any) -> str:
    """Starlette's url_for, with a shortcut for the static files (2 to 4 per page): the same absolute URL, without
    resolving the route through the router on every render."""
    request: Request = context["request"]
    if name == "static" and path_params.keys() == {"path"}:
        return f"{request.base_url}static/{path_params['path']}"  # the mount at /static (app/main.py)
    return str(request.url_for(name, **path_params))


templates.env.globals["url_for"] = _url_for
templates.env.add_extension("jinja2.ext.i18n")
templates.env.install_gettext_callables(  # type: ignore[attr-defined]
    lambda message, **values: i18n._(message) % values if values else i18n._(message),
    lambda singular, plural, n, **values: i18n.ngettext(singular, plural, n) % {"num": n, **values},
    newstyle=False)


def _guide_link(guide: Any, audit_id: str = "") -> str:
    """A finding's link to its guide: the Fix section, and the way back to the audit."""
    query = f"?audit={audit_id}" if audit_id else ""
    url = guide_url(guide, FIX_ANCHOR if guide.service != "general" else "")
    path, _, anchor = url.partition("#")
    return path + query + (f"#{anchor}" if anchor else "")


templates.env.globals["guide_url"] = _guide_link

SERVICE_NAMES = {"relay": N_("Mail relay"), "proxy": N_("Proxy"), "blocklist": N_("Blocklists")}
VERDICT_NAMES = {"open": N_("open"), "closed": N_("closed"), "auth_required": N_("login required"),
                 "inconclusive": N_("inconclusive"), "unreachable": N_("unreachable"), "error": N_("error"),
                 "not tested": N_("not tested"), "listed": N_("listed"), "not_listed": N_("not listed")}
STATUS_NAMES = {"queued": N_("queued"), "running": N_("running"), "done": N_("done"), "failed": N_("failed"),
                "interrupted": N_("interrupted")}


def load_partners(partners_file: str) -> dict[str, Any]:
    """The operation's partner agencies, from the data file the operator edits (read once, at start)."""
    path = Path(partners_file)
    if not path.is_absolute():
        path = ROOT / path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"partners": []}
    return data if isinstance(data, dict) else {"partners": []}


def use_language(request: Request) -> str:
    """Negotiate the visitor's language and make it the one `_()` answers in, for this request."""
    language = i18n.negotiate(request.query_params.get("lang"), request.cookies.get(i18n.COOKIE),
                              request.headers.get("accept-language"))
    i18n.activate(language)
    return language


def local_path(path: str) -> str:
    """The request's path as a link that stays on the site (the language links): one leading slash, never `//host`
    or `/\\host` (which browsers read as another host), and percent-encoded, since browsers drop tabs and newlines."""
    return quote("/" + path.lstrip("/\\"), safe="/:@!$'()*+,;=")


class RenderedPages:
    """Pages that are the same for every visitor (the home page, a guide): rendered once per language, path,
    address the site was asked at and the caller's key, then served from memory (bounded: least recently used
    first out). The visitor's own CSRF token is put in on every answer: a cached page holds a placeholder. A page
    without it has no form, and needs no CSRF cookie either."""

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self.placeholder = "csrf-" + secrets.token_hex(16)
        self._pages: OrderedDict[tuple[Any, ...], str] = OrderedDict()

    def get(self, request: Request, name: str, context: dict[str, Any], key: tuple[Any, ...]) -> tuple[str, bool]:
        """The page with the visitor's token, and whether it has a form (holds the token)."""
        full_key = (name, context["lang"], context["path"], str(request.base_url), *key)
        page = self._pages.get(full_key)
        if page is None:
            page = templates.get_template(name).render({**context, "csrf": self.placeholder, "request": request})
            self._pages[full_key] = page
            while len(self._pages) > self.size:
                self._pages.popitem(last=False)
        else:
            self._pages.move_to_end(full_key)
        return page.replace(self.placeholder, context["csrf"]), self.placeholder in page


def render(request: Request, name: str, context: Mapping[str, Any] | None = None, status_code: int = 200,
           headers: Mapping[str, str] | None = None, same_for_all: tuple[Any, ...] | None = None) -> HTMLResponse:
    """A page, translated, with the visitor's CSRF cookie and token. `same_for_all`: the page depends on nothing
    but its template, the language, the path, the site's address and this key (never on the request otherwise):
    rendered once and kept (RenderedPages)."""
    app_state = get_app_state(request)  # also for the error pages, which no handler's dependencies reach
    cookie = request.cookies.get(CSRF_COOKIE) or new_csrf_cookie()
    chosen = request.query_params.get("lang")
    language = use_language(request)
    full: dict[str, Any] = {
        "lang": language,
        "languages": i18n.LANGUAGES,
        "path": local_path(request.url.path),
        "settings": app_state.settings,
        "csrf": csrf_token(app_state.secret, cookie),
        "service_names": SERVICE_NAMES,
        "verdict_names": VERDICT_NAMES,
        "status_names": STATUS_NAMES,
        "reasons": REASONS,
        "engine_version": ENGINE_VERSION,
    }
    full.update(context or {})
    response: HTMLResponse
    has_form = True
    if same_for_all is None:
        response = templates.TemplateResponse(request, name, full, status_code=status_code, headers=headers)
    else:
        pages: RenderedPages = request.app.state.rendered_pages  # one per app (app/main.py)
        page, has_form = pages.get(request, name, full, same_for_all)
        response = HTMLResponse(page, status_code, headers)
    if chosen in i18n.LANGUAGES and request.cookies.get(i18n.COOKIE) != chosen:
        response.set_cookie(i18n.COOKIE, chosen, samesite="lax", max_age=365 * 86400, path="/",
                            secure=app_state.settings.public_url.startswith("https://"))
    response.headers["Content-Language"] = language
    if has_form and request.cookies.get(CSRF_COOKIE) != cookie:  # a page without a form needs no CSRF cookie
        response.set_cookie(CSRF_COOKIE, cookie, httponly=True, samesite="strict",
                            secure=app_state.settings.public_url.startswith("https://"), path="/")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def error_page(request: Request, status_code: int, message: str,
               headers: Mapping[str, str] | None = None) -> HTMLResponse:
    titles = {400: N_("Bad request"), 403: N_("Not yours to test"), 404: N_("Page not found"),
              405: N_("Not allowed"), 409: N_("Not yet"), 422: N_("Please check what you entered"),
              429: N_("Too many tests"), 500: N_("Internal error")}
    return render(request, "error.html", {"status": status_code, "title": titles.get(status_code, "Error"),
                                          "message": message}, status_code=status_code, headers=headers)


def _check_csrf(request: Request, token: str | None) -> None:
    app_state = get_app_state(request)
    origin = request.headers.get("origin")
    if origin and origin != "null":
        expected = app_state.settings.public_url.rstrip("/")
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin not in (expected, own):
            raise HTTPException(403, "This form was sent from another site. Open the page again and retry.")
    if not csrf_valid(app_state.secret, request.cookies.get(CSRF_COOKIE), token):
        raise HTTPException(403, "The form expired or cookies are blocked. Reload the page and try again.")


@router.get("/", response_class=HTMLResponse)
async def home(request: Request) -> HTMLResponse:
    return render(request, "home.html", {"partners": get_app_state(request).partners}, same_for_all=())


# a guide is the page asked for most after the home page: its route comes early, as routes are tried in turn
@router.get("/guides/{slug}", response_class=HTMLResponse)
async def guide_page(request: Request, slug: str, audit: str = "") -> HTMLResponse:
    # the guides and the store straight from the app's state: no dependency to solve on a page served this often
    app_state = get_app_state(request)
    library, store = app_state.guides, app_state.store
    guide = library.get(slug)
    if guide is None:
        raise HTTPException(404, "No guide with this name.")
    # opened from a test result: offer the way back to it (re-testing stays a button there, a POST)
    back = audit if AUDIT_ID.match(audit) and await store.get_audit(audit, with_checks=False) else None
    body = _localised_headings(library.render(guide), use_language(request))
    return render(request, "guide.html", {"guide": guide, "body": Markup(body), "audit_id": back},
                  same_for_all=(guide.slug, back))


@lru_cache(maxsize=256)
def _localised_headings(body: str, language: str) -> str:
    """A guide's body in `language` (the active one): the bodies stay English; the section headings speak the
    visitor's language. Made once per guide and language."""
    for section in PRODUCT_SECTIONS:
        body = body.replace(f">{section}</h2>", f">{escape(i18n._(section))}</h2>")
    return body


@router.get("/start", response_class=HTMLResponse)
async def start_page(request: Request, requester: RequesterDep, settings: SettingsDep) -> HTMLResponse:
    return render(request, "start.html", start_context(requester, settings, None))


def start_context(requester: Requester, settings: Settings, error: str | None) -> dict[str, Any]:
    """The start page: the visitor's address, and the site's IPv4-only / IPv6-only addresses, so that a dual-stack
    visitor can test the address the letter named."""
    address = requester.address
    version = ip_address(address).version
    other = settings.ipv6_url if version == 4 else settings.ipv4_url
    return {"address": address, "error": error, "family": f"IPv{version}",
            "other_url": other, "other_family": "IPv6" if version == 4 else "IPv4"}


@router.post("/start")
async def start_submit(request: Request, starter: StarterDep, csrf: str = Form(""),
                       checks: list[str] = Form([])) -> Response:
    _check_csrf(request, csrf)
    services = [s for s in SERVICES if s in checks] or list(SERVICES)
    try:
        plan = starter.plan_self(services)
    except HTTPException as exc:
        return render(request, "start.html", start_context(starter.requester, starter.settings, exc.detail),
                      status_code=exc.status_code)
    started = await starter.begin(plan)
    return RedirectResponse(f"/audits/{started.audit.id}", status_code=303)


async def _report(request: Request, store: Any, guides: Any, settings: Settings, audit_id: str) -> Report:
    audit = await load_audit(store, audit_id)
    await get_app_state(request).shown.refresh(store, audit)  # rows stored without their guides, or stale ones
    previous = await store.get_audit(audit.previous_id, transcripts=False) if audit.previous_id else None
    latest = await in_cooldown(settings, store, audit)
    return build_report(audit, guides, previous, settings.target_cooldown, latest.created_at if latest else None)


@router.get("/audits/{audit_id}", response_class=HTMLResponse)
async def audit_page(request: Request, audit_id: str, store: StoreDep, auditor: AuditorDep, guides: GuidesDep,
                     settings: SettingsDep) -> HTMLResponse:
    use_language(request)  # the report's sentences are translated as they are built
    report = await _report(request, store, guides, settings, audit_id)
    audit = report.audit
    chain = await store.retest_chain(audit.id, limit=20)
    position = await auditor.queue_position(audit.id) if audit.status == "queued" else None
    port_blocks = blocks(report.rows) if audit.finished else []  # live rows stay as they come until it is done
    lists = listings.section(report.rows, load_lists(settings.blocklists_file), audit.summary or {})
    steps = _next_steps(report)
    permalink = absolute_url(settings, f"/audits/{audit.id}")
    return render(request, "audit.html", {
        "eta": time_left(audit), "listings": lists, "explained_text": listings.explained_text,
        "audit": audit, "report": report, "rows": report.rows, "sentences": report.sentences, "why": report.why,
        "blocks": port_blocks, "steps": steps, "step_text": step_text, "permalink": permalink,
        "summary_text": _summary_text(report, port_blocks, steps, settings, lists) if audit.finished else "",
        "chain": chain[1:], "queue_position": position,
        "can_retest": audit.finished and audit.target == "self",
    })


@router.get("/audits/{audit_id}/summary.txt", response_class=PlainTextResponse)
async def audit_summary(request: Request, audit_id: str, store: StoreDep, guides: GuidesDep,
                        settings: SettingsDep) -> PlainTextResponse:
    """The result as plain text, to paste into an email (the permalink included)."""
    use_language(request)
    report = await _report(request, store, guides, settings, audit_id)
    lists = listings.section(report.rows, load_lists(settings.blocklists_file), report.audit.summary or {})
    text = _summary_text(report, blocks(report.rows), _next_steps(report), settings, lists)
    return PlainTextResponse(text, headers={"Cache-Control": "no-store"})


def _next_steps(report: Report) -> dict[str, NextStep | None]:
    return {service: next_step(report.rows, service) for service in report.audit.services}


def _summary_text(report: Report, port_blocks: list[Block], steps: dict[str, NextStep | None],
                  settings: Settings, lists: listings.Section | None = None) -> str:
    return summary_text(report, port_blocks, steps, absolute_url(settings, f"/audits/{report.audit.id}"),
                        lambda path: absolute_url(settings, path), {k: i18n._(v) for k, v in VERDICT_NAMES.items()},
                        lists)


def time_left(audit: Any) -> int | None:
    """Seconds an unfinished audit probably still needs, from its own pace so far (None before any result)."""
    done = len(audit.checks)
    if audit.finished or not audit.started_at or done == 0 or audit.planned <= done:
        return None
    elapsed = time.time() - audit.started_at
    return int(elapsed / done * (audit.planned - done)) + 1


@router.post("/audits/{audit_id}/retest")
async def retest_submit(request: Request, audit_id: str, starter: StarterDep, csrf: str = Form("")) -> Response:
    _check_csrf(request, csrf)
    started = await starter.retest(audit_id)
    return RedirectResponse(f"/audits/{started.audit.id}", status_code=303)


@router.get("/guides", response_class=HTMLResponse)
async def guides_index(request: Request, guides: GuidesDep, q: str = "", service: str = "") -> HTMLResponse:
    """Grouped by service and product; the filter is a plain GET form, so it works without JavaScript."""
    query = q.strip()[:100]
    service = service if service in ("relay", "proxy", "general") else ""
    found = guides.search(query, service)
    return render(request, "guides.html", {"guides": found, "q": query, "service": service})


# --- proving a domain, step by step --------------------------------------------------------------------------
@router.get("/verify", response_class=HTMLResponse)
async def verify_start(request: Request) -> HTMLResponse:
    return render(request, "verify_start.html", {"error": None, "domain": ""})


@router.post("/verify")
async def verify_create(request: Request, verifier: VerifierDep, csrf: str = Form(""),
                        domain: str = Form("", max_length=300)) -> Response:
    _check_csrf(request, csrf)
    try:
        name = normalise_domain(domain)
    except DomainError as exc:
        return render(request, "verify_start.html", {"error": str(exc), "domain": domain[:253]}, status_code=422)
    created = await verifier.create(name)
    return RedirectResponse(f"/verify/{created['id']}", status_code=303)


@router.get("/verify/{verification_id}", response_class=HTMLResponse)
async def verify_page(request: Request, verification_id: str, store: StoreDep, result: str = "") -> HTMLResponse:
    record = await verifications.load(store, verification_id)
    return render(request, "verify.html", {
        "vid": verification_id, "domain": record["domain"], "status": verifications.status_of(record),
        "method": record["method"], "expires_at": record["expires_at"],
        "detail": verifications.notice_text(result, str(record["domain"])),
        **verifications.instructions(str(record["domain"]), str(record["token"]))})


@router.post("/verify/{verification_id}/check")
async def verify_check(request: Request, verification_id: str, verifier: VerifierDep,
                       csrf: str = Form("")) -> Response:
    _check_csrf(request, csrf)
    try:
        result = await verifier.check(verification_id)
    except HTTPException as exc:
        if exc.status_code != 429:
            raise
        # checked again too soon (or too often this hour): the visitor stays on the steps, with a plain notice
        return RedirectResponse(f"/verify/{verification_id}?result=wait", status_code=303)
    code = verifications.notice_code(result)
    return RedirectResponse(f"/verify/{verification_id}?result={code}", status_code=303)


@router.post("/verify/{verification_id}/audit")
async def verify_audit(request: Request, verification_id: str, starter: StarterDep, csrf: str = Form(""),
                       checks: list[str] = Form([])) -> Response:
    _check_csrf(request, csrf)
    record = await verifications.load(starter.store, verification_id)
    services = [s for s in SERVICES if s in checks] or list(SERVICES)
    plan = await starter.plan_domain(str(record["domain"]), verification_id, services)
    started = await starter.begin(plan)
    return RedirectResponse(f"/audits/{started.audit.id}", status_code=303)


@router.get("/about", response_class=HTMLResponse)
async def about(request: Request) -> HTMLResponse:
    """What our tests send, from where, and whom to write to: for an administrator who sees them in a log."""
    from app.probes.proxy import PROXY_CHECKS
    from app.probes.smtp import VARIANTS

    return render(request, "about.html", {"variants": VARIANTS, "proxy_checks": PROXY_CHECKS,
                                          "blocklists": load_lists(get_app_state(request).settings.blocklists_file)})


@router.get("/privacy", response_class=HTMLResponse)
async def privacy(request: Request) -> HTMLResponse:
    return render(request, "privacy.html")


@router.get("/canary/{check_id}", response_class=PlainTextResponse)
async def canary(check_id: str, canary: CanaryDep, requester: RequesterDep) -> PlainTextResponse:
    """The HTTP canary on the site itself: proxies under test are asked to fetch this page."""
    if not CHECK_ID.match(check_id):
        raise HTTPException(404, "No such canary.")
    source = requester.address
    canary.connected(source, "http")
    await canary.note(check_id, source, "http")
    return PlainTextResponse(canary.token(check_id) + "\n", headers={"Cache-Control": "no-store"})
