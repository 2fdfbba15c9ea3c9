"""A guide's Fix, applied to a real open server that the site's probes reach from an address the Fix does not trust.

For one product of PRODUCTS, prove_fix():
  1. makes a network namespace (servers/netns.py: a veth pair in 198.18.0.0/15), starts the site in this process
     with its sink and canaries on our side of the pair (`place.peer`), and the product's OPEN fixture inside
     (`place.host`);
  2. audits it as the owner would, from the server: `POST /api/v1/audits/self` with the request coming from
     `place.host`; the probes leave from `place.peer`, which is neither the server's loopback nor its LAN;
  3. runs the guide's **Check** commands (its `sh` blocks) on the server, pointed at the fixture's files, and finds
     in what they print the cause that the guide's Check section describes;
  4. applies the guide's **Fix** (the first configuration block of its Fix section, `validate=` not `none`) to the
     fixture's configuration file, the way the guide's prose tells a reader to (Product.apply);
  5. does the guide's **Reload** (its `sh` blocks: run on the server, or a `systemctl restart` of the fixture);
  6. runs Check again, and re-tests (`POST /api/v1/audits/{id}/retest`) from the server.
It returns a Proof; `Proof.problems()` lists what keeps it from being a proof that the guide closes the server
(empty: the Fix works). Nothing of a guide is copied here: the commands and lines come from its Markdown at run
time, so a guide whose Fix is rewritten to leave the server open makes the proof fail.

Adding a product is one Product entry: the guide, the start function of its open fixture (with `place=`), the file
the guide edits, how the guide's commands reach that file (`localize`), what in the Check output shows the cause
(`reveals`, `cause`), how the Fix block is applied (`apply`: postconf_e, replace_lines, replace_rules,
point_proxy_pass, privoxy_apply or a new function of the same shape) and how the Reload is done (`reload`:
run_reload, run_reload_where or restart_with).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from markdown_it import MarkdownIt
from ports import free_port
from support import running_app, wait_done

from app.config import Settings
from servers import exim, mta, opensmtpd, postfix, proxies, sendmail
from servers.netns import Netns, Place

ROOT = Path(__file__).resolve().parent.parent.parent
GUIDES = ROOT / "guides"
PROBE_DOMAIN = "sink.test.example"
COMMAND_TIMEOUT = 30.0
SETTLE_TIMEOUT = 15.0
AUDIT_SECONDS = 90.0


class Fixture(Protocol):
    host: str
    port: int
    place: Place

    def stop(self) -> None: ...


# --- the guide's steps, read from its Markdown ------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    language: str
    validate: str | None
    content: str
    line: int
    subsection: str = ""  # the level-3 heading it is under ("" before the section's first)


@dataclass
class GuideSteps:
    """A product guide's level-2 sections: their text and their fenced blocks."""

    path: Path
    text: dict[str, str] = field(default_factory=dict)
    blocks: dict[str, list[Block]] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Path) -> GuideSteps:
        body = path.read_text(encoding="utf-8")
        body = body.split("\n---\n", 1)[1] if body.startswith("---\n") else body
        steps = cls(path=path)
        tokens = MarkdownIt("commonmark").parse(body)
        lines = body.splitlines()
        starts: list[tuple[str, int]] = []
        section = subsection = ""
        for index, token in enumerate(tokens):
            if token.type == "heading_open" and token.tag == "h2":
                section, subsection = tokens[index + 1].content.strip(), ""
                starts.append((section, token.map[0] if token.map else 0))
            elif token.type == "heading_open" and token.tag == "h3":
                subsection = tokens[index + 1].content.strip()
            elif token.type == "fence" and section:
                words = token.info.split()
                attrs = dict(word.split("=", 1) for word in words if "=" in word)
                language = words[0] if words and "=" not in words[0] else ""
                steps.blocks.setdefault(section, []).append(
                    Block(language, attrs.get("validate"), token.content, (token.map[0] + 1) if token.map else 0,
                          subsection))
        for number, (name, start) in enumerate(starts):
            end = starts[number + 1][1] if number + 1 < len(starts) else len(lines)
            steps.text[name] = "\n".join(lines[start:end])
        return steps

    def section_blocks(self, section: str, elsewhere: tuple[str, ...] = ()) -> list[Block]:
        """The section's blocks, without those under a level-3 heading that starts with one of `elsewhere` (the
        guide's subsections for other systems than the fixture's, e.g. "Debian and Ubuntu" beside "Other systems")."""
        return [block for block in self.blocks.get(section, [])
                if not (block.subsection and block.subsection.startswith(elsewhere))]

    def commands(self, section: str, elsewhere: tuple[str, ...] = ()) -> list[str]:
        """The commands of the section's `sh` blocks, one per line (a trailing backslash joins lines)."""
        found: list[str] = []
        for block in self.section_blocks(section, elsewhere):
            if block.language != "sh":
                continue
            pending = ""
            for line in block.content.splitlines():
                line = pending + line.strip()
                pending = ""
                if line.endswith("\\"):
                    pending = line[:-1] + " "
                elif line and not line.startswith("#"):
                    found.append(line)
        return found

    def fix_block(self, elsewhere: tuple[str, ...] = ()) -> Block:
        """The Fix: the first configuration block of the Fix section (alternatives for other cases follow it)."""
        for block in self.section_blocks("Fix", elsewhere):
            if block.validate and block.validate != "none":
                return block
        raise AssertionError(f"{self.path}: the Fix section has no configuration block (validate= not none)")


