"""Real Postfix instances as loopback test fixtures, side by side, each in its own folder.

    inst = start_postfix(tmp_path, "open", sink_port=sink.port)
    try:
        ...  # talk SMTP to 127.0.0.1:inst.port
    finally:
        inst.stop()

Kinds:
- "open": every client is in mynetworks, so it relays any recipient (to the sink).
- "closed": loopback is not in mynetworks; a foreign recipient gets `554 5.7.1 <rcpt>: Relay access denied`.
- "starttls": relays like "open", but requires STARTTLS before MAIL (`530 5.7.0 Must issue a STARTTLS command
  first`), with a self-signed certificate made for the instance.
- "submission": Debian's stock `submission` service of master.cf, uncommented as administrators do (its `-o`
  lines on our smtpd: `smtpd_tls_security_level=encrypt`, `smtpd_sasl_auth_enable=yes`, `smtpd_tls_auth_only=yes`,
  `smtpd_recipient_restrictions=permit_sasl_authenticated,reject`, ...), loopback not in mynetworks. SASL is
  Cyrus (`smtpd_sasl_type = cyrus`) without a configuration of its own and without a daemon or user database:
  after STARTTLS it offers every mechanism of the installed Cyrus modules (libsasl2-modules: PLAIN, LOGIN,
  CRAM-MD5, DIGEST-MD5, SCRAM-*, NTLM), and nobody can log in (the tests never try). A stranger's recipient gets
  `554 5.7.1 <rcpt>: Recipient address rejected: Access denied`.

With `place=` (servers/netns.py) an instance runs in a network namespace the test made instead: smtpd on
place.host, mail to our sink on place.peer, the master started through `ip netns exec`; below, read 127.0.0.1 as
those addresses. By default everything listens on and connects to 127.0.0.1 only: smtpd on `port`, and every message the instance accepts goes
to `[127.0.0.1]:sink_port` (relayhost, default and relay transports); local mail is discarded. Nothing under
/etc/postfix is written: the instance reads its own main.cf/master.cf, and Debian's /etc/postfix/master.cf (if
present) is only a template; `meta_directory = /etc/postfix` is read by `postfix check` for postfix-files.

Layout under `base`: KINDn/{conf/{main.cf,master.cf[,cert.pem,key.pem]}, queue/, maillog, master.out, data ->}
where `data` links to the instance's data_directory in /tmp (see _start for why), removed by stop(). Names are
kept short because the postfix command talks to postlogd through the absolute AF_UNIX path queue/public/postlog.

The master runs through `postfix -c DIR start-fg`, so it stays a child of this process (through the
postfix-script shell) and is reaped when it exits; `postfix start` would orphan it to PID 1, which in a container
may not reap it (it then shows as `[master] <defunct>`).
"""

from __future__ import annotations

import grp
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ports import free_port
from servers.netns import LOOPBACK_PLACE, Place
from servers.processes import StopAtExit, wait_until

Kind = Literal["open", "closed", "starttls", "submission"]
KINDS: tuple[str, ...] = ("open", "closed", "starttls", "submission")
# Debian 12's master.cf submission block, its "-o" lines uncommented (empty restriction lists kept as written)
SUBMISSION_OVERRIDES = ("syslog_name=postfix/submission", "smtpd_tls_security_level=encrypt",
                        "smtpd_sasl_auth_enable=yes", "smtpd_tls_auth_only=yes", "smtpd_reject_unlisted_recipient=no",
                        "smtpd_client_restrictions=", "smtpd_helo_restrictions=", "smtpd_sender_restrictions=",
                        "smtpd_relay_restrictions=", "smtpd_recipient_restrictions=permit_sasl_authenticated,reject",
                        "milter_macro_daemon_name=ORIGINATING")

POSTFIX = "/usr/sbin/postfix"
OPENSSL = "/usr/bin/openssl"
DEBIAN_MASTER_CF = Path("/etc/postfix/master.cf")
LOOPBACK = "127.0.0.1"
DATA_ROOT = "/tmp"  # world-searchable (1777): see _start on why data_directory is not under the pytest folder

