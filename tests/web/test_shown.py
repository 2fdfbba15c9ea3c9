"""What the site shows of a check is made once, when the check is stored (app/web/public.py; issue 15, item 5):
reads serve the stored form, a changed guide library or a later finding makes it again, partners are read once."""

from __future__ import annotations

import json
import time
from pathlib import Path

from support import running_app

from app import ENGINE_VERSION
from app.audits import confirmed
from app.config import Settings
from app.guides import GuideLibrary
from app.store import Audit, Store, new_id
from app.verdicts import CheckResult, TranscriptLine, Verdict
from app.web.common import check_json
from app.web.public import Shown, guides_for
from app.web.security import CSRF_COOKIE

ROOT = Path(__file__).resolve().parents[2]
TAG = "k7tag0sinkproof"


def open_relay(tag: str | None = TAG) -> CheckResult:
    """An open relay row with a Postfix greeting (the postfix guide matches) and the sink's tag."""
    return CheckResult("relay", "127.0.0.1", 25, "relay.v1", Verdict.OPEN, "accepted_unconfirmed",
                       fingerprint={"product": None, "version": None, "raw": "220 mx.corp.test ESMTP Postfix"},
                       transcript=[TranscriptLine(0.0, "in", "220 mx.corp.test ESMTP Postfix"),
                                   TranscriptLine(0.1, "out", "RCPT TO:<someone@probe.invalid>"),
                                   TranscriptLine(0.2, "in", "250 2.1.5 Ok")],
                       detail="accepted a foreign recipient", tag=tag)


def finished_audit() -> Audit:
    return Audit(id=new_id(), created_at=time.time(), status="done", target="self", requester="127.0.0.1",
                 hosts=["127.0.0.1"], services=["relay"], planned=1, engine_version=ENGINE_VERSION,
                 summary={"relay": "open", "proxy": None})


async def stored_audit(store: Store, result: CheckResult) -> str:
    audit = finished_audit()
    await store.create_audit(audit, ["127.0.0.1"])
    await store.add_check(audit.id, 1, result)
    return audit.id


def never(*_args, **_kwargs):
    raise AssertionError("guides matched on a read")


async def test_guides_are_matched_when_a_check_is_stored_and_never_on_a_read(client, monkeypatch):
    site = client.app.state.sys
    audit_id = await stored_audit(site.store, open_relay())
    expected = check_json(open_relay(), site.guides, site.settings)
    monkeypatch.setattr(GuideLibrary, "for_check", never)  # from here on, matching a guide fails the request

    answer = await client.get(f"/api/v1/audits/{audit_id}")
    assert answer.status_code == 200
    (check,) = answer.json()["checks"]
    assert check == expected and "tag" not in check
    assert check["guides"][0]["slug"] == "postfix"
    page = await client.get(f"/audits/{audit_id}")
    assert page.status_code == 200 and "/guides/postfix?audit=" in page.text
    async with client.stream("GET", f"/api/v1/audits/{audit_id}/events") as response:
        text = (await response.aread()).decode()
    (event,) = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {\"service\"")]
    assert event == {**expected, "seq": 1}


async def test_rows_stored_without_their_form_get_it_on_the_first_read_and_keep_it(client, monkeypatch):
    """Rows stored before schema 6 (or by a store without a deriver) are made on their first read, then stored."""
    site = client.app.state.sys
    monkeypatch.setattr(site.store, "derive", None)
    audit_id = await stored_audit(site.store, open_relay())
    assert (await site.store.get_audit(audit_id)).checks[0].derived is None
    monkeypatch.setattr(site.store, "derive", site.shown.derive)

    first = (await client.get(f"/api/v1/audits/{audit_id}")).json()
    assert first["checks"][0] == check_json(open_relay(), site.guides, site.settings)
    stored = (await site.store.get_audit(audit_id)).checks[0].derived
    assert stored is not None and stored.public_key == site.shown.public_key and stored.guides[0] == "postfix"
    monkeypatch.setattr(GuideLibrary, "for_check", never)
    assert (await client.get(f"/api/v1/audits/{audit_id}")).json() == first


def library_with(tmp_path: Path, fingerprint: str) -> GuideLibrary:
    (tmp_path / "relay").mkdir(parents=True, exist_ok=True)
    (tmp_path / "relay" / "mx.md").write_text(
        f"---\nslug: mx-corp\ntitle: MX Corp\nservice: relay\nfingerprints: ['{fingerprint}']\n"
        "sources: ['https://example.org/']\n---\n## Fix\nClose it.\n")
    return GuideLibrary(tmp_path)


async def test_a_changed_guide_library_makes_the_stored_matches_again(tmp_path):
    settings = Settings(public_url="http://testserver")
    before = Shown(library_with(tmp_path / "a", "Sendmail"), settings)  # the guide does not match this greeting
    after = Shown(library_with(tmp_path / "b", r"mx\.corp\.test"), settings)  # a changed fingerprint: it does
    assert before.guides_key != after.guides_key and before.public_key != after.public_key
    store = Store(str(tmp_path / "db.sqlite"), derive=before.derive)
    await store.open()
    try:
        audit_id = await stored_audit(store, open_relay())
        stored = (await store.get_audit(audit_id)).checks[0]
        assert stored.derived is not None and "mx-corp" not in stored.derived.guides

        # the site restarts with the new library: the stored form is stale, made again on read, and stored
        audit = await after.load(store, audit_id)
        assert [g["slug"] for g in json.loads(after.audit_bytes(audit, None, None))["checks"][0]["guides"]] == \
            ["mx-corp"]
        again = (await store.get_audit(audit_id)).checks[0]
        assert again.derived is not None and again.derived.guides == ("mx-corp",)
        assert again.derived.public_key == after.public_key
        # the result page's guides: stale matches are not shown either
        assert [g.slug for g in guides_for(stored, after.guides)] == ["mx-corp"]
        assert [g.slug for g in guides_for(stored, before.guides)] == []
    finally:
        await store.close()


