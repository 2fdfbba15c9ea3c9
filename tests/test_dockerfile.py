"""The Dockerfile and .dockerignore, checked without Docker (the engine cannot run here).

A tiny parser reads the Dockerfile as Docker does (comments, line continuations, exec and shell forms); each
check below is then run twice: on the real file, where it must pass, and on broken variants of it, made by
editing the real text, where it must fail. That proves every check can catch what it is there to catch.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

# What the image must contain for the site to run from its source tree (see the Dockerfile's comments).
REQUIRED_SOURCES = ["pyproject.toml", "app", "templates", "static", "guides", "data"]
if isinstance(PYPROJECT["project"].get("readme"), str):  # setuptools refuses to build without it
    REQUIRED_SOURCES.append(PYPROJECT["project"]["readme"])


# --- a tiny Dockerfile parser --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper-case: FROM, RUN, COPY, ...
    args: str  # everything after the keyword, continuations joined
    line: int  # where it starts (1-based)

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        if not self.args.startswith("["):
            return None
        try:
            value = json.loads(self.args)
        except ValueError:
            return None  # Docker, too, runs a malformed JSON array as a shell command
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        return None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order. Comment lines (also inside a continuation) and blank lines are dropped; a line
    ending in a backslash continues on the next one. Parser directives and heredocs are not supported."""
    lines = text.splitlines()
    if lines and re.match(r"#\s*escape\s*=", lines[0], re.IGNORECASE):
        raise ValueError("this parser only knows the default escape character")
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):  # also inside a continuation, as Docker does
            continue
        if not pending:
            start = number
        body = raw.rstrip()
        if body.endswith("\\"):
            pending.append(body[:-1])
            continue
        pending.append(raw)
        instructions.append(_instruction("".join(pending), start))
        pending = []
    if pending:  # a continuation on the last line: Docker takes what there is
        instructions.append(_instruction("".join(pending), start))
    return instructions


def _instruction(joined: str, line: int) -> Instruction:
    keyword, _, args = joined.strip().partition(" ")
    args = args.strip()
    if re.search(r"<<-?\s*['\"]?\w+", args) and keyword.upper() in ("RUN", "COPY", "ADD"):
        raise ValueError(f"line {line}: heredocs are not supported by this parser")
    return Instruction(keyword.upper(), args, line)


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last build stage (the image that is shipped)."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1]:]


def _flags_and_words(args: str) -> tuple[dict[str, str], list[str]]:
    """`--chown=a:b --from=x src dst` -> ({"chown": "a:b", "from": "x"}, ["src", "dst"])."""
    flags: dict[str, str] = {}
    words = args.split()
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name.lower()] = value
    return flags, words


def _installs(ins: Instruction) -> bool:
    return ins.keyword == "RUN" and bool(re.search(r"\b(pip|pip3|apt-get|apt)\b[^&;|]*\binstall\b", ins.args))


