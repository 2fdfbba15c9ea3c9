"""ENGINE_VERSION changes whenever the code that decides verdicts changes (issue 12, item 5)."""

from app import ENGINE_VERSION
from app.engine import digest, recorded


def test_the_verdict_code_is_recorded_under_the_current_engine_version():
    versions = recorded()
    assert versions, "data/engine-versions.txt is empty"
    latest_version, latest_digest = versions[-1]
    assert latest_digest == digest(), (
        "app/probes/ or app/verdicts.py changed: set a new ENGINE_VERSION in app/__init__.py and append the line "
        "`python -m app.engine` prints to data/engine-versions.txt")
    assert latest_version == ENGINE_VERSION


def test_each_version_names_one_state_of_the_code():
    versions = recorded()
    names = [v for v, _d in versions]
    digests = [d for _v, d in versions]
    assert len(set(names)) == len(names) and len(set(digests)) == len(digests)  # a new digest needs a new version
    # versions are dates (YYYY.MM.DD[.N]): they only go up
    assert names == sorted(names, key=lambda name: tuple(int(part) for part in name.split(".")))
