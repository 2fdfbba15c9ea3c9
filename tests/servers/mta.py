"""What the Exim, Sendmail and OpenSMTPD fixtures share: a daemon from an extracted Debian package, run in the
foreground as a child of this process, on a free port of 127.0.0.1, stopped by stop() in every case.

These MTAs conflict with Postfix as Debian packages, so scripts/install-mta.sh extracts each one (apt-get download +
dpkg -x) under /opt/secure-your-server/<name> and makes the system users it needs; nothing is installed as the
system's MTA, and no system file is written. Each instance lives in its own folder (`base/NAME-KIND-N/`: config,
spool, logs, the daemon's captured output) and hands every message it does not keep for itself to our sink on
`127.0.0.1:sink_port`; mail it keeps is discarded. Nothing leaves the machine.

The daemon runs in its own session (start_new_session), so stop() reaches it and every child it forked (delivery
processes) through its process group: the stop signal, a bounded wait, then SIGKILL to the group. An instance that
needs private copies of fixed paths (OpenSMTPD's spool and control socket are compiled in) runs under
`unshare --mount` with those paths bind-mounted from its own folder: other instances and the system never see them.

With `place=` (servers/netns.py) an instance runs in a network namespace the test made instead: it listens on
place.host and hands mail to our sink on place.peer, its daemon started through `place.wrap(argv)`; read 127.0.0.1
above as those addresses. `on_server(instance, command)` is a shell command that runs `command` as the daemon
sees the machine (its mount namespace, its folder where its configuration names it), for the guides' commands, and
`restart()` starts a stopped instance again with the same command, folder, port and place, as a service restart.
"""

from __future__ import annotations

import functools
import os
import pwd
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ports import free_port

from servers.netns import LOOPBACK_PLACE, Place
from servers.processes import StopAtExit, group_pids, stop_group

LOOPBACK = "127.0.0.1"
PREFIX = Path(os.environ.get("MTA_ROOT", "/opt/secure-your-server"))
UNSHARE = "/usr/bin/unshare"
FOREIGN_NETWORK = "198.51.100.0/24"  # TEST-NET-2: the only clients a closed kind trusts (never our probe)
START_TIMEOUT = 15.0  # seconds until the 220 banner must answer
STOP_TIMEOUT = 10.0  # seconds for the daemon to go after its stop signal, before SIGKILL
PORT_ATTEMPTS = 3  # a free port chosen here may be taken before the daemon binds it

_MOUNT_SCRIPT = ('set -e; while [ "$1" != "--" ]; do mount --bind "$1" "$2"; shift 2; done; shift; '
                 'exec "$@"')


class MtaUnavailable(RuntimeError):
    """The MTA cannot run here (not extracted, not root, user missing). The calling test decides skip or fail."""


class MtaStartError(RuntimeError):
    """The MTA is there, but this instance did not come up; the message carries its log tail."""


@dataclass(eq=False)
class MtaInstance:
    name: str  # "exim", "sendmail", "opensmtpd"
    kind: str
    port: int
    directory: Path
    sink_port: int
    hostname: str  # the name it announces in its banner
    version: str = ""
    log_files: list[Path] = field(default_factory=list)
    output_file: Path | None = None
    stop_signal: int = signal.SIGTERM
    place: Place = LOOPBACK_PLACE  # loopback, or a network namespace (servers/netns.py)
    argv: list[str] = field(default_factory=list)  # the daemon's command, before place.wrap
    mounts: list[tuple[Path, str]] = field(default_factory=list)  # its private mounts (with_mounts)
    _process: subprocess.Popen | None = field(default=None, repr=False)
    _out: object | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def host(self) -> str:
        return self.place.host

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def pids(self) -> list[int]:
        return [] if self._process is None else group_pids(self._process.pid)

    def log(self) -> str:
        """The daemon's own logs and its captured output, for assertions and debugging."""
        parts = []
        for path in [*self.log_files, *([self.output_file] if self.output_file else [])]:
            try:
                parts.append(f"==> {path.name} <==\n{path.read_text(errors='replace')}")
            except OSError:
                continue
        return "\n".join(parts)

    def wait_log(self, needle: str, seconds: float = 5.0) -> str:
        deadline = time.monotonic() + seconds
        for _ in range(int(seconds / 0.05) + 1):  # bounded in count and time
            text = self.log()
            if needle in text or time.monotonic() > deadline:
                return text
            time.sleep(0.05)
        return self.log()

    def stop(self) -> None:
        """Stop signal, bounded wait, SIGKILL to the process group; idempotent."""
        with self._lock:
            process = self._process
            try:
                if process is not None:
                    stop_group(process, self.stop_signal, timeout=STOP_TIMEOUT)
            finally:
                _running.discard(self)
                if self._out is not None:
                    self._out.close()  # type: ignore[attr-defined]
                    self._out = None

    def __enter__(self) -> "MtaInstance":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_running = StopAtExit()  # stopped at exit if still running


def require_root_and_user(what: str, binary: Path, user: str) -> None:
    """Raise MtaUnavailable unless `binary` is extracted, we are root and the system `user` exists."""
    if not os.access(binary, os.X_OK):
        raise MtaUnavailable(f"{binary} is missing: as root run `bash scripts/install-mta.sh {what}` (make test "
                             "does it)")
    if os.geteuid() != 0:
        raise MtaUnavailable(f"{what} instances need root (the daemon starts as root and drops privileges)")
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise MtaUnavailable(f"the system user {user} is missing: run `bash scripts/install-mta.sh {what}`") from None