def mutated_guide(source: Path, dest: Path, old: str, new: str) -> Path:
    """A copy of the guide whose Fix block says `new` where it said `old` (only inside the Fix section)."""
    text = source.read_text(encoding="utf-8")
    fix = GuideSteps.read(source).text["Fix"]
    block = GuideSteps.read(source).fix_block().content
    assert old in block, f"{source}: {old!r} is not in its Fix block any more: update the mutation"
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text.replace(fix, fix.replace(block, block.replace(old, new), 1), 1), encoding="utf-8")
    return dest


# --- running the guide's commands on the server (inside the namespace) --------------------------------------------

def run_on_server(command: str, place: Place, env: dict[str, str]) -> str:
    """Run one command of the guide as root on the server, in its network namespace; what it printed."""
    done = subprocess.run(place.wrap(["/bin/sh", "-c", command]), capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT, env={**os.environ, **env}, stdin=subprocess.DEVNULL)
    return done.stdout + done.stderr


def without_sudo(command: str) -> str:
    return re.sub(r"(^|\|\s*)sudo\s+", r"\1", command)


def config_path_replaced(default: str) -> Callable[[str, Fixture, Path], tuple[str, dict[str, str]]]:
    """A guide's command naming the product's usual file (`default`) reads the fixture's file instead."""
    def localize(command: str, _fixture: Fixture, config: Path) -> tuple[str, dict[str, str]]:
        return without_sudo(command).replace(default, str(config)), {}
    return localize


def postfix_localize(command: str, _fixture: Fixture, config: Path) -> tuple[str, dict[str, str]]:
    """postconf(1) and postfix(1) read the configuration directory named by MAIL_CONFIG."""
    return without_sudo(command), {"MAIL_CONFIG": str(config.parent)}


def squid_localize(command: str, _fixture: Fixture, config: Path) -> tuple[str, dict[str, str]]:
    """`squid -k ...` reads /etc/squid/squid.conf unless given `-f FILE`."""
    command = without_sudo(command).replace("/etc/squid/squid.conf", str(config))
    return re.sub(r"\bsquid(?= -k)", f"squid -f {config}", command), {}


def apache_localize(command: str, fixture: Fixture, config: Path) -> tuple[str, dict[str, str]]:
    """grep reads the fixture's file instead of /etc/apache2/ or /etc/httpd/; Debian's apache2ctl (apachectl)
    runs `apache2 $APACHE_ARGUMENTS ...` and keeps its run and lock folders where APACHE_RUN_DIR and
    APACHE_LOCK_DIR say (APACHE_CONFDIR, which has no envvars file here, keeps it from reading /etc/apache2)."""
    command = without_sudo(command)
    for default in ("/etc/apache2/", "/etc/httpd/"):
        command = command.replace(default, str(config))
    run = str(getattr(fixture, "run_dir", config.parent))
    return command, {"APACHE_CONFDIR": str(config.parent), "APACHE_ARGUMENTS": f"-f {config}",
                     "APACHE_RUN_DIR": run, "APACHE_LOCK_DIR": run}