# Services an instance needs, in master.cf order (the stock smtp inet line and the pipe(8) examples are left out).
SERVICES = ("pickup", "cleanup", "qmgr", "tlsmgr", "rewrite", "bounce", "defer", "trace", "verify", "flush",
            "proxymap", "proxywrite", "smtp", "relay", "showq", "error", "retry", "discard", "local", "virtual",
            "lmtp", "anvil", "scache", "postlog")

# Used when /etc/postfix/master.cf is absent (Postfix 3.7's stock file, chroot off).
FALLBACK_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
        -o syslog_name=postfix/$service_name
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

START_TIMEOUT = 10.0  # seconds until the smtpd banner must answer
STOP_TIMEOUT = 5.0  # seconds for the master to go after `postfix stop`


class PostfixUnavailable(RuntimeError):
    """Postfix cannot run here (binary missing, not root, no postfix user ...). The test decides skip or fail."""


class PostfixStartError(RuntimeError):
    """Postfix is installed but this instance did not come up; the message carries the log tail."""


def postfix_available() -> None:
    """Raise PostfixUnavailable unless a private Postfix instance can be started here."""
    if not os.access(POSTFIX, os.X_OK):
        raise PostfixUnavailable(f"{POSTFIX} is missing: install the Debian package postfix")
    if os.geteuid() != 0:
        raise PostfixUnavailable("Postfix instances need root (the master runs as root and drops to postfix)")
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError as exc:
        raise PostfixUnavailable(f"the postfix user or postdrop group is missing: {exc}") from None


def master_cf(port: int, host: str = LOOPBACK, overrides: tuple[str, ...] = ()) -> str:
    """master.cf: Debian's stock services we need, chroot off, plus smtpd on HOST:PORT only (127.0.0.1), with `-o`
    overrides, as a submission service has them."""
    text = FALLBACK_MASTER_CF
    if DEBIAN_MASTER_CF.is_file():
        kept: list[str] = []
        keep = False
        for line in DEBIAN_MASTER_CF.read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace():  # continuation of the previous service
                if keep:
                    kept.append(line)
                continue
            fields = line.split()
            keep = len(fields) >= 8 and fields[0] in SERVICES and fields[1] in ("unix", "unix-dgram", "fifo")
            if keep:
                fields[4] = "n"  # no chroot: a jail would need copies of /etc files in each queue directory
                kept.append("  ".join(fields[:7]) + "  " + " ".join(fields[7:]))
        names = {line.split()[0] for line in kept if not line[0].isspace()}
        if {"pickup", "cleanup", "qmgr", "rewrite", "smtp", "discard", "postlog"} <= names:
            text = "\n".join(kept) + "\n"
    return (
        "# Generated by tests/servers/postfix.py\n"
        f"{host}:{port} inet  n       -       n       -       20      smtpd\n"
        + "".join(f"  -o {option}\n" for option in overrides)
        + text
    )