@functools.lru_cache(maxsize=1)
def mount_namespace_possible() -> bool:
    """Whether `unshare --mount` with bind mounts works here (root with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not os.access(UNSHARE, os.X_OK):
        return False
    try:
        result = subprocess.run([UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c",
                                 "mount --bind /tmp /mnt && echo ok"], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == "ok"


def with_mounts(argv: list[str], mounts: list[tuple[Path, str]]) -> list[str]:
    """argv run in a private mount namespace where each (source, target) pair is bind-mounted."""
    pairs = [str(part) for source, target in mounts for part in (source, target)]
    return [UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _MOUNT_SCRIPT, "mounts",
            *pairs, "--", *argv]


def new_directory(base: Path, name: str) -> Path:
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):  # bounded
        directory = base.resolve() / f"{name}-{n}"
        try:
            directory.mkdir(mode=0o755)
            os.chmod(directory, 0o755)
            return directory
        except FileExistsError:
            continue
    raise MtaStartError(f"no free instance folder for {name} under {base}")


def launch(instance: MtaInstance, argv: list[str], *, env: dict[str, str] | None = None,
           timeout: float = START_TIMEOUT) -> MtaInstance:
    """Start argv for `instance` (output captured in its folder; in its place's network namespace) and wait for its
    220 banner on its port."""
    output = instance.directory / f"{instance.name}.out"
    instance.output_file = output
    instance.argv = list(argv)
    out = open(output, "ab")
    instance._out = out
    _running.add(instance)
    try:
        instance._process = subprocess.Popen(instance.place.wrap(argv), cwd=instance.directory,
                                             stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True, env=env)
    except OSError as exc:
        instance.stop()
        raise MtaStartError(f"{instance.name}: cannot run {argv[0]}: {exc}") from exc
    try:
        _wait_banner(instance, timeout)
    except BaseException:
        instance.stop()
        raise
    return instance


def _wait_banner(instance: MtaInstance, timeout: float) -> None:
    process = instance._process
    assert process is not None
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):  # bounded in count and in time
        if process.poll() is not None:
            raise MtaStartError(f"{instance.name} {instance.kind} on {instance.host}:{instance.port} exited during "
                                f"start-up (exit {process.returncode}):\n{tail(instance.log())}")
        if banner(instance.port, instance.hostname, instance.host) is not None:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise MtaStartError(f"{instance.name} {instance.kind} on {instance.host}:{instance.port} gave no 220 banner "
                        f"within {timeout} s:\n{tail(instance.log())}")


def restart(instance: MtaInstance, *, timeout: float = START_TIMEOUT) -> MtaInstance:
    """Stop the instance and start its daemon again with the same command, folder, port and place, as a service
    restart does: it reads its (maybe changed) configuration anew. Returns the new instance."""
    instance.stop()
    again = MtaInstance(name=instance.name, kind=instance.kind, port=instance.port, directory=instance.directory,
                        sink_port=instance.sink_port, hostname=instance.hostname, version=instance.version,
                        log_files=list(instance.log_files), stop_signal=instance.stop_signal, place=instance.place,
                        mounts=list(instance.mounts))
    return launch(again, instance.argv, timeout=timeout)


def on_server(instance: MtaInstance, command: str) -> str:
    """A shell command that runs `command` as the instance's daemon sees the machine: in a private mount namespace
    with the instance's mounts (its folder where its configuration names it; Sendmail's own hosts file). The
    mounts are in a script in the instance's folder (`on-server`), so the command names no system path itself."""
    script = instance.directory / "on-server"
    if not script.exists():
        script.write_text("#!/bin/sh\n# runs \"$1\" with the mounts its daemon runs with (tests/servers/mta.py)\n"
                          f"exec {shlex.join(with_mounts(['/bin/sh', '-c'], instance.mounts))} \"$1\"\n")
        os.chmod(script, 0o700)
    return f"{shlex.quote(str(script))} {shlex.quote(command)}"


def banner(port: int, hostname: str, host: str = LOOPBACK) -> bytes | None:
    """The 220 greeting on host:port naming `hostname`, or None if it is not answering (yet)."""
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            sock.settimeout(2)
            data = b""
            for _ in range(16):  # bounded: the greeting is short
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
                if data.endswith(b"\n") and b"220 " in data.splitlines()[-1]:
                    break
            if data.startswith(b"220") and hostname.encode() in data:
                sock.sendall(b"QUIT\r\n")
                return data
    except OSError:
        pass
    return None


def start_kind(kind: str, kinds: tuple[str, ...], available: Callable[[], None],
               start: Callable[[int], MtaInstance]) -> MtaInstance:
    """What every MTA's start function does: refuse an unknown kind, check the MTA can run here, then start it on a
    free port (start_with_port)."""
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, not {kind!r}")
    available()
    return start_with_port(start)


def start_with_port(start: Callable[[int], MtaInstance]) -> MtaInstance:
    """start(port) with a free port (never the sink's: tests/ports.py hands out no port twice, nor a bound one),
    chosen again when another process took it first (bounded)."""
    error: MtaStartError | None = None
    for _ in range(PORT_ATTEMPTS):
        try:
            return start(free_port())
        except MtaStartError as exc:
            error = exc
            if "in use" not in str(exc).lower():
                raise
    assert error is not None
    raise error


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])