def nginx_localize(command: str, fixture: Fixture, config: Path) -> tuple[str, dict[str, str]]:
    """`nginx -T`, `nginx -t`, `nginx -s reload` read the fixture's file (`-c`) under its prefix (`-p`); `sudo`
    goes wherever it stands (`sudo nginx -t && sudo nginx -s reload`)."""
    command = re.sub(r"(^|[|&;]\s*)sudo\s+", r"\1", command)
    return re.sub(r"\bnginx(?= -)", f"nginx -c {config} -p {getattr(fixture, 'run_dir', config.parent)}", command), {}


# --- applying a Fix block to a configuration file -------------------------------------------------------------

def postconf_e(config: Path, block: str) -> None:
    """main.cf lines `name = value`, each set with `postconf -e` (it changes the line where it exists, else adds
    it): the guide's "Set these lines (change them where they already exist, do not add a second copy)"."""
    for line in block.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert re.match(r"^[a-z0-9_]+\s*=", line), f"not a main.cf parameter line: {line!r}"
        done = subprocess.run(["/usr/sbin/postconf", "-c", str(config.parent), "-e", line], capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT)
        assert done.returncode == 0 and not done.stderr.strip(), f"postconf -e {line!r}: {done.stderr}"


def replace_lines(pattern: str) -> Callable[[Path, str], None]:
    """The lines matching `pattern` are the ones the guide says to make "read like this": they are removed and
    the Fix block goes where the first of them was (at the end when there was none)."""
    matcher = re.compile(pattern)

    def apply(config: Path, block: str) -> None:
        lines = config.read_text().splitlines()
        at = next((i for i, line in enumerate(lines) if matcher.match(line)), len(lines))
        kept = [line for line in lines if not matcher.match(line)]
        at -= sum(1 for line in lines[:at] if matcher.match(line))
        config.write_text("\n".join([*kept[:at], *block.splitlines(), *kept[at:]]) + "\n")
    return apply


def replace_rules(pattern: str) -> Callable[[Path, str], None]:
    """Rule blocks `KEYWORD ... { ... }` whose first line matches `pattern` are replaced by the Fix block's
    rules, which go where the first of them was (Dante: the server settings must come before the rules)."""
    matcher = re.compile(pattern)

    def apply(config: Path, block: str) -> None:
        kept: list[str] = []
        at: int | None = None
        inside = False
        for line in config.read_text().splitlines():
            if not inside and matcher.match(line):
                at = len(kept) if at is None else at
                inside = "}" not in line
                continue
            if inside:
                inside = "}" not in line
                continue
            kept.append(line)
        at = len(kept) if at is None else at
        config.write_text("\n".join([*kept[:at], *block.splitlines(), *kept[at:]]) + "\n")
    return apply


def point_proxy_pass(application: str) -> Callable[[Path, str], None]:
    """nginx: "point `proxy_pass` at the one server it is meant to serve". The Fix block's `proxy_pass` line
    replaces each `proxy_pass` of the file whose destination comes from the request (a `$` variable). A fixed
    address in it is the guide's example of the reader's own application, which the reader writes in instead:
    here the fixture's application, `application`. A destination with variables is kept as the guide says it."""
    matcher = re.compile(r"^\s*proxy_pass\s")

    def apply(config: Path, block: str) -> None:
        wanted = [line.strip() for line in block.splitlines() if matcher.match(line)]
        assert len(wanted) == 1, f"the Fix block has {len(wanted)} proxy_pass lines: {block}"
        target = re.match(r"proxy_pass\s+([a-z]+://)([^/;]+)", wanted[0])
        line = wanted[0]
        if target and "$" not in target.group(0):
            line = line.replace(target.group(0), f"proxy_pass {target.group(1)}{application}", 1)
        lines = config.read_text().splitlines()
        found = [i for i, old in enumerate(lines) if matcher.match(old) and "$" in old]
        assert found, "the configuration has no proxy_pass built from the request"
        for i in found:
            lines[i] = lines[i][:len(lines[i]) - len(lines[i].lstrip())] + line
        config.write_text("\n".join(lines) + "\n")
    return apply


PRIVOXY_LINES = r"^\s*(listen-address|permit-access|deny-access|enable-remote-toggle|enable-edit-actions)\s"


