"""ENGINE_VERSION discipline: the version of the checks is recorded beside a digest of the code that decides verdicts.

`data/engine-versions.txt` holds one line per engine version, oldest first: `<version> <sha256 of the sources>`.
A test fails when the sources change and no new line names a new version, so a stored audit's `engine_version`
always tells which logic produced it. After a change to a probe or to the verdict rules:

    python -m app.engine     # prints the line to append (with a new ENGINE_VERSION in app/__init__.py)
"""

from __future__ import annotations

import hashlib
import sys

from app import ENGINE_VERSION, PROJECT_ROOT

# what decides a verdict: every probe, and the vocabulary with its summary rule
SOURCES = ("app/probes/*.py", "app/verdicts.py")
VERSIONS_FILE = PROJECT_ROOT / "data" / "engine-versions.txt"


def digest() -> str:
    """sha256 over the sources' paths and bytes, in path order."""
    sha = hashlib.sha256()
    for pattern in SOURCES:
        for path in sorted(PROJECT_ROOT.glob(pattern)):
            sha.update(path.relative_to(PROJECT_ROOT).as_posix().encode() + b"\0")
            sha.update(path.read_bytes() + b"\0")
    return sha.hexdigest()


def recorded() -> list[tuple[str, str]]:
    """(version, digest) per line of data/engine-versions.txt, oldest first; `#` starts a comment."""
    lines = VERSIONS_FILE.read_text(encoding="utf-8").splitlines()
    pairs = [line.split("#", 1)[0].split() for line in lines]
    return [(pair[0], pair[1]) for pair in pairs if pair]


if __name__ == "__main__":
    print(f"{ENGINE_VERSION} {digest()}")
    sys.exit(0)