def main_cf(kind: Kind, *, inst: Path, queue: Path, data: Path, log_file: Path, sink_port: int,
            myhostname: str, cert: Path | None, key: Path | None, place: Place = LOOPBACK_PLACE) -> str:
    """main.cf of one instance: it listens on place.host and sends every message to our sink on place.peer."""
    sink = f"[{place.peer}]:{sink_port}"
    networks = "198.51.100.0/24" if kind in ("closed", "submission") else "0.0.0.0/0"
    lines = [
        "# Generated by tests/servers/postfix.py: a private loopback instance",
        "compatibility_level = 3.6",
        "meta_directory = /etc/postfix",
        f"queue_directory = {queue}",
        f"data_directory = {data}",
        "mail_owner = postfix",
        "setgid_group = postdrop",
        # maillog_file must start with one of these prefixes (default: /var, /dev/stdout)
        f"maillog_file_prefixes = {inst}",
        f"maillog_file = {log_file}",
        f"myhostname = {myhostname}",
        "mydomain = test.example",
        "myorigin = $myhostname",
        "mydestination = $myhostname, localhost",
        f"inet_interfaces = {place.host}",
        "inet_protocols = ipv4",
        f"mynetworks = {networks}",
        "smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination",
        "smtpd_banner = $myhostname ESMTP Postfix (Debian/GNU)",
        "smtpd_peername_lookup = no",
        "in_flow_delay = 0s",
        "biff = no",
        "alias_maps =",
        "alias_database =",
        # mail stays on the box
        f"relayhost = {sink}",
        f"default_transport = smtp:{sink}",
        f"relay_transport = smtp:{sink}",
        "local_transport = discard:",
        "smtp_dns_support_level = disabled",
        f"smtp_bind_address = {place.host}",
        "smtp_connect_timeout = 5s",
        "smtp_tls_security_level = none",
        # short queue lifetimes: nothing lingers when the sink is gone
        "maximal_queue_lifetime = 10m",
        "bounce_queue_lifetime = 10m",
        "queue_run_delay = 10s",
        "minimal_backoff_time = 10s",
        "maximal_backoff_time = 60s",
    ]
    if kind == "submission":
        lines += [
            f"smtpd_tls_cert_file = {cert}",
            f"smtpd_tls_key_file = {key}",
            "smtpd_sasl_type = cyrus",
        ]
    if kind == "starttls":
        lines += [
            "smtpd_tls_security_level = encrypt",
            f"smtpd_tls_cert_file = {cert}",
            f"smtpd_tls_key_file = {key}",
            "smtpd_tls_loglevel = 1",
        ]
    return "\n".join(lines) + "\n"