def privoxy_apply(config: Path, block: str) -> None:
    """Privoxy: the Fix block's lines take the place of the file's lines of the same settings. Its
    `listen-address` is the guide's example of "the server's LAN address and Privoxy's port", which the reader
    writes in instead: here the address the fixture listens on now (its only one; the namespace has no other)."""
    current = re.search(r"^\s*listen-address\s+(\S+)", config.read_text(), re.MULTILINE)
    assert current, f"{config} has no listen-address"
    block = re.sub(r"^(\s*listen-address\s+)\S+", lambda m: m.group(1) + current.group(1), block,
                   flags=re.MULTILINE)
    replace_lines(PRIVOXY_LINES)(config, block)


# --- reloading ------------------------------------------------------------------------------------------------

def _count(path: Path, text: str) -> int:
    try:
        return path.read_text(errors="replace").count(text)
    except OSError:
        return 0


def _wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / 0.05) + 1):  # bounded in count and in time
        if condition():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise AssertionError(f"{what} within {seconds} s")


def run_reload(log: Callable[[Fixture], Path], done: str) -> Callable[[list[str], Fixture, Product, Path],
                                                                         Fixture]:
    """The guide's Reload commands run on the server; then wait until the fixture's log says `done` once more."""
    def reload(commands: list[str], fixture: Fixture, product: Product, config: Path) -> Fixture:
        before = _count(log(fixture), done)
        for command in commands:
            command, env = product.localize(command, fixture, config)
            assert "/etc/" not in command, f"the Reload command {command!r} would touch the machine's own files"
            output = run_on_server(command, fixture_place(fixture), env)
            assert "fatal" not in output.lower() and "error" not in output.lower(), f"{command}: {output}"
        _wait_for(lambda: _count(log(fixture), done) > before, SETTLE_TIMEOUT, f"no {done!r} in the log")
        return fixture
    return reload


def run_reload_where(pattern: str, log: Callable[[Fixture], Path], done: str) -> Callable[
        [list[str], Fixture, Product, Path], Fixture]:
    """A Reload section that lists one command per platform (`systemctl reload apache2   # Debian, Ubuntu`, ...):
    the one matching `pattern` is the one for the fixture (a daemon of its own, no systemd), run as run_reload."""
    matcher = re.compile(pattern)

    def reload(commands: list[str], fixture: Fixture, product: Product, config: Path) -> Fixture:
        chosen = [command for command in commands if matcher.search(command)]
        assert len(chosen) == 1, f"the guide's Reload {commands} has not one command matching {pattern!r}"
        return run_reload(log, done)(chosen, fixture, product, config)
    return reload


def restart_with(unit: str) -> Callable[[list[str], Fixture, Product, Path], Fixture]:
    """The guide's Reload must be `systemctl restart UNIT`: the fixture is stopped and started again on the same
    port with the same (now fixed) configuration file, as systemd would."""
    def reload(commands: list[str], fixture: Fixture, _product: Product, _config: Path) -> Fixture:
        wanted = f"systemctl restart {unit}"
        assert [without_sudo(c) for c in commands] == [wanted], (
            f"the guide's Reload is {commands}, not `{wanted}`: say here how that is done to the fixture")
        assert isinstance(fixture, proxies.ProxyInstance)
        return proxies.restart(fixture)
    return reload


def fixture_place(fixture: Fixture) -> Place:
    return fixture.place


# --- what the Check output shows ---------------------------------------------------------------------------------

def line_matching(pattern: str) -> Callable[[str], str | None]:
    matcher = re.compile(pattern, re.MULTILINE)

    def reveals(output: str) -> str | None:
        found = matcher.search(output)
        return found.group(0).strip() if found else None
    return reveals


def tinyproxy_reveals(output: str) -> str | None:
    """"No `Allow` and no `Deny` line at all": the grep shows the Port line but no Allow or Deny line."""
    lines = output.splitlines()
    if any(re.search(r":\s*Port\b", line) for line in lines) and not any(
            re.search(r":\s*(Allow|Deny)\b", line) for line in lines):
        return "no Allow or Deny line: " + "; ".join(lines)
    return None


