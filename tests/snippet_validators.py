"""Run a guide's configuration snippet through the real software that will read it (one function per validator).

Each wraps a fragment into a minimal complete configuration, in a private folder, on loopback only; nothing is
started except tinyproxy (it has no test mode) on a free loopback port, for a moment.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

from support import free_port, require_binary

EXIM = os.environ.get("EXIM_ROOT", "/opt/secure-your-server/exim") + "/usr/sbin/exim4"
SMTPD = os.environ.get("OPENSMTPD_ROOT", "/opt/secure-your-server/opensmtpd") + "/usr/sbin/smtpd"


class SnippetRejected(AssertionError):
    pass


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _fail(name: str, done: subprocess.CompletedProcess, config: str) -> None:
    raise SnippetRejected(f"{name} rejected the snippet (exit {done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                          f"--- configuration ---\n{config}")


def postfix_main(snippet: str, folder: Path) -> None:
    require_binary("/usr/sbin/postconf", "postfix")
    config = "compatibility_level = 3.6\n" + snippet
    (folder / "main.cf").write_text(config)
    (folder / "master.cf").write_text("smtp inet n - n - - smtpd\n")
    done = _run(["/usr/sbin/postconf", "-c", str(folder), "-n"])
    if done.returncode or "warning" in done.stderr.lower() or "error" in done.stderr.lower():
        _fail("postconf", done, config)


def postfix_master(snippet: str, folder: Path) -> None:
    require_binary("/usr/sbin/postconf", "postfix")
    (folder / "main.cf").write_text("compatibility_level = 3.6\n")
    config = "smtp inet n - n - - smtpd\n" + snippet
    (folder / "master.cf").write_text(config)
    done = _run(["/usr/sbin/postconf", "-c", str(folder), "-M"])
    if done.returncode or "warning" in done.stderr.lower() or "error" in done.stderr.lower():
        _fail("postconf -M", done, config)


def squid(snippet: str, folder: Path) -> None:
    binary = require_binary("/usr/sbin/squid", "squid")
    config = (f"http_port 127.0.0.1:{free_port()}\npid_filename {folder}/squid.pid\ncache deny all\n"
              f"cache_log {folder}/cache.log\naccess_log none\ncoredump_dir {folder}\n{snippet}\nhttp_access deny all\n")
    path = folder / "squid.conf"
    path.write_text(config)
    done = _run([binary, "-k", "parse", "-f", str(path)])
    output = done.stdout + done.stderr
    if done.returncode or "ERROR" in output or "FATAL" in output or "WARNING" in output:
        _fail("squid -k parse", done, config)


EXIM_MINIMAL = """primary_hostname = mx.test.example
domainlist local_domains = @
acl_smtp_rcpt = acl_check_rcpt
begin acl
acl_check_rcpt:
  accept