def _make_certificate(conf: Path, myhostname: str) -> tuple[Path, Path]:
    if not os.access(OPENSSL, os.X_OK):
        raise PostfixUnavailable(f"{OPENSSL} is missing: install the Debian package openssl")
    cert, key = conf / "cert.pem", conf / "key.pem"
    result = subprocess.run(
        [OPENSSL, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={myhostname}",
         "-keyout", str(key), "-out", str(cert)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    if result.returncode != 0:
        raise PostfixStartError(f"openssl req failed: {result.stderr.decode(errors='replace')[-2000:]}")
    os.chmod(key, 0o600)  # root only: smtpd loads it before dropping privileges
    os.chmod(cert, 0o644)
    return cert, key


_running = StopAtExit()  # stopped at exit if still running


@dataclass(eq=False)  # identity equality and hash (kept in a WeakSet while running)
class PostfixInstance:
    kind: Kind
    port: int  # the smtpd port on 127.0.0.1
    config_dir: Path
    queue_dir: Path
    log_file: Path  # maillog_file, readable by tests
    data_dir: Path | None = None  # data_directory (in /tmp, owned by postfix; removed by stop())
    sink_port: int = 0
    host: str = LOOPBACK  # where smtpd listens (place.host)
    place: Place = LOOPBACK_PLACE
    cert_file: Path | None = None
    check_output: str = ""  # what `postfix check` printed (warnings), "" when clean
    _process: subprocess.Popen | None = field(default=None, repr=False)
    _out: object = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def pid_file(self) -> Path:
        return self.queue_dir / "pid" / "master.pid"

    def master_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """The maillog text so far ("" before postlogd has written anything)."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def postfix(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run `postfix -c CONFIG_DIR ARGS...` (in the instance's network namespace: it checks inet_interfaces
        against the interfaces it sees); `.stdout` has what it printed (it also logs to the maillog)."""
        return _run(self.place.wrap([POSTFIX, "-c", str(self.config_dir), *args]), cwd=self.config_dir.parent,
                    env=_env(self.config_dir), timeout=timeout)

    def stop(self) -> None:
        """`postfix stop`, then wait (bounded) until the master and its children are gone. Idempotent."""
        with self._lock:
            try:
                self._stop()
            finally:
                _running.discard(self)
                if self._out is not None:
                    self._out.close()  # type: ignore[attr-defined]
                    self._out = None

    def _stop(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            try:
                # postfix-script itself waits up to 5 s, then kill -9s the master's process group
                self.postfix("stop", timeout=STOP_TIMEOUT + 10)
            except subprocess.TimeoutExpired:
                pass
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._force(process)
        if process is not None:
            _wait_gone(self.queue_dir, seconds=STOP_TIMEOUT)
        if self.data_dir is not None and self.data_dir.parent == Path(DATA_ROOT):
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def _force(self, process: subprocess.Popen) -> None:
        pid = self.master_pid()
        if pid is not None and _cwd_is(pid, self.queue_dir):
            try:
                os.killpg(pid, signal.SIGKILL)  # the master is a session leader; its children share the group
            except ProcessLookupError:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the postfix-script shell (own session, start_new_session)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "PostfixInstance":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run a short Postfix command with a pseudo-terminal as stdout/stderr and return what it printed.

    The postfix(1) command prints its errors only when stderr is a terminal; otherwise they go to syslog (absent
    here) or the maillog, and some (a unix socket path too long for postlog) go nowhere.
    """
    master, slave = os.openpty()
    try:
        try:
            result = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                                    timeout=timeout)
        finally:
            os.close(slave)
        output = b""
        for _ in range(64):  # bounded: what the command printed is already in the pty buffer
            ready, _, _ = select.select([master], [], [], 0.05)
            if not ready:
                break
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: no writer left
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
    result.stdout = output.decode(errors="replace").replace("\r\n", "\n")
    return result


def _env(config_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAIL_")}
    env["MAIL_CONFIG"] = str(config_dir)
    env.setdefault("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
    return env


def _cwd_is(pid: int, directory: Path) -> bool:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd")) == directory
    except OSError:
        return False


def _instance_pids(queue_dir: Path) -> list[int]:
    """Live processes whose working directory is this queue directory: the master and all its daemons."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and _cwd_is(int(entry.name), queue_dir):
            pids.append(int(entry.name))
    return pids


def _wait_gone(queue_dir: Path, seconds: float) -> None:
    wait_until(lambda: not _instance_pids(queue_dir), seconds=seconds, step=0.05)
    for pid in _instance_pids(queue_dir):  # stragglers of this instance only
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _banner(port: int, myhostname: str, host: str = LOOPBACK) -> bytes | None:
    """The 220 greeting of our smtpd on host:port, or None if it is not answering (yet)."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.settimeout(2)
            data = b""
            for _ in range(16):  # bounded: the greeting is one short line
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
                if b"\n" in data:
                    break
            if data.startswith(b"220 ") and myhostname.encode() in data:
                sock.sendall(b"QUIT\r\n")
                return data
    except OSError:
        pass
    return None


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])


def start_postfix(base: Path, kind: Kind, *, sink_port: int, port: int | None = None,
                  myhostname: str = "mx.test.example", timeout: float = START_TIMEOUT,
                  place: Place = LOOPBACK_PLACE) -> PostfixInstance:
    """Start a private Postfix of `kind` under `base` (e.g. a pytest tmp_path); its smtpd answers on 127.0.0.1,
    or on place.host inside place's network namespace (servers/netns.py), sending to our sink on place.peer.

    Raises PostfixUnavailable when Postfix cannot run here, PostfixStartError when this instance did not come up.
    A port chosen here (port=None) is re-chosen if it was taken in the meantime (bounded).
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    postfix_available()
    attempts = 3 if port is None else 1
    error: PostfixStartError | None = None
    for _ in range(attempts):
        chosen = port if port is not None else free_port()
        if chosen == sink_port:
            if port is not None:
                raise ValueError("port and sink_port must differ (Postfix would see mail loop back to itself)")
            continue
        try:
            return _start(Path(base), kind, sink_port=sink_port, port=chosen, myhostname=myhostname,
                          timeout=timeout, place=place)
        except PostfixStartError as exc:
            error = exc
            if "Address already in use" not in str(exc):
                raise
    assert error is not None
    raise error


def _start(base: Path, kind: Kind, *, sink_port: int, port: int, myhostname: str, timeout: float,
           place: Place) -> PostfixInstance:
    base.mkdir(parents=True, exist_ok=True)
    base = base.resolve()
    if any(c.isspace() or c in ",$" for c in str(base)):
        raise PostfixStartError(f"{base}: a path with blanks, commas or $ cannot be written into main.cf")
    # Short names: the postfix command reaches postlogd through QUEUE/public/postlog, an AF_UNIX path (< 108 bytes).
    longest = len(str(base / f"{kind}999" / "queue" / "public" / "postlog"))
    if longest >= 108:
        raise PostfixStartError(f"{base} is too long for Postfix's unix sockets ({longest} >= 108 bytes); "
                                "use a shorter base folder (pytest --basetemp)")
    for n in range(1, 1000):  # bounded
        inst = base / f"{kind}{n}"
        try:
            inst.mkdir(mode=0o755)
            break
        except FileExistsError:
            continue
    else:
        raise PostfixStartError(f"no free instance folder under {base}")
    os.chmod(inst, 0o755)
    conf, queue = inst / "conf", inst / "queue"
    conf.mkdir(mode=0o755)
    queue.mkdir(mode=0o755)  # root-owned; `postfix check` creates the subfolders with their owners and modes
    # The master (data_directory/master.lock) and tlsmgr (prng_exch) open files in data_directory by absolute
    # path as the postfix user, so every folder above it must be searchable by postfix. pytest's folders are
    # 0700 and pytest re-chmods /tmp/pytest-of-root to 0700 at every session start (any concurrent run), so the
    # data directory lives in /tmp instead, linked from the instance folder and removed by stop().
    data = Path(tempfile.mkdtemp(prefix=f"postfix-data-{kind}-", dir=DATA_ROOT))
    os.chmod(data, 0o700)
    shutil.chown(data, "postfix", "postfix")
    (inst / "data").symlink_to(data)
    log_file = inst / "maillog"
    instance = PostfixInstance(kind=kind, port=port, config_dir=conf, queue_dir=queue, log_file=log_file,
                               data_dir=data, sink_port=sink_port, host=place.host, place=place)
    try:
        _configure_and_start(instance, inst, myhostname=myhostname)
        _wait_banner(instance, myhostname=myhostname, timeout=timeout)
    except BaseException:
        instance.stop()  # also removes the data directory
        raise
    return instance


def _configure_and_start(instance: PostfixInstance, inst: Path, *, myhostname: str) -> None:
    conf, kind = instance.config_dir, instance.kind
    cert = key = None
    if kind in ("starttls", "submission"):
        cert, key = _make_certificate(conf, myhostname)
        instance.cert_file = cert
    assert instance.data_dir is not None
    (conf / "main.cf").write_text(main_cf(kind, inst=inst, queue=instance.queue_dir, data=instance.data_dir,
                                          log_file=instance.log_file, sink_port=instance.sink_port,
                                          myhostname=myhostname, cert=cert, key=key, place=instance.place))
    (conf / "master.cf").write_text(master_cf(instance.port, instance.host,
                                              SUBMISSION_OVERRIDES if kind == "submission" else ()))
    # Postfix re-reads a main.cf modified within the last second, pausing 0.3 s each time until it is older
    # (against reading a file that is still being written): that costs ~2 s per command on a fresh file.
    past = time.time() - 10
    for name in ("main.cf", "master.cf"):
        os.utime(conf / name, (past, past))

    check = instance.postfix("check")
    if check.returncode != 0:
        raise PostfixStartError(f"postfix -c {conf} check failed (exit {check.returncode}):\n{check.stdout}"
                                f"{_tail(instance.log())}")
    instance.check_output = check.stdout

    out = open(inst / "master.out", "ab")
    instance._out = out
    _running.add(instance)
    instance._process = subprocess.Popen(
        instance.place.wrap([POSTFIX, "-c", str(conf), "start-fg"]), cwd=inst, env=_env(conf), stdin=subprocess.DEVNULL,
        stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_banner(instance: PostfixInstance, *, myhostname: str, timeout: float) -> None:
    process, port = instance._process, instance.port
    assert process is not None
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):  # bounded in count and in time
        if process.poll() is not None:
            raise PostfixStartError(
                f"postfix {instance.kind} on {instance.host}:{port} exited during start-up "
                f"(exit {process.returncode}):\n{_tail(instance.log())}")
        if _banner(port, myhostname, instance.host) is not None:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise PostfixStartError(f"postfix {instance.kind} on {instance.host}:{port} gave no 220 banner within {timeout} s:"
                            f"\n{_tail(instance.log())}")