def dante_reveals(output: str) -> str | None:
    """A `pass` rule (client or socks) whose `from:` is 0.0.0.0/0, with `socksmethod: none`."""
    rule = ""
    method_none = re.search(r"socksmethod:\s*none", output) is not None
    for line in output.splitlines():
        keyword = re.search(r"\b(client|socks)\s+(pass|block)\b", line)
        if keyword:
            rule = keyword.group(0)
        elif rule.endswith("pass") and re.search(r"from:\s*0\.0\.0\.0/0\b", line) and method_none:
            return f"{rule}: {line.strip()}"
    return None


def apache_reveals(output: str) -> str | None:
    """`ProxyRequests On` (the grep's line `N:ProxyRequests On`), with what the `<Proxy>` block lets in."""
    on = re.search(r"^\d+[:-]\s*ProxyRequests\s+On\b.*$", output, re.MULTILINE | re.IGNORECASE)
    if on is None:
        return None
    granted = re.search(r"^\d+[:-]\s*Require\s+all\s+granted\b.*$", output, re.MULTILINE | re.IGNORECASE)
    return on.group(0).strip() + (f"; {granted.group(0).strip()}" if granted else "")


def privoxy_reveals(output: str) -> str | None:
    """"No `permit-access` line": the grep shows where Privoxy listens, and no access list."""
    lines = output.splitlines()
    listen = [line for line in lines if re.search(r":\s*listen-address\s", line)]
    if listen and not any(re.search(r":\s*permit-access\s", line) for line in lines):
        return "no permit-access line: " + "; ".join(listen)
    return None


# --- the mail servers run from extracted packages (servers/mta.py) -----------------------------------------------

def exim_localize(command: str, fixture: Fixture, config: Path) -> tuple[str, dict[str, str]]:
    """`exim` is the extracted binary reading the fixture's file (`-C`), run as the daemon sees the machine."""
    inside = exim.INSIDE / config.name
    command = re.sub(r"(?<![\w/.-])exim(?=\s)", f"{exim.EXIM} -C {inside}", without_sudo(command))
    assert isinstance(fixture, mta.MtaInstance)
    return mta.on_server(fixture, command), {}


def sendmail_localize(command: str, fixture: Fixture, _config: Path) -> tuple[str, dict[str, str]]:
    """/etc/mail/ is the fixture's folder (mounted at /mnt where its daemon runs); `sendmail` and `makemap` (which
    reads sendmail.cf for its settings) are the extracted ones and read the fixture's cf (`-C`)."""
    command = without_sudo(command).replace("/etc/mail/", f"{sendmail.INSIDE}/")
    cf = f"-C {sendmail.INSIDE}/sendmail.cf"
    command = re.sub(r"(?<![\w/.-])sendmail(?=\s+-)", f"{sendmail.SENDMAIL} {cf}", command)
    command = re.sub(r"(?<![\w/.-])makemap(?=\s)", f"{sendmail.MAKEMAP} {cf}", command)
    assert isinstance(fixture, mta.MtaInstance)
    return mta.on_server(fixture, command), {}


def opensmtpd_localize(command: str, fixture: Fixture, config: Path) -> tuple[str, dict[str, str]]:
    """smtpd.conf (OpenBSD's or Debian's path) is the fixture's file; `smtpd` is the extracted one reading it."""
    command = without_sudo(command).replace("/etc/mail/smtpd.conf", str(config))
    command = re.sub(r"(?<![\w/.-])smtpd(?=\s|$)", f"{opensmtpd.SMTPD} -f {config}",
                     command.replace("/etc/smtpd.conf", str(config)))
    assert isinstance(fixture, mta.MtaInstance)
    return mta.on_server(fixture, command), {}


def restart_mta(service: str) -> Callable[[list[str], Fixture, Product, Path], Fixture]:
    """The guide's Reload commands in order: `systemctl restart SERVICE` restarts the fixture (mta.restart: the same
    command, folder, port and place, as systemd would); every other command (a rebuild, a syntax check) runs on the
    server and must succeed."""
    wanted = f"systemctl restart {service}"

    def reload(commands: list[str], fixture: Fixture, product: Product, config: Path) -> Fixture:
        assert wanted in [without_sudo(c) for c in commands], (
            f"the guide's Reload is {commands}, without `{wanted}`: say here how that is done to the fixture")
        for command in commands:
            if without_sudo(command) == wanted:
                assert isinstance(fixture, mta.MtaInstance)
                fixture = mta.restart(fixture)
                continue
            local, env = product.localize(command, fixture, config)
            assert "/etc/" not in local, f"the Reload command {local!r} would touch the machine's own files"
            done = subprocess.run(fixture_place(fixture).wrap(["/bin/sh", "-c", local]), capture_output=True,
                                  text=True, timeout=COMMAND_TIMEOUT, env={**os.environ, **env},
                                  stdin=subprocess.DEVNULL)
            assert done.returncode == 0, f"{command} (exit {done.returncode}): {done.stdout}{done.stderr}"
        return fixture
    return reload