begin routers
begin transports
"""


def exim(snippet: str, folder: Path) -> None:
    require_binary(EXIM, "exim4-daemon-light (extracted by scripts/install-mta.sh)")
    config = snippet if "begin acl" in snippet or "begin routers" in snippet else snippet + "\n" + EXIM_MINIMAL
    path = folder / "exim.conf"
    path.write_text(config)
    done = _run([EXIM, "-bV", "-C", str(path)])
    if done.returncode:
        _fail("exim -bV", done, config)


def sendmail_mc(snippet: str, folder: Path) -> None:
    require_binary("/usr/bin/m4", "m4")
    cf = Path("/usr/share/sendmail/cf/m4/cf.m4")
    if not cf.exists():
        require_binary("/usr/share/sendmail/cf/m4/cf.m4", "sendmail-cf")
    config = snippet if "cf.m4" in snippet else (f"include(`{cf}')dnl\nOSTYPE(`debian')dnl\n{snippet}\n"
                                                 "MAILER(`local')dnl\nMAILER(`smtp')dnl\n")
    path = folder / "test.mc"
    path.write_text(config)
    done = _run(["/usr/bin/m4", str(path)])
    if done.returncode or done.stderr.strip():
        _fail("m4 (sendmail-cf)", done, config)
    if "Scheck_rcpt" not in done.stdout and "SParse0" not in done.stdout:
        _fail("m4 (sendmail-cf): no sendmail.cf came out", done, config)


def opensmtpd(snippet: str, folder: Path) -> None:
    """`match` lines (or a whole smtpd.conf): the actions they name and a loopback `listen` are added when the
    snippet has none, then `smtpd -n -f FILE` ("configuration OK")."""
    require_binary(SMTPD, "opensmtpd (extracted by scripts/install-mta.sh)")
    head = "" if "listen on" in snippet else f"listen on 127.0.0.1 port {free_port()}\n"
    for name, method in (("local", 'mda "cat >/dev/null"'), ("relay", "relay")):
        if f'"{name}"' in snippet and not re.search(rf'^\s*action\s+"{name}"', snippet, re.MULTILINE):
            head += f'action "{name}" {method}\n'
    config = head + snippet + "\n"
    path = folder / "smtpd.conf"
    path.write_text(config)
    done = _run([SMTPD, "-n", "-f", str(path)])
    if done.returncode or "configuration OK" not in done.stdout + done.stderr:
        _fail("smtpd -n", done, config)


def nginx(snippet: str, folder: Path) -> None:
    binary = require_binary("/usr/sbin/nginx", "nginx-light")
    config = (f"pid {folder}/nginx.pid;\nerror_log {folder}/error.log;\nevents {{}}\nhttp {{\n"
              f"access_log off;\nclient_body_temp_path {folder};\nproxy_temp_path {folder};\n"
              f"fastcgi_temp_path {folder};\nuwsgi_temp_path {folder};\nscgi_temp_path {folder};\n{snippet}\n}}\n")
    path = folder / "nginx.conf"
    path.write_text(config)
    done = _run([binary, "-t", "-c", str(path), "-p", str(folder)])
    if done.returncode:
        _fail("nginx -t", done, config)


def apache(snippet: str, folder: Path) -> None:
    binary = require_binary("/usr/sbin/apache2", "apache2")
    modules = "/usr/lib/apache2/modules"
    loads = "".join(f"LoadModule {name}_module {modules}/mod_{name}.so\n" for name in (
        "mpm_event", "authz_core", "authz_host", "proxy", "proxy_http", "proxy_connect", "access_compat",
        "rewrite"))
    config = (f"ServerRoot /etc/apache2\n{loads}Mutex file:{folder}\nPidFile {folder}/apache.pid\n"
              f"Listen 127.0.0.1:{free_port()}\nErrorLog {folder}/error.log\nServerName test.example\n{snippet}\n")
    path = folder / "apache2.conf"
    path.write_text(config)
    env = {"APACHE_RUN_DIR": str(folder), "APACHE_LOCK_DIR": str(folder), "APACHE_LOG_DIR": str(folder),
           "APACHE_RUN_USER": "www-data", "APACHE_RUN_GROUP": "www-data", "APACHE_PID_FILE": f"{folder}/apache.pid"}
    done = _run([binary, "-t", "-f", str(path)], env=env)
    if done.returncode:
        _fail("apache2 -t", done, config)


def tinyproxy(snippet: str, folder: Path) -> None:
    binary = require_binary("/usr/bin/tinyproxy", "tinyproxy")
    port = free_port()
    lines = [line for line in snippet.splitlines() if not line.strip().lower().startswith(("port ", "listen "))]
    config = (f"Port {port}\nListen 127.0.0.1\nTimeout 10\nMaxClients 5\nLogLevel Error\n" + "\n".join(lines) + "\n")
    path = folder / "tinyproxy.conf"
    path.write_text(config)
    folder.chmod(0o755)
    process = subprocess.Popen([binary, "-d", "-c", str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SnippetRejected(f"tinyproxy exited ({process.returncode}) with the snippet:\n"
                                      f"{process.stdout.read().decode(errors='replace')}\n--- configuration ---\n{config}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return  # it serves with this configuration
            except OSError:
                time.sleep(0.05)
        raise SnippetRejected(f"tinyproxy did not listen within 10 s:\n{config}")
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def privoxy(snippet: str, folder: Path) -> None:
    binary = require_binary("/usr/sbin/privoxy", "privoxy")
    config = (f"confdir {folder}\nlogdir {folder}\nlisten-address 127.0.0.1:{free_port()}\n"
              + "\n".join(line for line in snippet.splitlines() if not line.startswith("listen-address"))
              + "\n")
    if "listen-address" in snippet:  # the snippet's own listen-address is what it is about: keep it, on loopback
        config = config.replace("listen-address 127.0.0.1", "#listen-address 127.0.0.1", 1) + "".join(
            line + "\n" for line in snippet.splitlines() if line.startswith("listen-address"))
    path = folder / "config"
    path.write_text(config)
    done = _run([binary, "--config-test", "--no-daemon", str(path)])
    output = done.stdout + done.stderr
    if done.returncode or "Error:" in output or "Fatal" in output:  # it exits 0 on an unknown directive
        _fail("privoxy --config-test", done, config)


def dante(snippet: str, folder: Path) -> None:
    binary = require_binary("/usr/sbin/danted", "dante-server")
    head = ""
    if "internal:" not in snippet:
        head += f"internal: 127.0.0.1 port = {free_port()}\n"
    if "external:" not in snippet:
        head += "external: 127.0.0.1\n"
    if "clientmethod:" not in snippet:
        head += "clientmethod: none\n"
    if "socksmethod:" not in snippet:
        head += "socksmethod: none\n"
    config = f"logoutput: {folder}/danted.log\n" + head + snippet + "\n"
    path = folder / "danted.conf"
    path.write_text(config)
    done = _run([binary, "-V", "-f", str(path)])
    if done.returncode:
        log = folder / "danted.log"  # its complaints go to the logoutput file, not to stderr
        done = subprocess.CompletedProcess(done.args, done.returncode, done.stdout,
                                           done.stderr + (log.read_text() if log.exists() else ""))
        _fail("danted -V", done, config)


VALIDATORS = {
    "postfix-main": postfix_main, "postfix-master": postfix_master, "squid": squid, "exim": exim,
    "sendmail-mc": sendmail_mc, "nginx": nginx, "apache": apache, "tinyproxy": tinyproxy, "privoxy": privoxy,
    "dante": dante, "opensmtpd": opensmtpd,
}


def fresh_folder(base: Path, name: str) -> Path:
    folder = base / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder
