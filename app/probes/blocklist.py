"""Blocklist status (issue 17): what the public DNS blocklists of data/blocklists.toml say about an address.

One row per list and address, named `blocklist.<list id>`, port 0 (the public JSON shows null): `listed` with the
reason of the list's own code (spam, exploited, proxy, policy, reputation), `not_listed`, or `inconclusive` when
the list could not answer (timeout, SERVFAIL) or refused the query itself (Spamhaus 127.255.255.252-255: never a
listing). An IPv6 address is asked in nibble form of the lists that publish IPv6, and not asked of the others.

All the lists of one address are asked at once, under one time limit (SECURE_BLOCKLIST_TIMEOUT), through
SECURE_DNS_SERVERS or the system's resolver; at most MAX_QUERIES queries run at once in the process. A list's real
answer (listed or not) is kept in the cache (the store's, shared by every process) for SECURE_BLOCKLIST_CACHE_SECONDS
and served again; failures and refusals are never cached. The probe never connects to the address itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
import time
import tomllib
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from app import PROJECT_ROOT
from app.access.resolver import ResolveError, Resolver
from app.probes.base import Emit
from app.verdicts import CheckResult, TranscriptLine, Verdict

SERVICE = "blocklist"
MAX_QUERIES = 32  # DNS queries in flight at once, in this process
MAX_TXT = 4  # TXT strings kept per answer
TXT_LIMIT = 300  # characters per TXT string
KINDS = {"spam": "listed_spam", "exploited": "listed_exploited", "proxy": "listed_proxy",
         "policy": "listed_policy", "reputation": "listed_reputation", "refused": "list_refused_query"}
# when one answer carries several codes, the row's reason is the most pressing one
PRECEDENCE = ("refused", "proxy", "exploited", "spam", "reputation", "policy")
LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,38}[a-z0-9])?$")
_ZONE = re.compile(r"^(?=.{1,200}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$")
_URL = re.compile(r"^https?://[^\s\"'<>]+$")
# the in-flight bound, one per event loop (an asyncio primitive belongs to the loop it first waited in)
_limiters: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


class BlocklistFileError(ValueError):
    """The blocklists file cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class Code:
    """One return code (or a range of them) of a list, with the list's own meaning."""

    first: ipaddress.IPv4Address
    last: ipaddress.IPv4Address
    part: str
    meaning: str
    kind: str  # a key of KINDS
    explained_by: tuple[str, ...]  # our services whose open verdict explains the listing
    source: str

    def covers(self, answer: str) -> bool:
        try:
            value = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        return self.first <= value <= self.last


@dataclass(frozen=True)
class Blocklist:
    id: str
    name: str
    zone: str
    lists: str
    ipv6: bool
    removal_url: str
    removal: str
    automatic_removal: bool
    removal_time: str
    public_resolvers: bool
    sources: tuple[str, ...]
    codes: tuple[Code, ...] = field(default=())

    def code(self, answer: str) -> Code | None:
        return next((c for c in self.codes if c.covers(answer)), None)

    def query_name(self, address: str) -> str | None:
        """The name to ask: the reversed octets (IPv4) or nibbles (IPv6) under the zone; None when the list does
        not publish the address's family."""
        ip = ipaddress.ip_address(address)
        if ip.version == 6:
            if not self.ipv6:
                return None
            return ".".join(reversed(ip.exploded.replace(":", ""))) + "." + self.zone
        return ".".join(reversed(str(ip).split("."))) + "." + self.zone


# --- the lists' file ---------------------------------------------------------------------------------------------

def _text(entry: dict[str, Any], key: str, where: str, pattern: re.Pattern[str] | None = None) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value.strip():
        raise BlocklistFileError(f"{where}: '{key}' must be a non-empty string")
    if pattern is not None and not pattern.match(value):
        raise BlocklistFileError(f"{where}: '{key}' is not valid: {value!r}")
    return value.strip()


def _flag(entry: dict[str, Any], key: str, where: str) -> bool:
    value = entry.get(key)
    if not isinstance(value, bool):
        raise BlocklistFileError(f"{where}: '{key}' must be true or false")
    return value


def _answer_range(text: str, where: str) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address]:
    first_text, _, last_text = text.partition("-")
    try:
        first = ipaddress.IPv4Address(first_text.strip())
        last = ipaddress.IPv4Address((last_text or first_text).strip())
    except ValueError:
        raise BlocklistFileError(f"{where}: 'answer' must be an IPv4 address or a range a-b: {text!r}") from None
    if first not in LOOPBACK or last not in LOOPBACK or last < first:
        raise BlocklistFileError(f"{where}: 'answer' must lie inside 127.0.0.0/8, first <= last: {text!r}")
    return first, last


def _code(entry: Any, where: str) -> Code:
    if not isinstance(entry, dict):
        raise BlocklistFileError(f"{where}: a code must be a table")
    first, last = _answer_range(_text(entry, "answer", where), where)
    kind = _text(entry, "kind", where)
    if kind not in KINDS:
        raise BlocklistFileError(f"{where}: 'kind' must be one of {', '.join(KINDS)}: {kind!r}")
    explained = entry.get("explained_by", [])
    if not isinstance(explained, list) or not set(explained) <= {"relay", "proxy"}:
        raise BlocklistFileError(f"{where}: 'explained_by' must be a list of \"relay\" and \"proxy\"")
    return Code(first, last, _text(entry, "part", where), _text(entry, "meaning", where), kind, tuple(explained),
                _text(entry, "source", where, _URL))


def _list(entry: Any, where: str) -> Blocklist:
    if not isinstance(entry, dict):
        raise BlocklistFileError(f"{where}: a list must be a table")
    sources = entry.get("sources")
    if not isinstance(sources, list) or not sources or not all(isinstance(s, str) and _URL.match(s) for s in sources):
        raise BlocklistFileError(f"{where}: 'sources' must be a non-empty list of http(s) URLs")
    codes = entry.get("code", [])
    if not isinstance(codes, list):
        raise BlocklistFileError(f"{where}: 'code' must be an array of tables ([[list.code]])")
    return Blocklist(
        id=_text(entry, "id", where, _ID), name=_text(entry, "name", where),
        zone=_text(entry, "zone", where, _ZONE).lower(), lists=_text(entry, "lists", where),
        ipv6=_flag(entry, "ipv6", where), removal_url=_text(entry, "removal_url", where, _URL),
        removal=_text(entry, "removal", where), automatic_removal=_flag(entry, "automatic_removal", where),
        removal_time=_text(entry, "removal_time", where), public_resolvers=_flag(entry, "public_resolvers", where),
        sources=tuple(sources), codes=tuple(_code(c, f"{where}, code {n}") for n, c in enumerate(codes, 1)))


def parse_lists(text: str, origin: str = "blocklists file") -> tuple[Blocklist, ...]:
    """The lists of a TOML text, every field checked; BlocklistFileError names what is wrong and where."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BlocklistFileError(f"{origin}: not valid TOML: {exc}") from None
    entries = data.get("list")
    if not isinstance(entries, list) or not entries:
        raise BlocklistFileError(f"{origin}: no [[list]] entries")
    lists = tuple(_list(entry, f"{origin}, list {n}") for n, entry in enumerate(entries, 1))
    ids = [b.id for b in lists]
    duplicate = next((i for i in ids if ids.count(i) > 1), None)
    if duplicate is not None:
        raise BlocklistFileError(f"{origin}: the id {duplicate!r} is used twice")
    return lists


def resolve_path(path: str) -> Path:
    found = Path(path)
    return found if found.is_absolute() else PROJECT_ROOT / found


@lru_cache(maxsize=8)
def load_lists(path: str) -> tuple[Blocklist, ...]:
    """The lists of SECURE_BLOCKLISTS_FILE (relative paths from the project root), read once per path."""
    file = resolve_path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise BlocklistFileError(f"{file}: cannot be read: {exc.strerror or exc}") from None
    return parse_lists(text, str(file))


# --- the cache ---------------------------------------------------------------------------------------------------

class AnswerCache(Protocol):
    """Where lists' answers are kept (the store: app/store.py; MemoryCache for tools and tests)."""

    async def blocklist_answers(self, address: str, since: float) -> dict[str, tuple[str, float]]: ...

    async def remember_blocklist_answers(self, address: str, answers: Sequence[tuple[str, str]],
                                         keep: float) -> None: ...


class MemoryCache:
    """The cache of one process, bounded: at most `size` addresses, the oldest first out."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self._answers: dict[str, dict[str, tuple[str, float]]] = {}

    async def blocklist_answers(self, address: str, since: float) -> dict[str, tuple[str, float]]:
        return {k: v for k, v in self._answers.get(address, {}).items() if v[1] >= since}

    async def remember_blocklist_answers(self, address: str, answers: Sequence[tuple[str, str]],
                                         keep: float) -> None:
        now = time.time()
        self._answers.setdefault(address, {}).update({list_id: (answer, now) for list_id, answer in answers})
        while len(self._answers) > self.size:
            del self._answers[next(iter(self._answers))]


@dataclass(frozen=True)
class BlocklistOptions:
    lists: tuple[Blocklist, ...]
    servers: tuple[str, ...]  # SECURE_DNS_SERVERS (empty: the system's resolver)
    timeout: float  # all the lists of one address together
    cache_seconds: float
    cache: AnswerCache


# --- asking the lists --------------------------------------------------------------------------------------------

@dataclass
class Answer:
    """What one list said: `status` listed | not_listed (real answers, cached) or refused | bad | timeout |
    failed (never cached); the A records and TXT strings as received."""

    status: str
    codes: list[str] = field(default_factory=list)
    txt: list[str] = field(default_factory=list)
    note: str = ""
    cached_at: float | None = None

    def to_json(self) -> str:
        return json.dumps({"status": self.status, "codes": self.codes, "txt": self.txt})

    @classmethod
    def from_json(cls, text: str, at: float) -> Answer | None:
        try:
            data = json.loads(text)
            return cls(str(data["status"]), [str(c) for c in data["codes"]], [str(t) for t in data["txt"]],
                       cached_at=at)
        except (ValueError, KeyError, TypeError):
            return None  # a damaged cache entry is asked again


def _limiter() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    limiter = _limiters.get(loop)
    if limiter is None:
        limiter = _limiters[loop] = asyncio.Semaphore(MAX_QUERIES)
    return limiter


async def _records(resolver: Resolver, name: str, rdtype: str) -> list[Any]:
    async with _limiter():
        return await resolver.records(name, rdtype)


async def ask(resolver: Resolver, blocklist: Blocklist, name: str) -> Answer:
    """One list's answer about one query name: A records, then (when listed) its TXT reason."""
    try:
        codes = [str(r.address) for r in await _records(resolver, name, "A")]
    except ResolveError as exc:
        return Answer("timeout" if exc.kind == "timeout" else "failed", note=str(exc))
    if not codes:
        return Answer("not_listed")
    if any(ipaddress.ip_address(c) not in LOOPBACK for c in codes):
        return Answer("bad", codes)
    if any((code := blocklist.code(c)) is not None and code.kind == "refused" for c in codes):
        return Answer("refused", codes)
    try:
        texts = [b"".join(r.strings).decode("utf-8", "replace") for r in await _records(resolver, name, "TXT")]
    except ResolveError:
        texts = []  # the listing stands without its reason text
    return Answer("listed", codes, [t[:TXT_LIMIT] for t in texts[:MAX_TXT]])


# --- rows --------------------------------------------------------------------------------------------------------

def _listed_reason(blocklist: Blocklist, codes: Sequence[str]) -> str:
    kinds = {code.kind for code in (blocklist.code(c) for c in codes) if code is not None}
    return next((KINDS[k] for k in PRECEDENCE if k in kinds), "listed_other")


_OUTCOMES = {  # status -> (verdict, reason) for the statuses that do not depend on the codes
    "not_listed": (Verdict.NOT_LISTED, "not_listed"),
    "refused": (Verdict.INCONCLUSIVE, "list_refused_query"),
    "bad": (Verdict.INCONCLUSIVE, "list_bad_answer"),
    "timeout": (Verdict.INCONCLUSIVE, "list_timeout"),
    "failed": (Verdict.INCONCLUSIVE, "list_failed"),
}


def _note(blocklist: Blocklist, answer: Answer, reason: str) -> str:
    if answer.status == "listed":
        meanings = [f"{c} ({code.part}: {code.meaning})" if (code := blocklist.code(c)) else f"{c} (undocumented)"
                    for c in answer.codes]
        return f"listed by {blocklist.name}: " + "; ".join(meanings)
    if answer.status == "refused":
        meanings = [code.meaning for c in answer.codes if (code := blocklist.code(c)) is not None]
        return f"{blocklist.name} refused the query: " + "; ".join(dict.fromkeys(meanings))
    if answer.status == "bad":
        return f"{blocklist.name} answered {', '.join(answer.codes)}, outside 127.0.0.0/8: not a listing"
    if answer.status == "not_listed":
        return f"not listed by {blocklist.name}"
    return answer.note or f"{blocklist.name} did not answer"