def start_exim(base: Path, place: Place, sink_port: int) -> Fixture:
    return exim.start_exim(base, "open", sink_port=sink_port, place=place)


def start_sendmail(base: Path, place: Place, sink_port: int) -> Fixture:
    return sendmail.start_sendmail(base, "open", sink_port=sink_port, place=place)


def start_opensmtpd(base: Path, place: Place, sink_port: int) -> Fixture:
    return opensmtpd.start_opensmtpd(base, "open", sink_port=sink_port, place=place)


def mta_file(name: str) -> Callable[[Any], Path]:
    return lambda fixture: Path(fixture.directory) / name


# --- the products ------------------------------------------------------------------------------------------------

def start_postfix(base: Path, place: Place, sink_port: int) -> Fixture:
    return postfix.start_postfix(base, "open", sink_port=sink_port, place=place)


def postfix_config(fixture: Any) -> Path:
    return Path(fixture.config_dir) / "main.cf"


def proxy_config(fixture: Any) -> Path:
    return Path(fixture.config_file)


@dataclass(frozen=True)
class Product:
    name: str
    guide: str  # under guides/
    service: str  # relay | proxy
    start: Callable[[Path, Place, int], Fixture]  # the OPEN fixture: (base folder, place, our sink's port)
    config: Callable[[Any], Path]  # the file the guide's Fix edits
    localize: Callable[[str, Fixture, Path], tuple[str, dict[str, str]]]  # a guide command -> here (+ env)
    reveals: Callable[[str], str | None]  # the Check output -> what shows the cause, or None
    cause: str  # how the guide's Check section names that cause
    apply: Callable[[Path, str], None]  # the Fix block onto the configuration file
    reload: Callable[[list[str], Fixture, Product, Path], Fixture]  # the Reload commands -> the fixture after
    elsewhere: tuple[str, ...] = ()  # level-3 headings (their start) of the guide's steps for other systems


