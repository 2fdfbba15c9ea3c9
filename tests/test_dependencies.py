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


# extras a feature of the site needs (not the tools of tests and lint): imported only inside the function that
# uses the feature, so that the default install never needs them
FEATURE_EXTRAS_EXCLUDED = {"test", "lint"}


def declared_for_features() -> set[str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return {normalised(re.split(r"[\s\[<>=~!;]", spec, maxsplit=1)[0])
            for name, specs in extras.items() if name not in FEATURE_EXTRAS_EXCLUDED for spec in specs}


def imported_distributions(top_level_only: bool = False) -> dict[str, str]:
    """distribution -> one module of app/ that imports it (at module level only, if asked)."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, str] = {}
    for path in sorted((ROOT / "app").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in (_module_level(tree) if top_level_only else ast.walk(tree)):
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


def _module_level(tree: ast.Module) -> list[ast.AST]:
    """The statements that run when the module is imported (also inside if/try at module level)."""
    found: list[ast.AST] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        found.append(node)
        if isinstance(node, (ast.If, ast.Try)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def test_everything_imported_is_declared():
    missing = {d: where for d, where in imported_distributions().items()
               if d not in declared() and d not in declared_for_features()}
    assert missing == {}, "imported by app/ but neither in [project] dependencies nor in a feature's extra"


def test_a_feature_extra_is_imported_only_where_the_feature_is_used():
    """An import of an extra at module level would break the default install (`pip install -e .`)."""
    at_import = {d: where for d, where in imported_distributions(top_level_only=True).items()
                 if d not in declared()}
    assert at_import == {}, "a feature's extra imported at module level"


def test_nothing_declared_is_unused():
    unused = declared() - set(imported_distributions()) - set(USED_WITHOUT_IMPORT)
    assert unused == set(), "declared in [project] dependencies but never imported by app/"


def test_the_exceptions_are_still_declared():
    assert set(USED_WITHOUT_IMPORT) <= declared()
