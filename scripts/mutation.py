"""`make mutation`: mutmut over the trust-critical functions, then the score per module.

mutmut ([tool.mutmut] in pyproject.toml) copies app/ to mutants/ and makes the mutants; this script runs only the
mutants of the functions in SCOPE (the rules a verdict's trust rests on), then reads mutmut's results and prints
killed / total per module. A surviving mutant must either be killed by a test (tests/mutation/) or be listed in
tests/mutation-survivors.md, by its mutmut name, with why it changes no behaviour. Exit status 1 when a survivor is
neither, or when the score is under the goal.

    python scripts/mutation.py            # a clean run (removes mutants/ first)
    python scripts/mutation.py --keep     # reuse mutants/ and mutmut's cached results
    python scripts/mutation.py --report   # only print the score of the last run
    python scripts/mutation.py --rerun-survivors   # run the last run's unexplained survivors again (new tests)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SURVIVORS_FILE = ROOT / "tests" / "mutation-survivors.md"
GOAL = 90.0

# module -> the functions mutated in it (mutmut names: x_function, xǁClassǁmethod). "*" is the whole module.
SCOPE: dict[str, list[str]] = {
    # relay classification and proof: what turns a reply into a verdict, and what counts as proof (OPEN only
    # after the end of data); not the session plumbing (reconnects, STARTTLS, greylisting retries)
    "app.probes.smtp": ["x_hostname_or_none", "x_address_literal", "x_local_domain", "x_addresses_for",
                        "x_classify_refusal", "x_greylist_delay", "x__with_reply", "xǁRelaySessionǁ_attempt",
                        "xǁRelaySessionǁ_offers", "xǁRelaySessionǁ_checked"],
    # the layer on aiosmtplib: the command guard, the reply check, the bounded evidence (Reply's properties and
    # the error translation are not mutated: mutmut skips decorated functions)
    "app.probes.smtp_wire": ["x_check_command", "x__reply", "xǁ_RecordingProtocolǁdata_received"],
    # proxy proof: the tokens and who reached the canary (not the TLS certificate or the listeners' start/stop)
    "app.probes.canary": ["x_new_check_id", "xǁCanaryǁ__init__", "xǁCanaryǁtoken", "xǁCanaryǁrecord",
                          "xǁCanaryǁseen_from", "xǁSmtpCanaryǁ_handle", "xǁHttpCanaryǁ_handle"],
    # proxy proof: each runner's token check, OPEN only when a runner returned, confirmed only when OPEN
    "app.probes.proxy": ["x__smtp_through", "x_http_get", "x_http_post", "x_connect_tls", "x__run_check",
                         "x__token_returned", "x__reached_but_not_returned", "x__row"],
    # the one mapping of connection failures to verdicts, and the row every probe emits
    "app.probes.base": ["x_connect_failure", "x_check_result"],
    "app.probes.sink": ["*"],
    # blocklist proof: which answers are a listing (loopback codes, never a refusal code), what a code means, the
    # name asked (reversed octets, IPv6 nibbles), and that only real answers are cached
    "app.probes.blocklist": ["xǁCodeǁcovers", "xǁBlocklistǁcode", "xǁBlocklistǁquery_name", "x__answer_range",
                             "x_ask", "x__listed_reason", "x_run_address"],
    # the summary rules: what one service's rows add up to
    "app.verdicts": ["x_summarize", "x_summarize_blocklist", "x_summarize_service", "x_summarize_audit"],
    "app.access.targets": ["*"],
    "app.access.addresses": ["*"],
    "app.access.requester": ["*"],
    "app.admission": ["*"],
    "app.web.security": ["*"],
}


def globs() -> list[str]:
    return [f"{module}.{function}__mutmut_*" if function != "*" else f"{module}.*"
            for module, functions in SCOPE.items() for function in functions]


def in_scope(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in globs())


def results() -> dict[str, int | None]:
    found: dict[str, int | None] = {}
    for meta in (ROOT / "mutants" / "app").rglob("*.py.meta"):
        found.update(json.loads(meta.read_text())["exit_code_by_key"])
    return {name: code for name, code in found.items() if in_scope(name)}


def listed_equivalent() -> set[str]:
    if not SURVIVORS_FILE.exists():
        return set()
    return set(re.findall(r"`(app\.[^`\s]+__mutmut_\d+)`", SURVIVORS_FILE.read_text()))


def status(code: int | None) -> str:
    if code in (1, 3):
        return "killed"
    if code in (24, -24, 36, 152, 255):
        return "timeout"  # the mutant hung the tests: caught
    if code == 0:
        return "survived"
    if code in (5, 33):
        return "no tests"
    if code is None:
        return "not checked"
    return f"other ({code})"


def report() -> int:
    found = results()
    if not found:
        print("no mutmut results in mutants/: run `make mutation` first")
        return 1
    equivalent = listed_equivalent()
    per_module: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    unexplained: list[str] = []
    for name, code in sorted(found.items()):
        module = name.split(".x_")[0].split(".xǁ")[0]
        kind = status(code)
        per_module[module]["total"] += 1
        if kind in ("killed", "timeout"):
            per_module[module]["killed"] += 1
        elif name in equivalent:
            per_module[module]["equivalent"] += 1
        else:
            per_module[module]["other"] += 1
            unexplained.append(f"{name}: {kind}")
    print()
    print(f"{'module':28} {'killed':>7} {'total':>6} {'score':>7} {'equivalent':>11} {'unexplained':>12}")
    totals: dict[str, int] = defaultdict(int)
    for module in SCOPE:
        row = per_module.get(module, {})
        for key in ("killed", "total", "equivalent", "other"):
            totals[key] += row.get(key, 0)
        score = 100.0 * row.get("killed", 0) / row["total"] if row.get("total") else 0.0
        print(f"{module:28} {row.get('killed', 0):7} {row.get('total', 0):6} {score:6.1f}% "
              f"{row.get('equivalent', 0):11} {row.get('other', 0):12}")
    score = 100.0 * totals["killed"] / totals["total"]
    print(f"{'all':28} {totals['killed']:7} {totals['total']:6} {score:6.1f}% {totals['equivalent']:11} "
          f"{totals['other']:12}")
    print()
    print(f"mutation score: {totals['killed']}/{totals['total']} killed = {score:.1f}% (goal {GOAL:g}%); "
          f"{totals['equivalent']} survivors listed as equivalent in {SURVIVORS_FILE.relative_to(ROOT)}")
    if unexplained:
        print(f"\n{len(unexplained)} mutants neither killed nor listed as equivalent "
              "(see one with `mutmut show NAME` in this folder):")
        for line in unexplained:
            print("  " + line)
    stale = sorted(name for name in equivalent if found.get(name) is not None and status(found[name]) == "killed")
    if stale:
        print(f"\nlisted as equivalent but now killed (remove from the list): {', '.join(stale)}")
    return 0 if not unexplained and score >= GOAL else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="reuse mutants/ and mutmut's cached results")
    parser.add_argument("--report", action="store_true", help="only print the score of the last run")
    parser.add_argument("--rerun-survivors", action="store_true",
                        help="run the last run's survivors again (not those listed as equivalent)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    os.chdir(ROOT)
    if args.report:
        return report()
    mutmut = [str(Path(sys.executable).with_name("mutmut")), "run", "--max-children", str(args.max_children)]
    if args.rerun_survivors:
        equivalent = listed_equivalent()
        names = [name for name, code in results().items()
                 if status(code) not in ("killed", "timeout") and name not in equivalent]
        if not names:
            print("no survivors to run again")
            return report()
        targets = names
    else:
        if not args.keep:
            shutil.rmtree(ROOT / "mutants", ignore_errors=True)
        targets = globs()
    started = time.monotonic()
    # mutmut's own output is a spinner per mutant: keep its log, print the summary lines
    log = ROOT / "mutants" / "mutation-run.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as out:
        code = subprocess.call(mutmut + targets, stdout=out, stderr=subprocess.STDOUT)
    elapsed = time.monotonic() - started
    if code != 0:
        print(log.read_text()[-4000:])
        print(f"mutmut failed (exit {code}); its output is in {log.relative_to(ROOT)}")
        return code
    print(f"mutmut ran in {elapsed / 60:.1f} min ({elapsed:.0f} s); its output is in {log.relative_to(ROOT)}")
    return report()


if __name__ == "__main__":
    sys.exit(main())