PRODUCTS: dict[str, Product] = {p.name: p for p in (
    Product("Postfix", "relay/postfix.md", "relay", start_postfix, postfix_config, postfix_localize,
            line_matching(r"^mynetworks = .*\b0\.0\.0\.0/0\b.*$"), "`0.0.0.0/0`", postconf_e,
            run_reload(lambda f: Path(f.log_file), "reload -- version")),
    Product("Squid", "proxy/squid.md", "proxy",
            lambda base, place, _sink: proxies.start_squid(base, "open", place=place), proxy_config,
            squid_localize, line_matching(r"^.*Processing: http_access allow all\s*$"), "`http_access allow all`",
            replace_lines(r"^\s*(http_access|acl\s+localnet)\s"),
            run_reload(lambda f: Path(f.run_dir) / "cache.log", "Accepting HTTP Socket connections")),
    Product("tinyproxy", "proxy/tinyproxy.md", "proxy",
            lambda base, place, _sink: proxies.start_tinyproxy(base, "open", place=place), proxy_config,
            config_path_replaced("/etc/tinyproxy/tinyproxy.conf"), tinyproxy_reveals,
            "No `Allow` and no `Deny` line at all", replace_lines(r"^\s*(Allow|Deny|ConnectPort)\s"),
            restart_with("tinyproxy")),
    Product("Dante", "proxy/dante.md", "proxy",
            lambda base, place, _sink: proxies.start_dante(base, place=place), proxy_config,
            config_path_replaced("/etc/danted.conf"), dante_reveals, "from: 0.0.0.0/0",
            replace_rules(r"^\s*(client|socks)\s+(pass|block)\b"), restart_with("danted")),
    Product("Apache", "proxy/apache.md", "proxy",
            lambda base, place, _sink: proxies.start_apache(base, "open", place=place), proxy_config,
            apache_localize, apache_reveals, "`ProxyRequests On`", replace_lines(r"^\s*ProxyRequests\s"),
            run_reload_where(r"\bapachectl graceful\b", lambda f: Path(f.run_dir) / "error.log",
                             "resuming normal operations")),
    Product("nginx", "proxy/nginx.md", "proxy",
            lambda base, place, _sink: proxies.start_nginx(base, "forward", place=place), proxy_config,
            nginx_localize, line_matching(r"^.*\bproxy_pass\s[^;]*\$(http_host|host|request_uri|request)\b.*$"),
            "a `proxy_pass` built from request variables", point_proxy_pass(proxies.NGINX_APP),
            # done once the old worker has exited: until then it may still take a new connection (the old Fix)
            run_reload(lambda f: Path(f.run_dir) / "error.log", " exited with code ")),
    Product("Privoxy", "proxy/privoxy.md", "proxy",
            lambda base, place, _sink: proxies.start_privoxy(base, "open", place=place), proxy_config,
            config_path_replaced("/etc/privoxy/config"), privoxy_reveals, "No `permit-access` line", privoxy_apply,
            restart_with("privoxy")),
    # the fixture has one configuration file, not Debian's update-exim4.conf: the guide's "Other systems"
    Product("Exim", "relay/exim.md", "relay", start_exim, mta_file("exim.conf"), exim_localize,
            line_matching(r"^.*relay_from_hosts = .*\b0\.0\.0\.0/0\b.*$"), "`0.0.0.0/0`",
            replace_lines(r"^\s*(hostlist\s+relay_from_hosts|domainlist\s+relay_to_domains)\s*="),
            run_reload(lambda f: Path(f.directory) / "log/mainlog", "daemon started"),
            elsewhere=("Debian and Ubuntu",)),
    Product("Sendmail", "relay/sendmail.md", "relay", start_sendmail, mta_file("sendmail.mc"), sendmail_localize,
            line_matching(r"^.*FEATURE\(`promiscuous_relay'\).*$"), "FEATURE(`promiscuous_relay')",
            replace_lines(r"^\s*FEATURE\(`(promiscuous_relay|relay_entire_domain|relay_local_from|relay_mail_from|"
                          r"relay_based_on_MX|loose_relay_check|access_db)'"),
            restart_mta("sendmail"), elsewhere=("Without a service manager",)),
    Product("OpenSMTPD", "relay/opensmtpd.md", "relay", start_opensmtpd, mta_file("smtpd.conf"), opensmtpd_localize,
            line_matching(r'^.*match from any for any action "relay".*$'), '`match from any for any action "relay"`',
            replace_lines(r"^\s*match\s"), restart_mta("opensmtpd"), elsewhere=("OpenBSD",)),
)}


# --- the proof ---------------------------------------------------------------------------------------------------

@dataclass
class Proof:
    product: str
    guide: Path
    place: Place | None = None
    before: dict | None = None  # the audit of the open fixture
    check_output: str = ""
    revealed: str | None = None
    cause_in_guide: bool = False
    fix: str = ""  # the Fix block applied
    config_after: str = ""
    check_after: str | None = None  # what Check still reveals after the Fix (None: nothing)
    after: dict | None = None  # the re-test
    namespace_left: bool = False  # the namespace or its veth outlived the proof

    def open_rows(self, audit: dict | None) -> list[str]:
        return [f"{c['name']} {c['verdict']}/{c['reason']}" for c in (audit or {}).get("checks", [])
                if c["verdict"] == "open"]

    def summary(self, audit: dict | None) -> str | None:
        return None if audit is None else audit["summary"][PRODUCTS[self.product].service]

    def problems(self) -> list[str]:
        found = []
        if self.summary(self.before) != "open":
            found.append(f"the open fixture was not found open before the Fix: {self.summary(self.before)}")
        if self.revealed is None:
            found.append(f"the guide's Check did not reveal the cause; it printed:\n{self.check_output}")
        if not self.cause_in_guide:
            found.append(f"the guide's Check section does not name the cause ({PRODUCTS[self.product].cause})")
        if self.check_after is not None:
            found.append(f"after the Fix, Check still shows the cause: {self.check_after}")
        if self.summary(self.after) != "closed" or self.open_rows(self.after):
            rows = self.open_rows(self.after) or [f"{c['name']} {c['verdict']}/{c['reason']}"
                                                  for c in (self.after or {}).get("checks", [])]
            found.append(f"after the Fix the re-test says {self.summary(self.after)}: {rows}\n"
                         f"--- Fix applied ---\n{self.fix}--- configuration ---\n{self.config_after}")
        if self.namespace_left:
            found.append("the namespace or its veth pair was left behind")
        return found