def row(address: str, blocklist: Blocklist, query: str | None, answer: Answer) -> CheckResult:
    """The row of one list about one address."""
    if answer.status == "listed":
        verdict, reason = Verdict.LISTED, _listed_reason(blocklist, answer.codes)
    else:
        verdict, reason = _OUTCOMES.get(answer.status, (Verdict.INCONCLUSIVE, "list_failed"))
    note = _note(blocklist, answer, reason)
    lines = [TranscriptLine(0.0, "out", f"A? {query}")] if query else []
    lines += [TranscriptLine(0.0, "in", f"A {code}") for code in answer.codes]
    lines += [TranscriptLine(0.0, "in", f"TXT {text}") for text in answer.txt]
    if answer.cached_at is not None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(answer.cached_at))
        lines.append(TranscriptLine(0.0, "info", f"answer of {stamp}, served from our cache"))
    lines.append(TranscriptLine(0.0, "info", f"verdict: {verdict.value} ({reason}) - {note}"))
    data = {"codes": answer.codes, "txt": answer.txt, "removal_url": blocklist.removal_url,
            "cached_at": answer.cached_at}
    return CheckResult(service=SERVICE, host=address, port=0, name=f"{SERVICE}.{blocklist.id}", verdict=verdict,
                       reason=reason, transcript=lines, detail=note, data=data)


def not_asked(address: str, blocklist: Blocklist) -> CheckResult:
    note = f"{blocklist.name} does not publish IPv6 addresses: not asked"
    return CheckResult(service=SERVICE, host=address, port=0, name=f"{SERVICE}.{blocklist.id}",
                       verdict=Verdict.INCONCLUSIVE, reason="ipv6_not_queried",
                       transcript=[TranscriptLine(0.0, "info", note)], detail=note,
                       data={"codes": [], "txt": [], "removal_url": blocklist.removal_url, "cached_at": None})


async def _cached(options: BlocklistOptions, address: str) -> dict[str, Answer]:
    if options.cache_seconds <= 0:
        return {}
    stored = await options.cache.blocklist_answers(address, time.time() - options.cache_seconds)
    answers = {list_id: Answer.from_json(text, at) for list_id, (text, at) in stored.items()}
    return {list_id: answer for list_id, answer in answers.items() if answer is not None}


async def _ask_all(options: BlocklistOptions, queries: dict[str, str]) -> dict[str, Answer]:
    """Every list of `queries` (list id -> name) at once; a list without an answer at the time limit timed out."""
    resolver = Resolver(list(options.servers) or None, timeout=options.timeout)
    by_id = {b.id: b for b in options.lists}
    tasks = {list_id: asyncio.create_task(ask(resolver, by_id[list_id], name)) for list_id, name in queries.items()}
    if tasks:
        await asyncio.wait(tasks.values(), timeout=options.timeout)
    answers: dict[str, Answer] = {}
    for list_id, task in tasks.items():
        if task.done() and not task.cancelled() and task.exception() is None:
            answers[list_id] = task.result()
        else:
            task.cancel()
            answers[list_id] = Answer("timeout", note=f"no answer within {options.timeout:g} s")
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    return answers


async def run_address(emit: Emit, address: str, options: BlocklistOptions) -> None:
    """One row per list about `address`: cached answers, then the lists asked now."""
    cached = await _cached(options, address)
    queries = {b.id: name for b in options.lists if b.id not in cached and (name := b.query_name(address))}
    fresh = await _ask_all(options, queries)
    keep = [(list_id, answer.to_json()) for list_id, answer in fresh.items()
            if answer.status in ("listed", "not_listed")]
    if keep and options.cache_seconds > 0:
        await options.cache.remember_blocklist_answers(address, keep, options.cache_seconds)
    for blocklist in options.lists:
        query = blocklist.query_name(address)
        if query is None:
            await emit(not_asked(address, blocklist))
        else:
            await emit(row(address, blocklist, query, cached.get(blocklist.id) or fresh[blocklist.id]))
