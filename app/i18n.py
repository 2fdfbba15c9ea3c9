"""Languages: every interface string goes through gettext (Babel catalogues under locales/, compiled at install).

Adding a language is a catalogue, not code: `pybabel init -l xx` and translate; every catalogue under locales/ is
offered, under its own name for itself. The guides' bodies stay in English; their section headings are translated.
"""

from __future__ import annotations

import gettext
from contextvars import ContextVar
from functools import cache

from babel import Locale, UnknownLocaleError
from babel.support import Translations

from app import PROJECT_ROOT

LOCALES = PROJECT_ROOT / "locales"
DEFAULT = "en"


def _available() -> dict[str, str]:
    """English, then every language that has a catalogue, named in itself (es -> Español)."""
    found = {DEFAULT: "English"}
    for po in sorted(LOCALES.glob("*/LC_MESSAGES/messages.po")):
        code = po.parent.parent.name
        try:
            name = Locale.parse(code).get_display_name(code) or code
        except (ValueError, UnknownLocaleError):
            continue
        found[code] = name[:1].upper() + name[1:]
    return found


LANGUAGES = _available()
COOKIE = "sys_lang"

# one shared NullTranslations that nothing modifies: a safe default for every context
_current: ContextVar[gettext.NullTranslations] = ContextVar(
    "translations", default=gettext.NullTranslations())  # noqa: B039


@cache
def translations(language: str) -> gettext.NullTranslations:
    if language == DEFAULT:
        return gettext.NullTranslations()
    return Translations.load(dirname=str(LOCALES), locales=[language], domain="messages")


def negotiate(query: str | None, cookie: str | None, accept_language: str | None) -> str:
    """?lang= first (the visible switch), then the cookie it set, then the browser's Accept-Language."""
    for choice in (query, cookie):
        if choice in LANGUAGES:
            return choice
    weighted = []
    for index, part in enumerate((accept_language or "")[:500].split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        quality = 1.0
        if params.strip().startswith("q="):
            try:
                quality = float(params.strip()[2:])
            except ValueError:
                quality = 0.0
        weighted.append((-quality, index, tag.strip().lower().split("-")[0]))
    for _q, _i, language in sorted(weighted):
        if language in LANGUAGES:
            return language
    return DEFAULT


def activate(language: str) -> None:
    _current.set(translations(language))


def _(message: str) -> str:
    return _current.get().gettext(message)


def ngettext(singular: str, plural: str, count: int) -> str:
    return _current.get().ngettext(singular, plural, count)


def N_(message: str) -> str:
    """Marks a string for the catalogue where it is defined; it is translated where it is shown."""
    return message
