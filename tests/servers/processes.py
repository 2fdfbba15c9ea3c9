"""Process-group helpers shared by the real-server fixtures (mta.py, proxies.py, postfix.py, postgres.py, redis.py):
who is still alive, a bounded wait, the SIGKILL rounds that end a fixture's process group, and which TCP ports a
group listens on."""

from __future__ import annotations

import atexit
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable


def _live_processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, start time) of every live (not zombie) process."""
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 19 and fields[0] not in ("Z", "X"):
            found[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[19])
    return found


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is pgid."""
    return [pid for pid, (_, group, _) in _live_processes().items() if group == pgid]


def tree_pids(pid: int) -> list[int]:
    """Live processes of pid's group and pid's live descendants: PostgreSQL's children each call setsid(), so its
    process group alone is the postmaster."""
    processes = _live_processes()
    found = {p for p, (_, group, _) in processes.items() if group == pid}
    if pid in processes:
        found.add(pid)
    for _ in range(64):  # bounded: one level of the tree per round
        children = {p for p, (parent, _, _) in processes.items() if parent in found} - found
        if not children:
            break
        found |= children
    return sorted(found)


def identities(pids: list[int]) -> list[tuple[int, str]]:
    """(pid, start time) of those of pids alive now: what alive() recognises later even if a pid is reused."""
    processes = _live_processes()
    return [(pid, processes[pid][2]) for pid in pids if pid in processes]


def alive(known: list[tuple[int, str]]) -> list[int]:
    """The pids of `known` (identities()) still alive as the same processes (not zombies, not a reused pid)."""
    processes = _live_processes()
    return [pid for pid, started in known if pid in processes and processes[pid][2] == started]


def wait_until(condition: Callable[[], bool], *, seconds: float, step: float = 0.02) -> bool:
    """Poll `condition` until it holds or `seconds` pass; bounded in count and in time."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds / step) + 1):
        if condition():
            return True
        if time.monotonic() > deadline:
            break
        time.sleep(step)
    return condition()


def kill_group(process: subprocess.Popen, *, timeout: float) -> None:
    """SIGKILL the process's group until the process and every member are gone: the process itself if it hung,
    and children it left behind. Bounded: SIGKILL cannot be ignored; a second round only for a late fork."""
    for _ in range(2):
        if process.poll() is not None and not group_pids(process.pid):
            return
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        wait_until(lambda: not group_pids(process.pid), seconds=timeout)


def stop_group(process: subprocess.Popen, stop_signal: int, *, timeout: float) -> None:
    """The stop signal to the whole group, a bounded wait, then kill_group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, stop_signal)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(process, timeout=timeout)


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """The inodes of the sockets these processes hold open."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _tcp_listen_rows() -> list[tuple[str, int, int]]:
    """(local address, port, inode) of every listening TCP socket (IPv4 and IPv6) in our network namespace."""
    rows = []
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/net/{name}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10 or parts[3] != "0A":  # 0A: LISTEN
                continue
            hex_address, hex_port = parts[1].split(":")
            raw = bytes.fromhex(hex_address)
            # the kernel prints each 32-bit word of the address in host byte order
            words = [raw[i:i + 4][::-1] if sys.byteorder == "little" else raw[i:i + 4] for i in range(0, len(raw), 4)]
            rows.append((str(ipaddress.ip_address(b"".join(words))), int(hex_port, 16), int(parts[9])))
    return rows


def tcp_listeners(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket these processes listen on."""
    mine = socket_inodes(pids)
    return sorted((address, port) for address, port, inode in _tcp_listen_rows() if inode in mine)


def port_listening(port: int) -> bool:
    """Whether any process of our network namespace listens on this TCP port (any address)."""
    return any(p == port for _, p, _ in _tcp_listen_rows())


def accepts(host: str, port: int) -> bool:
    """Whether host:port accepts a TCP connection now."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class StopAtExit:
    """The instances a fixture module has running. Whatever is still running when the test process exits is
    stopped: a safety net, so that no server outlives the tests (best effort: one failing stop does not keep the
    others running)."""

    def __init__(self) -> None:
        self._instances: weakref.WeakSet = weakref.WeakSet()
        atexit.register(self.stop_all)

    def add(self, instance: object) -> None:
        self._instances.add(instance)

    def discard(self, instance: object) -> None:
        self._instances.discard(instance)

    def stop_all(self) -> None:
        for instance in list(self._instances):
            try:
                instance.stop()  # type: ignore[attr-defined]
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
