"""Process-group helpers shared by the real-server fixtures (mta.py, proxies.py, postfix.py): who is still alive,
a bounded wait, and the SIGKILL rounds that end a fixture's process group."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is pgid."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids


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
