"""Dependencies exact: every third-party module app/ imports is declared in pyproject.toml, and every declared
run-time dependency is imported by app/ (or named below with the reason it is needed without an import)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib

from support import ROOT

# declared, needed at run time, never imported by our own code
USED_WITHOUT_IMPORT = {
    "jinja2": "fastapi.templating.Jinja2Templates renders our pages with it; fastapi does not depend on it",
    "python-multipart": "FastAPI's Form() parameters need it to parse form bodies",
}


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {normalised(re.split(r"[\s\[<>=~!;]", spec, maxsplit=1)[0]) for spec in project["dependencies"]}


def imported_distributions() -> dict[str, str]:
    """distribution -> one module of app/ that imports it."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, str] = {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top == "app" or top in sys.stdlib_module_names:
                    continue
                for distribution in owners.get(top, [f"(no distribution provides {top})"]):
                    found.setdefault(normalised(distribution), str(path.relative_to(ROOT)))
    return found


def test_everything_imported_is_declared():
    missing = {d: where for d, where in imported_distributions().items() if d not in declared()}
    assert missing == {}, "imported by app/ but not in [project] dependencies"


def test_nothing_declared_is_unused():
    unused = declared() - set(imported_distributions()) - set(USED_WITHOUT_IMPORT)
    assert unused == set(), "declared in [project] dependencies but never imported by app/"


def test_the_exceptions_are_still_declared():
    assert set(USED_WITHOUT_IMPORT) <= declared()