async def test_another_public_address_makes_the_stored_links_again(tmp_path):
    library = GuideLibrary(ROOT / "guides")
    old = Shown(library, Settings(public_url="http://old.example"))
    new = Shown(library, Settings(public_url="https://new.example"))
    store = Store(str(tmp_path / "db.sqlite"), derive=old.derive)
    await store.open()
    try:
        audit_id = await stored_audit(store, open_relay())
        body = new.audit_bytes(await new.load(store, audit_id), None, None).decode()
        assert "https://new.example/guides/postfix" in body and "old.example" not in body
    finally:
        await store.close()


async def test_the_sinks_confirmation_refreshes_the_stored_json(client):
    site = client.app.state.sys
    audit_id = await stored_audit(site.store, open_relay())
    assert (await client.get(f"/api/v1/audits/{audit_id}")).json()["checks"][0]["reason"] == "accepted_unconfirmed"

    await site.auditor.delivered(TAG)  # our sink received the tagged message: update_check

    (check,) = (await client.get(f"/api/v1/audits/{audit_id}")).json()["checks"]
    assert check == check_json(confirmed(open_relay()), site.guides, site.settings)
    assert check["reason"] == "delivered" and check["confirmed"] is True
    stored = (await site.store.get_audit(audit_id)).checks[0].derived
    assert stored is not None and json.loads(stored.public)["reason"] == "delivered"


async def test_update_check_without_a_deriver_drops_the_stale_form(tmp_path):
    shown = Shown(GuideLibrary(ROOT / "guides"), Settings(public_url="http://testserver"))
    store = Store(str(tmp_path / "db.sqlite"), derive=shown.derive)
    await store.open()
    try:
        audit_id = await stored_audit(store, open_relay())
        store.derive = None
        await store.update_check(audit_id, 1, confirmed(open_relay()))
        assert (await store.get_audit(audit_id)).checks[0].derived is None  # never the unconfirmed row's JSON
        body = json.loads(shown.audit_bytes(await shown.load(store, audit_id), None, None))
        assert body["checks"][0]["reason"] == "delivered"
    finally:
        await store.close()


async def test_partners_are_read_once_at_start(settings, tmp_path):
    partners = tmp_path / "partners.json"
    partners.write_text('{"partners": [{"name": "Agence Une", "country": "FR", "url": "https://example.org/"}]}')
    settings.partners_file = str(partners)
    async with running_app(settings) as client:
        assert "Agence Une" in (await client.get("/")).text
        partners.write_text('{"partners": [{"name": "Agence Deux", "country": "FR", "url": "https://example.org/"}]}')
        html = (await client.get("/")).text
    assert "Agence Une" in html and "Agence Deux" not in html


async def test_a_page_rendered_once_carries_each_visitors_own_csrf_token_and_language(monkeypatch):
    from types import SimpleNamespace

    from jinja2 import ChoiceLoader, DictLoader

    from app.web import pages

    env = pages.templates.env
    monkeypatch.setattr(env, "loader", ChoiceLoader([DictLoader({"t.html": "{{ csrf }}|{{ lang }}|{{ n() }}"}),
                                                     env.loader]))
    monkeypatch.setattr(env, "cache", {})
    cache = pages.RenderedPages(size=2)
    renders = []
    request = SimpleNamespace(base_url="http://testserver/")

    def page(csrf: str, lang: str = "en", key: tuple = ()) -> str:
        context = {"csrf": csrf, "lang": lang, "path": "/", "n": lambda: renders.append(1) or len(renders)}
        page, has_form = cache.get(request, "t.html", context, key)
        assert has_form
        return page

    assert page("a" * 64) == f"{'a' * 64}|en|1"
    assert page("b" * 64) == f"{'b' * 64}|en|1"  # the same page, rendered once, with this visitor's token
    assert page("c" * 64, "es") == f"{'c' * 64}|es|2"
    assert page("d" * 64, key=("x",)) == f"{'d' * 64}|en|3"
    assert page("e" * 64) == f"{'e' * 64}|en|4"  # bounded: the least recently used page went first


async def test_a_page_without_a_form_sets_no_csrf_cookie_and_one_with_a_form_does(client):
    home = await client.get("/")
    assert home.status_code == 200 and 'name="csrf"' not in home.text
    assert CSRF_COOKIE not in home.cookies
    start = await client.get("/start")
    assert CSRF_COOKIE in start.cookies and 'name="csrf"' in start.text


async def test_the_result_page_stores_the_guides_of_rows_stored_without_them(client, monkeypatch):
    site = client.app.state.sys
    monkeypatch.setattr(site.store, "derive", None)
    audit_id = await stored_audit(site.store, open_relay())
    monkeypatch.setattr(site.store, "derive", site.shown.derive)
    first = await client.get(f"/audits/{audit_id}")
    assert first.status_code == 200 and "/guides/postfix?audit=" in first.text
    stored = (await site.store.get_audit(audit_id)).checks[0].derived
    assert stored is not None and stored.guides_key == site.shown.guides_key and stored.guides[0] == "postfix"
    monkeypatch.setattr(GuideLibrary, "for_check", never)
    assert (await client.get(f"/audits/{audit_id}")).status_code == 200
