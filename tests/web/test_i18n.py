"""Languages: English and Spanish, chosen by Accept-Language or the visible switch; the catalogue is complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from babel.messages.pofile import read_po
from support import wait_done

from app.i18n import negotiate

ROOT = Path(__file__).resolve().parent.parent.parent


@pytest.mark.parametrize("query,cookie,header,expected", [
    (None, None, None, "en"), (None, None, "es-ES,es;q=0.9,en;q=0.8", "es"), (None, None, "fr-FR, es;q=0.5", "es"),
    (None, None, "en;q=0.2, es;q=0.9", "es"), (None, None, "de, fr", "en"), ("en", None, "es", "en"),
    (None, "es", "en", "es"), ("xx", "es", "en", "es"), (None, None, "es;q=junk, en", "en"),
    (None, None, "," * 5000, "en"),
])
def test_negotiation(query, cookie, header, expected):
    assert negotiate(query, cookie, header) == expected


async def test_spanish_from_accept_language(client):
    page = await client.get("/", headers={"Accept-Language": "es-MX,es;q=0.9"})
    assert '<html lang="es">' in page.text and page.headers["content-language"] == "es"
    assert "Did you receive a letter" not in page.text
    english = await client.get("/", headers={"Accept-Language": "en-GB"})
    assert "Did you receive a letter about your server?" in english.text


async def test_the_switch_sets_a_cookie_that_sticks(client):
    switched = await client.get("/start?lang=es", headers={"Accept-Language": "en"})
    assert '<html lang="es">' in switched.text and switched.cookies.get("sys_lang") == "es"
    after = await client.get("/guides", headers={"Accept-Language": "en"})
    assert '<html lang="es">' in after.text
    back = await client.get("/guides?lang=en")
    assert '<html lang="en">' in back.text


async def test_a_result_page_in_spanish(client):
    audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
    await wait_done(client, audit_id)
    page = (await client.get(f"/audits/{audit_id}", headers={"Accept-Language": "es"})).text
    assert "What it means" not in page and "Your server refused" not in page
    api = (await client.get(f"/api/v1/audits/{audit_id}", headers={"Accept-Language": "es"})).json()
    assert api["summary"]["relay"] == "unreachable"  # the API keeps the vocabulary, whatever the language


def test_the_catalogue_is_current_and_complete(tmp_path):
    """Every interface string of the code and templates is in the template, and translated in every language."""
    pot = tmp_path / "messages.pot"
    subprocess.run([sys.executable, "-m", "babel.messages.frontend", "extract", "-F", str(ROOT / "babel.cfg"),
                    "-o", str(pot), "--no-location", "--ignore-dirs", ".venv node_modules .git tests var artifacts",
                    str(ROOT)], check=True, cwd=ROOT, capture_output=True)
    with pot.open("rb") as source:
        wanted = {m.id for m in read_po(source) if m.id}
    assert len(wanted) > 100
    for po in (ROOT / "locales").glob("*/LC_MESSAGES/messages.po"):
        with po.open("rb") as source:
            catalog = read_po(source)
        have = {m.id: m.string for m in catalog if m.id}
        missing = sorted(wanted - have.keys())
        # a plural entry has one form per plural of the language (Spanish: 3): every one must be written
        untranslated = sorted(k for k in wanted & have.keys()
                              if not have[k] or (isinstance(have[k], tuple) and not all(have[k])))
        assert missing == [], f"{po}: not in the catalogue (run pybabel extract and update): {missing[:5]}"
        assert untranslated == [], f"{po}: untranslated: {untranslated[:5]}"


async def test_guide_section_headings_speak_the_visitors_language(client):
    spanish = (await client.get("/guides/squid", headers={"Accept-Language": "es"})).text
    assert 'id="fix">Corregir</h2>' in spanish and 'id="what-you-see">Lo que ve</h2>' in spanish
    english = (await client.get("/guides/squid")).text
    assert 'id="fix">Fix</h2>' in english
