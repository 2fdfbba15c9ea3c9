"""Every configuration snippet in the guides, parsed by the software that will read it (CI runs them all)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from snippet_validators import VALIDATORS, SnippetRejected, fresh_folder

from app.guides import (
    COMMAND_LANGUAGES,
    UNVALIDATED_BLOCKS,
    UNVALIDATED_PRODUCTS,
    VALIDATED_PRODUCTS,
    GuideLibrary,
)

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = GuideLibrary(ROOT / "guides")
BLOCKS = [(guide.slug, block) for guide in LIBRARY.all() for block in guide.blocks
          if block.validate and block.validate != "none"]


@pytest.mark.parametrize("product,validators", sorted(VALIDATED_PRODUCTS.items()))
def test_guides_of_debian_software_have_validated_snippets(product, validators):
    """Every guide for software Debian ships has its configuration checked by that software: a block its validator
    runs, and no configuration block left at validate=none (that is for commands to type, or says why=)."""
    guides = [guide for guide in LIBRARY.all() if product in guide.products]
    assert guides, f"no guide for {product}"
    for guide in guides:
        assert any(block.validate in validators for block in guide.blocks), f"{guide.slug} has no {validators} block"
        unvalidated = [(block.line, block.language) for block in guide.blocks if block.validate == "none"
                       and block.language not in COMMAND_LANGUAGES and block.why not in UNVALIDATED_BLOCKS]
        assert unvalidated == [], f"{guide.path}: configuration blocks at validate=none: {unvalidated}"


def test_declared_validators_exist_and_every_product_guide_is_declared():
    assert {v for validators in VALIDATED_PRODUCTS.values() for v in validators} <= set(VALIDATORS)
    for guide in LIBRARY.all():
        if guide.service != "general":
            assert set(guide.products) & (VALIDATED_PRODUCTS.keys() | UNVALIDATED_PRODUCTS.keys()), guide.slug


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
    ("opensmtpd", 'match from any fro any action "relay"\n'),
])
def test_validators_catch_a_broken_snippet(validator, bad):
    """Each validator must be able to fail: a typo'd directive is refused."""
    with tempfile.TemporaryDirectory(prefix="snippet-") as base:
        with pytest.raises(SnippetRejected):
            VALIDATORS[validator](bad, fresh_folder(Path(base), "conf"))
