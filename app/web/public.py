"""What the site shows of a check, made once when the check is stored, not on every read (issue 15, item 5).

A check's public JSON (schemas.Check: the row, what it tries, the guides that match) and the slugs of its guides
are made by `Shown.derive` when the auditor stores or updates the check (app/store.py `Derived`), serialised
once. GET /api/v1/audits/{id} then writes the stored JSON objects into its answer as they are; the event stream
and the result page use them too. Nothing on the read path runs a guide's fingerprint patterns.

Each stored form carries the key it was made with. The public JSON's key covers everything its bytes depend on:
the guide library's content, the site's public address (the guides' links are absolute), the engine version
(the check descriptions, the row's form) and the source of the code that makes it; the guides' key covers the
library and the matching code. A row made with another key (a new or changed guide, another address, older code)
is made again when it is read, and stored again: stale forms are never served.
"""

from __future__ import annotations

import hashlib
import json
import sys
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from app import ENGINE_VERSION, verdicts
from app import guides as guides_module
from app import store as store_module
from app.config import Settings
from app.guides import Guide, GuideLibrary
from app.store import Audit, Derived, Store, StoredCheck
from app.verdicts import CheckResult
from app.web import common
from app.web.common import audit_head, check_fields

ANY_JSON: TypeAdapter[Any] = TypeAdapter(Any)  # plain dicts and lists to JSON bytes, as FastAPI writes them


def _source(*modules: Any) -> bytes:
    """The code that shapes a stored form: when it changes between deploys, the forms made by the old code are
    stale."""
    return b"".join(Path(module.__file__).read_bytes() for module in modules)


@cache
def matching_key(library_digest: str) -> str:
    """The key of a stored list of guides: the library's content and the matching code (GuideLibrary.for_check)."""
    return hashlib.sha256(library_digest.encode() + b"\0" + _source(guides_module)).hexdigest()


class Shown:
    """Makes and reads what the site shows of checks, for one guide library and one public address."""

    def __init__(self, guides: GuideLibrary, settings: Settings) -> None:
        self.guides = guides
        self.settings = settings
        self.guides_key = matching_key(guides.digest)
        parts = [ENGINE_VERSION.encode(), settings.public_url.encode(), self.guides_key.encode(),
                 _source(common, verdicts, store_module, sys.modules[__name__])]
        self.public_key = hashlib.sha256(b"\0".join(parts)).hexdigest()

    def derive(self, result: CheckResult) -> Derived:
        """The check's public JSON and its guides (app/store.py calls it as it stores the check)."""
        matched = self.guides.for_check(result)
        data = check_fields(result, matched, self.settings)
        return Derived(public=ANY_JSON.dump_json(data).decode(), public_key=self.public_key,
                       guides=tuple(g.slug for g in matched), guides_key=self.guides_key)

    def fresh(self, derived: Derived | None) -> bool:
        return derived is not None and derived.public_key == self.public_key

    def public(self, result: CheckResult, derived: Derived | None) -> str:
        """The check's public JSON object: the stored one when it is fresh, otherwise made now."""
        return derived.public if derived is not None and self.fresh(derived) else self.derive(result).public

    async def load(self, store: Store, audit_id: str) -> Audit | None:
        """An audit with every check's fresh public JSON (schemas.Check): stored rows' as they are; rows stored
        without it, or with a stale one, made now and stored again."""
        audit = await store.get_audit_shown(audit_id, self.public_key)
        if audit is not None:
            await self.refresh(store, audit)
        return audit

    async def refresh(self, store: Store, audit: Audit) -> None:
        """Make what is missing or stale in the checks of `audit` (read whole: with their transcripts), and store it."""
        remade = [(stored.seq, self.derive(stored.result)) for stored in audit.checks if not self.fresh(stored.derived)]
        if remade:
            await store.set_derived(audit.id, remade)
            by_seq = dict(remade)
            for stored in audit.checks:
                stored.derived = by_seq.get(stored.seq, stored.derived)

    def audit_bytes(self, audit: Audit, queue_position: int | None, changes: list[str | None] | None) -> bytes:
        """GET /api/v1/audits/{id} (schemas.Audit) from an audit `load` answered: the stored checks' JSON objects
        written in as they are; `changes`, per check, its change since the previous audit (a re-test)."""
        head = ANY_JSON.dump_json(audit_head(audit, self.settings, queue_position))
        checks = [self.public(stored.result, stored.derived) for stored in audit.checks]
        if changes is not None:
            checks = [with_field(text, "change", change) for text, change in zip(checks, changes, strict=True)]
        return head[:-1] + b',"checks":[' + ",".join(checks).encode() + b"]}"


def with_field(obj: str, name: str, value: Any) -> str:
    """A serialised JSON object with one more field, last (the object is ours: made by Shown.derive)."""
    if not (obj.startswith("{") and obj.endswith("}")) or obj == "{}":
        raise ValueError("not a JSON object with fields")
    return f"{obj[:-1]},{json.dumps(name)}:{json.dumps(value, separators=(',', ':'), ensure_ascii=False)}}}"


def guides_for(stored: StoredCheck, library: GuideLibrary) -> list[Guide]:
    """A stored check's guides, best first: as matched when it was stored, or matched now when they are stale."""
    derived = stored.derived
    if derived is not None and derived.guides_key == matching_key(library.digest):
        return [guide for guide in (library.get(slug) for slug in derived.guides) if guide is not None]
    return library.for_check(stored.result)
