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


# Every guide for software Debian ships has its configuration checked by that software.
VALIDATED_PRODUCTS = {"postfix": "postfix-main", "sendmail": "sendmail-mc", "exim": "exim", "squid": "squid",
                      "apache": "apache", "nginx": "nginx", "tinyproxy": "tinyproxy", "privoxy": "privoxy",
                      "dante": "dante"}


@pytest.mark.parametrize("slug,validator", sorted(VALIDATED_PRODUCTS.items()))
def test_guides_of_debian_software_have_validated_snippets(slug, validator):
    guide = LIBRARY.get(slug)
    assert guide is not None, f"no guide {slug}"
    assert any(block.validate == validator for block in guide.blocks), f"{slug} has no {validator} block"


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
