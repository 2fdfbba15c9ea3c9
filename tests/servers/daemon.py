"""What the PostgreSQL and Redis fixtures (postgres.py, redis.py) share: a daemon run in the foreground as a child of
this process, in its own session, in a private temporary folder that stop() removes, on a free port of 127.0.0.1.
Its processes are its process group and the leader's descendants (PostgreSQL's children each call setsid()).

stop(): the daemon's own stop signal to the leader (PostgreSQL's fast shutdown is SIGINT), a bounded wait, SIGKILL
to the group and to every process of the instance seen before the signal, the folder removed, then a check that
none is left and the port is free; idempotent. An atexit hook stops every instance still running when the test
process ends.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ports import free_port

from servers.processes import (
    StopAtExit,
    alive,
    identities,
    kill_group,
    port_listening,
    tcp_listeners,
    tree_pids,
    wait_until,
)

LOOPBACK = "127.0.0.1"
STOP_TIMEOUT = 10.0  # seconds for the daemon to go after its stop signal, before SIGKILL
KILL_TIMEOUT = 5.0  # seconds for the group to go after SIGKILL
PORT_ATTEMPTS = 3  # a free port chosen here may be taken before the daemon binds it: re-chosen this often


class DaemonStartError(RuntimeError):
    """The daemon is installed but this instance did not come up; the message carries its output's tail."""


class DaemonStopError(RuntimeError):
    """stop() could not end the instance's processes or free its port."""


class PortInUse(DaemonStartError):
    """The port chosen was taken before the daemon could bind it (start again on another)."""


_running = StopAtExit()  # stopped at exit if still running


@dataclass(eq=False)
class DaemonInstance:
    name: str  # "postgres", "redis"
    port: int
    directory: Path  # private temporary folder, removed by stop()
    version: str = ""
    stop_signal: int = signal.SIGTERM
    output_file: Path | None = None  # the daemon's stdout and stderr
    start_seconds: float = 0.0
    _process: subprocess.Popen | None = field(default=None, repr=False)
    _out: IO[bytes] | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def host(self) -> str:
        return LOOPBACK

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def pids(self) -> list[int]:
        """Live (not zombie) processes of the instance: its process group and the leader's descendants."""
        return [] if self._process is None else tree_pids(self._process.pid)

    def listeners(self) -> list[tuple[str, int]]:
        """(address, port) of every TCP socket the instance's processes listen on."""
        return tcp_listeners(self.pids())

    def log(self) -> str:
        """The daemon's captured output (empty once stop() removed the folder)."""
        try:
            return self.output_file.read_text(errors="replace") if self.output_file else ""
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop signal to the daemon, bounded wait, SIGKILL to the group, folder removed; idempotent. Raises
        DaemonStopError when a process of the group is left or the port still listens."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            known = identities(self.pids())
            try:
                if self._process is not None:
                    _stop_process(self._process, self.stop_signal, known)
            finally:
                _running.discard(self)
                if self._out is not None:
                    self._out.close()
                    self._out = None
                shutil.rmtree(self.directory, ignore_errors=True)
            self._check_stopped(known)

    def _check_stopped(self, known: list[tuple[int, str]]) -> None:
        leftovers = sorted(set(self.pids()) | set(alive(known)))
        freed = wait_until(lambda: not port_listening(self.port), seconds=KILL_TIMEOUT)
        if leftovers or not freed:
            raise DaemonStopError(f"{self.name} on {LOOPBACK}:{self.port} still running after stop() "
                                  f"(pids {leftovers}, port listening: {not freed})")

    def __enter__(self) -> DaemonInstance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _stop_process(process: subprocess.Popen, stop_signal: int, known: list[tuple[int, str]]) -> None:
    if process.poll() is None:
        with suppress(ProcessLookupError):
            process.send_signal(stop_signal)  # the leader only: it stops its own children in order
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_TIMEOUT)
    kill_group(process, timeout=KILL_TIMEOUT)  # the leader if it hung, and any child it left
    orphans = alive(known)  # children in sessions of their own, reparented when the leader went
    for pid in orphans:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alive(known), seconds=KILL_TIMEOUT)


def new_directory(name: str, parent: str | None = None) -> Path:
    """A private temporary folder (0700) for one instance; under /tmp unless `parent` says otherwise."""
    return Path(tempfile.mkdtemp(prefix=f"{name}-fixture-", dir=parent))


def launch(instance: DaemonInstance, argv: list[str], **popen: object) -> None:
    """Start argv for `instance` in its own session, its output captured in its folder (`NAME.out`)."""
    instance.output_file = instance.directory / f"{instance.name}.out"
    instance._out = open(instance.output_file, "ab")  # noqa: SIM115 - closed by stop()
    _running.add(instance)
    try:
        instance._process = subprocess.Popen(argv, cwd=instance.directory, stdin=subprocess.DEVNULL,
                                             stdout=instance._out, stderr=subprocess.STDOUT,
                                             start_new_session=True, **popen)  # type: ignore[call-overload]
    except OSError as exc:
        instance.stop()
        raise DaemonStartError(f"{instance.name}: cannot run {argv[0]}: {exc}") from exc


def wait_ready(instance: DaemonInstance, ready: Callable[[], bool], timeout: float, in_use: str) -> None:
    """Poll `ready` until it holds (bounded in count and time); stop the instance and raise PortInUse when its
    output says `in_use`, DaemonStartError when it exits or the time is up."""
    process = instance._process
    assert process is not None
    started = time.monotonic()
    for _ in range(int(timeout / 0.05) + 1):
        if process.poll() is not None or time.monotonic() - started > timeout:
            break
        if ready():
            instance.start_seconds = time.monotonic() - started
            return
        time.sleep(0.05)
    output = instance.log()
    instance.stop()
    error = PortInUse if in_use in output else DaemonStartError
    state = f"exited (status {process.returncode})" if process.returncode is not None else f"not ready in {timeout} s"
    raise error(f"{instance.name} on {LOOPBACK}:{instance.port} {state}:\n{tail(output)}")


def with_free_port(start: Callable[[int], DaemonInstance]) -> DaemonInstance:
    """start(port) with a free port, chosen again when another process took it first (bounded)."""
    for attempt in range(PORT_ATTEMPTS):
        try:
            return start(free_port())
        except PortInUse:
            if attempt == PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])

