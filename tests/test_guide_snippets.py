"""Every configuration snippet in the guides, parsed by the software that will read it (CI runs them all)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from snippet_validators import VALIDATORS, SnippetRejected, fresh_folder

from app.guides import GuideLibrary

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = GuideLibrary(ROOT / "guides")
BLOCKS = [(guide.slug, block) for guide in LIBRARY.all() for block in guide.blocks
          if block.validate and block.validate != "none"]


def test_there_are_validated_snippets():
    assert len(BLOCKS) >= 1 or not any(g.service != "general" for g in LIBRARY.all())


@pytest.mark.parametrize("slug,block", BLOCKS, ids=[f"{slug}:{block.line}:{block.validate}" for slug, block in BLOCKS])
def test_snippet_is_accepted_by_its_software(slug, block):
    with tempfile.TemporaryDirectory(prefix="snippet-") as base:
        folder = fresh_folder(Path(base), "conf")
        VALIDATORS[block.validate](block.content, folder)


@pytest.mark.parametrize("validator,bad", [
    ("postfix-main", "smtpd_relay_restrictionz = permit_mynetworks, reject_unauth_destination\n"),
    ("squid", "http_access allow nosuchacl\n"),
    ("nginx", "server { listen 127.0.0.1:1; proxy_passs http://x; }\n"),
    ("apache", "ProxyRequestz On\n"),
    ("privoxy", "permit-accessz 127.0.0.1\n"),
    ("dante", "client pas { from: 127.0.0.0/8 to: 0.0.0.0/0 }\n"),
    ("exim", "hostlist relay_from_hosts = 127.0.0.1\nno_such_option = 1\n"),
    ("sendmail-mc", "FEATURE(`relay_entire_domain'\n"),
    ("tinyproxy", "Allow not-an-address-or-network!\n"),
])
def test_validators_catch_a_broken_snippet(validator, bad):
    """Each validator must be able to fail: a typo'd directive is refused."""
    with tempfile.TemporaryDirectory(prefix="snippet-") as base:
        with pytest.raises(SnippetRejected):
            VALIDATORS[validator](bad, fresh_folder(Path(base), "conf"))
