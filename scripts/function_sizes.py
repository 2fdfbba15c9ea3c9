"""The size of every function in app/: lines (def to last line) and cyclomatic complexity (ruff's C901 count).

    python scripts/function_sizes.py            the 15 longest functions, as a table
    python scripts/function_sizes.py --check    exit 1 if any function is over 40 lines or complexity 10 (make lint)
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 40
MAX_COMPLEXITY = 10


def lengths(root: Path) -> dict[tuple[str, int], tuple[str, int]]:
    """(file, line of def) -> (qualified name, lines)."""
    found: dict[tuple[str, int], tuple[str, int]] = {}
    for path in sorted(root.rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        tree = ast.parse(path.read_text(), relative)

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                    name = f"{prefix}{child.name}"
                    start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                    found[(relative, child.lineno)] = (name, (child.end_lineno or child.lineno) - start + 1)
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(tree, "")
    return found


def complexities(root: Path) -> dict[tuple[str, int], int]:
    """(file, line of def) -> cyclomatic complexity, from ruff's mccabe rule with a threshold of 0."""
    ruff = Path(sys.executable).parent / "ruff"
    out = subprocess.run([str(ruff), "check", "--select", "C901", "--config", "lint.mccabe.max-complexity=0",
                          "--output-format", "json", "--exit-zero", str(root)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    result = {}
    for finding in json.loads(out):
        match = re.search(r"too complex \((\d+) > 0\)", finding["message"])
        if match:
            relative = str(Path(finding["filename"]).resolve().relative_to(ROOT))
            result[(relative, finding["location"]["row"])] = int(match.group(1))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="fail on any function over the limits")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    sizes, complexity = lengths(ROOT / "app"), complexities(ROOT / "app")
    rows = sorted(((lines, complexity.get(key, 1), f"{key[0]}:{key[1]}", name)
                   for key, (name, lines) in sizes.items()), reverse=True)
    if args.check:
        over = [r for r in rows if r[0] > MAX_LINES or r[1] > MAX_COMPLEXITY]
        for lines, cc, where, name in over:
            print(f"{where}: {name} has {lines} lines, complexity {cc} (limits {MAX_LINES}, {MAX_COMPLEXITY})")
        print(f"{len(rows)} functions, {len(over)} over the limits")
        return 1 if over else 0
    worst_cc = sorted(rows, key=lambda r: r[1], reverse=True)[:5]
    print(f"{'lines':>5} {'cc':>3}  function")
    for lines, cc, where, name in rows[:args.top]:
        print(f"{lines:5d} {cc:3d}  {name} ({where})")
    print("most complex: " + ", ".join(f"{name} {cc}" for _l, cc, _w, name in worst_cc))
    print(f"{len(rows)} functions; over {MAX_LINES} lines: {sum(r[0] > MAX_LINES for r in rows)}; "
          f"over complexity {MAX_COMPLEXITY}: {sum(r[1] > MAX_COMPLEXITY for r in rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