# --- the checks (each raises AssertionError with what is wrong) --------------------------------------------------
def check_base_image(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    flags, words = _flags_and_words(stage[0].args)
    image = words[0]
    name, _, tag = image.split("@")[0].rpartition(":")
    assert name in ("python", "library/python", "docker.io/library/python"), f"base image is not python: {image}"
    match = re.fullmatch(r"3\.(\d+)(?:\.\d+)?-slim-([a-z]+)", tag)
    assert match, f"base image is not a python *-slim-<debian release> tag: {image}"
    minimum = re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert minimum and int(match.group(1)) >= int(minimum.group(1)), \
        f"{image} is older than requires-python {PYPROJECT['project']['requires-python']}"


def _effective_user(stage: list[Instruction], before: int) -> tuple[int, str] | None:
    users = [(i, ins.args.split()[0]) for i, ins in enumerate(stage[:before]) if ins.keyword == "USER"]
    return users[-1] if users else None


def check_user(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    cmds = [i for i, ins in enumerate(stage) if ins.keyword == "CMD"]
    assert cmds, "no CMD"
    found = _effective_user(stage, cmds[-1])
    assert found, "no USER before CMD: the site would run as root"
    index, user = found
    name, _, group = user.partition(":")
    assert name not in ("root", "0"), f"CMD runs as {user}"
    installs = [i for i, ins in enumerate(stage) if _installs(ins)]
    assert installs, "no install step found"
    late = [stage[i].line for i in installs if i > index]
    assert not late, f"packages are installed after USER {user} (line(s) {late}): install as root, then drop"


def check_expose(instructions: list[Instruction]) -> None:
    ports = [port.split("/")[0] for ins in final_stage(instructions) if ins.keyword == "EXPOSE"
             for port in ins.args.split()]
    assert "8000" in ports, f"EXPOSE 8000 missing (exposed: {ports})"


def check_cmd(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    assert not [ins for ins in stage if ins.keyword == "ENTRYPOINT"], "an ENTRYPOINT would change what CMD runs"
    cmds = [ins for ins in stage if ins.keyword == "CMD"]
    assert cmds, "no CMD"
    argv = cmds[-1].exec_form()
    assert argv is not None, f"CMD is in shell form (a shell as PID 1 does not pass SIGTERM on): {cmds[-1].args}"
    assert argv[:2] == ["secure-your-server", "serve"], f"CMD does not run `secure-your-server serve`: {argv}"
    options: dict[str, str] = {}
    rest = argv[2:]
    while rest:
        word = rest.pop(0)
        if word.startswith("--") and "=" in word:
            key, _, value = word.partition("=")
            options[key] = value
        elif word.startswith("--") and rest:
            options[word] = rest.pop(0)
    assert options.get("--host") == "0.0.0.0", f"CMD must listen on every address (--host 0.0.0.0): {argv}"
    assert options.get("--port") == "8000", f"CMD must listen on the exposed port (--port 8000): {argv}"


def _copy_sources(stage: list[Instruction]) -> list[tuple[int, str]]:
    sources: list[tuple[int, str]] = []
    for i, ins in enumerate(stage):
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = ins.exec_form()
        if words is None:
            flags, words = _flags_and_words(ins.args)
            if "from" in flags:  # from another stage or image, not from the build context
                continue
        for source in words[:-1]:
            cleaned = source.strip("/")
            cleaned = cleaned[2:] if cleaned.startswith("./") else cleaned
            sources.append((i, cleaned.rstrip("/") or "."))
    return sources


def check_copies(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    sources = _copy_sources(stage)
    copied = {source for _, source in sources}
    if "." not in copied:
        missing = [s for s in REQUIRED_SOURCES if s not in copied]
        assert not missing, f"the image lacks {missing} (copied: {sorted(copied)})"


def check_editable_install(instructions: list[Instruction]) -> None:
    """The code finds templates/static/guides next to its own source, so it must be installed editable, from a
    tree that already holds every required source."""
    stage = final_stage(instructions)
    project_installs = [i for i, ins in enumerate(stage) if ins.keyword == "RUN"
                        and re.search(r"\bpip3? install\b[^&;|]*\s(-e|--editable)(\s+|=)\.(\s|$)", ins.args + " ")]
    assert project_installs, "the project is not installed with `pip install -e .`"
    install = project_installs[-1]
    copied_at = {source: i for i, source in _copy_sources(stage)}
    late = [s for s in REQUIRED_SOURCES if copied_at.get(s, copied_at.get(".", install)) > install]
    assert not late, f"{late} copied only after `pip install -e .`"


def check_healthcheck(instructions: list[Instruction]) -> None:
    checks = [ins for ins in final_stage(instructions) if ins.keyword == "HEALTHCHECK"]
    assert checks, "no HEALTHCHECK"
    args = checks[-1].args
    assert args.upper() != "NONE", "HEALTHCHECK NONE"
    _, sep, command = args.partition("CMD ")
    assert sep, f"HEALTHCHECK without CMD: {args}"
    assert re.search(r"https?://(127\.0\.0\.1|localhost):8000/healthz\b", command), \
        f"HEALTHCHECK does not ask /healthz on port 8000: {command}"
    assert not re.search(r"\b(curl|wget)\b", command), f"the slim image has neither curl nor wget: {command}"


def check_database(instructions: list[Instruction]) -> None:
    stage = final_stage(instructions)
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            if "=" in ins.args.split()[0]:
                env.update(pair.split("=", 1) for pair in ins.args.split())
            else:  # legacy `ENV key value`
                key, _, value = ins.args.partition(" ")
                env[key] = value.strip()
    url = env.get("SECURE_DATABASE_URL", "")
    match = re.fullmatch(r"sqlite:///(/.+)/[^/]+", url)
    assert match, f"SECURE_DATABASE_URL is not an absolute sqlite path: {url!r}"
    directory = match.group(1)
    cmds = [i for i, ins in enumerate(stage) if ins.keyword == "CMD"]
    found = _effective_user(stage, cmds[-1] if cmds else len(stage))
    assert found, "no USER"
    user = found[1].partition(":")[0]
    owners = [m.group(1).partition(":")[0] for ins in stage if ins.keyword == "RUN"
              for m in re.finditer(r"\bchown\s+(?:-\S+\s+)*(\S+)\s+([^&;|]*)", ins.args)
              if directory in m.group(2).split()]
    assert user in owners, f"{directory} (the database's directory) is not chowned to the runtime user {user}"


CHECKS: dict[str, Callable[[list[Instruction]], None]] = {
    "base_image": check_base_image,
    "user": check_user,
    "expose": check_expose,
    "cmd": check_cmd,
    "copies": check_copies,
    "editable_install": check_editable_install,
    "healthcheck": check_healthcheck,
    "database": check_database,
}


# --- .dockerignore -----------------------------------------------------------------------------------------------
def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern language: Go's filepath.Match plus `**` for any number of directories."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[" and "]" in pattern[i + 1:]:
            end = pattern.index("]", i + 1)
            body = pattern[i + 1:end]
            out, i = out + "[" + ("^" + body[1:] if body[:1] in "!^" and body else body) + "]", end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def parse_dockerignore(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """[(is_exception, regex)] in file order; comments and blank lines dropped."""
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:].strip() if negated else line
        pattern = re.sub(r"/+", "/", pattern).strip("/")
        pattern = pattern[2:] if pattern.startswith("./") else pattern
        rules.append((negated, _ignore_regex(pattern)))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether the build context leaves `path` out: a rule matching the path or one of its parent directories
    applies, and the last rule that applies wins."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            result = not negated
    return result


def check_dockerignore(text: str) -> None:
    rules = parse_dockerignore(text)
    for path in (".git", ".git/config", ".venv", ".venv/bin/python", "var", "var/secure-your-server.db"):
        assert ignored(path, rules), f".dockerignore lets {path} into the build context"
    needed: list[str] = []
    for source in REQUIRED_SOURCES:
        target = ROOT / source
        files = [target] if target.is_file() else [p for p in target.rglob("*") if p.is_file()]
        needed += [p.relative_to(ROOT).as_posix() for p in files if "__pycache__" not in p.parts]
    assert needed
    dropped = [path for path in needed if ignored(path, rules)]
    assert not dropped, f".dockerignore leaves out files the image needs: {dropped[:10]}"


# --- the real files ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def instructions(dockerfile_text: str) -> list[Instruction]:
    return parse_dockerfile(dockerfile_text)


@pytest.mark.parametrize("name", list(CHECKS))
def test_dockerfile(name: str, instructions: list[Instruction]) -> None:
    CHECKS[name](instructions)


def test_dockerignore() -> None:
    check_dockerignore(DOCKERIGNORE.read_text(encoding="utf-8"))


def test_user_comes_after_the_installs_and_before_cmd(instructions: list[Instruction]) -> None:
    keywords = [ins.keyword for ins in instructions]
    user = len(keywords) - 1 - keywords[::-1].index("USER")
    assert user < keywords.index("CMD")
    assert all(not _installs(ins) for ins in instructions[user:])


# --- the checks catch broken variants ----------------------------------------------------------------------------
def _drop(text: str, keyword: str, contains: str = "") -> str:
    """Remove every instruction starting with `keyword` (with its continuation lines) that contains `contains`."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    removed = 0
    while i < len(lines):
        start = i
        while lines[i].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
        block = lines[start:i + 1]
        first = block[0].strip()
        if first.split(" ", 1)[0].upper() == keyword and contains in "\n".join(block):
            removed += 1
        else:
            out.extend(block)
        i += 1
    assert removed, f"no {keyword} instruction containing {contains!r} to remove"
    return "\n".join(out) + "\n"


def _sub(pattern: str, replacement: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        result, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count, f"the variant's pattern {pattern!r} no longer matches the Dockerfile"
        return result
    return edit


def _before_cmd(line: str) -> Callable[[str], str]:
    return _sub(r"^CMD\b", line + "\nCMD")


def _user_first(text: str) -> str:
    return _sub(r"^(FROM .*)$", r"\1\nUSER 10001")(_drop(text, "USER"))


BROKEN = [
    ("root user", "user", _sub(r"^USER .*$", "USER root")),
    ("uid 0", "user", _sub(r"^USER .*$", "USER 0:0")),
    ("no user", "user", lambda t: _drop(t, "USER")),
    ("user before installs", "user", _user_first),
    ("back to root", "user", _before_cmd("USER root")),
    ("missing expose", "expose", lambda t: _drop(t, "EXPOSE")),
    ("other port exposed", "expose", _sub(r"^EXPOSE .*$", "EXPOSE 8080")),
    ("shell-form cmd", "cmd", _sub(r"^CMD .*$", "CMD secure-your-server serve --host 0.0.0.0 --port 8000")),
    ("loopback only", "cmd", _sub(r'"--host", "[^"]*"', '"--host", "127.0.0.1"')),
    ("wrong port", "cmd", _sub(r'"--port", "[^"]*"', '"--port", "8080"')),
    ("no host option", "cmd", _sub(r'^CMD .*$', 'CMD ["secure-your-server", "serve", "--port", "8000"]')),
    ("other program", "cmd", _sub(r"^CMD .*$", 'CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]')),
    ("entrypoint", "cmd", _before_cmd('ENTRYPOINT ["python"]')),
    ("no cmd", "cmd", lambda t: _drop(t, "CMD")),
    ("full python image", "base_image", _sub(r"^FROM .*$", "FROM python:3.11-bookworm")),
    ("not python", "base_image", _sub(r"^FROM .*$", "FROM ubuntu:24.04")),
    ("unpinned release", "base_image", _sub(r"^FROM .*$", "FROM python:3.11-slim")),
    ("too old python", "base_image", _sub(r"^FROM .*$", "FROM python:3.10-slim-bookworm")),
    ("guides not copied", "copies", lambda t: _drop(t, "COPY", "guides")),
    ("templates not copied", "copies", lambda t: _drop(t, "COPY", "templates")),
    ("static not copied", "copies", lambda t: _drop(t, "COPY", "static")),
    ("app not copied", "copies", lambda t: _drop(t, "COPY", "app/")),
    ("data not copied", "copies", lambda t: _drop(t, "COPY", "data")),
    ("pyproject not copied", "copies", lambda t: _drop(t, "COPY", "pyproject.toml")),
    ("copied from another stage", "copies", _sub(r"^COPY guides", "COPY --from=builder guides")),
    ("plain install", "editable_install", _sub(r"pip install --no-cache-dir -e \.", "pip install --no-cache-dir .")),
    ("code copied after install", "editable_install", lambda t: _drop(t, "COPY", "guides") + "COPY guides/ ./guides/\n"),
    ("healthcheck disabled", "healthcheck", lambda t: t + "HEALTHCHECK NONE\n"),
    ("no healthcheck", "healthcheck", lambda t: _drop(t, "HEALTHCHECK")),
    ("healthcheck elsewhere", "healthcheck", _sub(r"8000/healthz", "8000/")),
    ("healthcheck with curl", "healthcheck",
     lambda t: t + "HEALTHCHECK CMD curl -fsS http://127.0.0.1:8000/healthz\n"),
    ("relative database", "database", _sub(r"^ENV SECURE_DATABASE_URL=.*$", "ENV SECURE_DATABASE_URL=sqlite:///./var/x.db")),
    ("database dir owned by root", "database", _sub(r"chown \S+ /app/var", "chown root:root /app/var")),
]


@pytest.mark.parametrize(("check", "edit"), [pytest.param(c, e, id=name) for name, c, e in BROKEN])
def test_checks_catch_broken_dockerfiles(check: str, edit: Callable[[str], str], dockerfile_text: str) -> None:
    broken = edit(dockerfile_text)
    assert broken != dockerfile_text
    with pytest.raises(AssertionError):
        CHECKS[check](parse_dockerfile(broken))


def test_every_check_has_a_broken_variant() -> None:
    assert {check for _, check, _ in BROKEN} == set(CHECKS)


@pytest.mark.parametrize(("name", "extra"), [
    ("git not ignored", "!.git"),
    ("venv not ignored", "!.venv"),
    ("var not ignored", "!var"),
    ("readme ignored", "*.md"),
    ("guides ignored", "**/*.md"),
    ("templates ignored", "templates"),
    ("data ignored", "data/*.json"),
])
def test_dockerignore_check_catches(name: str, extra: str) -> None:
    text = DOCKERIGNORE.read_text(encoding="utf-8") + "\n" + extra + "\n"
    with pytest.raises(AssertionError):
        check_dockerignore(text)


def test_dockerignore_check_needs_the_exclusions() -> None:
    kept = "\n".join(line for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
                     if line.strip() not in (".git", ".venv", "var"))
    with pytest.raises(AssertionError):
        check_dockerignore(kept)


# --- the parsers themselves --------------------------------------------------------------------------------------
def test_parser_joins_continuations_and_drops_comments() -> None:
    text = (
        "# a comment\n"
        "FROM python:3.11-slim-bookworm AS base\n"
        "\n"
        "run apt-get update \\\n"
        "    # a comment inside the continuation\n"
        "\n"
        " && apt-get install -y x \\\n"
        "    && true\n"
        "  EXPOSE 8000/tcp 9000\n"
        'CMD ["a", "b"]\n'
        "CMD a b\n"
        "CMD [not json\n"
    )
    ins = parse_dockerfile(text)
    assert [i.keyword for i in ins] == ["FROM", "RUN", "EXPOSE", "CMD", "CMD", "CMD"]
    assert ins[1].args == "apt-get update  && apt-get install -y x     && true"
    assert ins[1].line == 4
    assert ins[2].line == 9
    assert ins[3].exec_form() == ["a", "b"]
    assert ins[4].exec_form() is None
    assert ins[5].exec_form() is None
    assert _installs(ins[1])


def test_parser_refuses_what_it_does_not_understand() -> None:
    with pytest.raises(ValueError):
        parse_dockerfile("# escape=`\nFROM python:3.11-slim-bookworm\n")
    with pytest.raises(ValueError):
        parse_dockerfile("FROM python:3.11-slim-bookworm\nRUN <<EOF\necho hi\nEOF\n")


def test_final_stage_is_the_last_from() -> None:
    ins = parse_dockerfile("FROM python:3.11-bookworm AS build\nUSER root\nFROM python:3.11-slim-bookworm\nEXPOSE 1\n")
    assert [i.keyword for i in final_stage(ins)] == ["FROM", "EXPOSE"]
    check_base_image(ins)


def test_dockerignore_matching() -> None:
    rules = parse_dockerignore("# c\n/var\n**/__pycache__\n*.egg-info\ndocs\n!docs/keep.md\n./build/\n")
    assert ignored("var/x.db", rules) and ignored("var", rules)
    assert not ignored("variant.txt", rules) and not ignored("app/var.py", rules)
    assert ignored("__pycache__/a.pyc", rules) and ignored("app/web/__pycache__/a.pyc", rules)
    assert ignored("x.egg-info/PKG-INFO", rules) and not ignored("app/x.egg-info", rules)
    assert ignored("docs/a.md", rules) and not ignored("docs/keep.md", rules)
    assert ignored("build/lib/x.py", rules)