def site_settings(base: Path, place: Place, service: str, port: int, sink_port: int) -> Settings:
    """The site for one fixture in a namespace: 198.18.0.0/15 may be tested (as 127.0.0.0/8 elsewhere in the
    tests), the sink and the canaries listen on our side of the veth pair."""
    peer = place.peer
    return Settings(
        database_url=f"sqlite:///{base / 'site.db'}", public_url="http://testserver",
        allow_networks=["198.18.0.0/15"], relay_ports=[port] if service == "relay" else [],
        proxy_ports=[port] if service == "proxy" else [], sink_listen=f"{peer}:{sink_port}",
        probe_domain=PROBE_DOMAIN, probe_helo="probe.test.example", sink_wait=5,
        canary_http_listen=f"{peer}:0", canary_smtp_listen=f"{peer}:0", canary_tls_listen=f"{peer}:0",
        canary_address=peer, connect_timeout=2, proxy_step_timeout=3, smtp_command_timeout=5,
        audit_deadline=AUDIT_SECONDS - 10, target_cooldown=0, verification_check_interval=0)


async def _audit(client: Any, service: str, retest_of: str | None = None) -> dict:
    if retest_of is None:
        response = await client.post("/api/v1/audits/self", json={"checks": [service]})
    else:
        response = await client.post(f"/api/v1/audits/{retest_of}/retest")
    assert response.status_code == 202, response.text
    return await wait_done(client, response.json()["id"], seconds=AUDIT_SECONDS)


def run_check(steps: GuideSteps, product: Product, fixture: Fixture, config: Path) -> str:
    outputs = []
    commands = steps.commands("Check", product.elsewhere)
    assert commands, f"{steps.path}: no commands in its Check section"
    for command in commands:
        local, env = product.localize(command, fixture, config)
        assert "/etc/" not in local, f"the Check command {local!r} would read the machine's own files"
        outputs.append(f"$ {local}\n{run_on_server(local, fixture_place(fixture), env)}")
    return "\n".join(outputs)


async def prove_fix(product: Product, base: Path, guide: Path | None = None) -> Proof:
    """Everything in the module docstring, for one product; the namespace and the fixture are gone afterwards."""
    guide = guide or GUIDES / product.guide
    steps = GuideSteps.read(guide)
    proof = Proof(product.name, guide, cause_in_guide=product.cause in steps.text.get("Check", ""))
    netns = await asyncio.to_thread(Netns.create)
    try:
        proof.place = place = netns.place
        await _prove_in(proof, steps, product, base, place)
    finally:
        await asyncio.to_thread(netns.delete)
        proof.namespace_left = await asyncio.to_thread(netns.exists)
    return proof


async def _prove_in(proof: Proof, steps: GuideSteps, product: Product, base: Path, place: Place) -> None:
    sink_port = free_port(place.peer)
    fixture = await asyncio.to_thread(product.start, base, place, sink_port)
    try:
        settings = site_settings(base, place, product.service, fixture.port, sink_port)
        async with running_app(settings, peer=place.host) as client:  # the owner, on the server
            proof.before = await _audit(client, product.service)
            config = product.config(fixture)
            proof.check_output = await asyncio.to_thread(run_check, steps, product, fixture, config)
            proof.revealed = product.reveals(proof.check_output)
            proof.fix = steps.fix_block(product.elsewhere).content
            await asyncio.to_thread(product.apply, config, proof.fix)
            proof.config_after = config.read_text()
            reload = steps.commands("Reload", product.elsewhere)
            fixture = await asyncio.to_thread(product.reload, reload, fixture, product, config)
            proof.check_after = product.reveals(await asyncio.to_thread(run_check, steps, product, fixture, config))
            proof.after = await _audit(client, product.service, retest_of=proof.before["id"])
    finally:
        await asyncio.to_thread(fixture.stop)
