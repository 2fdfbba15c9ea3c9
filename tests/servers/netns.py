"""Where a fixture runs: on loopback (the default), or in a network namespace that the test makes itself.

A server on the Internet is probed from an address it does not trust. On loopback every probe comes from
127.0.0.1, which each guide rightly tells the owner to trust, so a guide's Fix cannot be proven there. A
namespace puts the fixture behind a veth pair with addresses from the benchmarking range 198.18.0.0/15
(RFC 2544), one /30 per namespace:

    with Netns.create() as ns:
        ns.place.host   # 198.18.X.2: inside the namespace, where the fixture listens and sends from
        ns.place.peer   # 198.18.X.1: our side, where the site's sink and canaries listen and its probes come from
        ns.place.wrap(argv)  # ["ip", "netns", "exec", NAME, *argv]: run a daemon inside

The namespace has its own loopback and the veth end, and no other route: a daemon inside can reach nothing but
its own loopback and the /30 (create() checks that), which is the fence for proxies and mail alike.

Names are unique per test process (`sysgf<pid>-<n>`, veth `sgh<pid>n<n>` / `sgn<pid>n<n>`); the /30 is chosen
from the pid and a counter, and skipped when any address of the host is already in it. `delete()` first kills
every process still in the namespace (they can only be ours: we made it), then deletes it, which removes the veth
pair with it. An atexit hook deletes whatever this process made and left; a process killed before its hook ran
leaves its namespaces to the next Netns.create(), which sweeps those of dead owners.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

IP = "/usr/sbin/ip"
RANGE = ipaddress.ip_network("198.18.0.0/15")
SUBNETS = RANGE.num_addresses // 4  # /30s in the range
LOOPBACK = "127.0.0.1"
COMMAND_TIMEOUT = 10.0
KILL_TIMEOUT = 5.0
LATE_JOIN_ROUNDS = 6  # scans of /proc, 50 ms apart, for a process that joined the namespace while it was deleted


@dataclass(frozen=True)
class Place:
    """Where a fixture listens (`host`), where it finds our sink and canaries (`peer`), and how a command is
    run there (`wrap`). The default is loopback for both, no namespace."""

    host: str = LOOPBACK
    peer: str = LOOPBACK
    netns: str | None = None

    def wrap(self, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    @property
    def namespaced(self) -> bool:
        return self.netns is not None


LOOPBACK_PLACE = Place()


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no iproute2). The calling test decides skip or fail."""


def available() -> None:
    if not os.access(IP, os.X_OK):
        raise NetnsUnavailable(f"{IP} is missing: install the Debian package iproute2")
    if os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([IP, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed (exit {done.returncode}): {done.stderr.strip()}")
    return done


def _used_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network configured on the host's interfaces (`ip -o -4 addr`)."""
    networks = []
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        words = line.split()
        if "inet" in words:
            networks.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
    return networks


_counter = itertools.count(1)
_lock = threading.Lock()
_made: dict[str, Netns] = {}


@dataclass(eq=False)
class Netns:
    name: str
    host_link: str  # the veth end on our side
    place: Place
    _deleted: bool = False
    _inode: int | None = None  # of the namespace (/run/netns/NAME): finds a late joiner once the name is gone

    @classmethod
    def create(cls) -> Netns:
        """A new namespace with a veth pair to it; raises NetnsUnavailable when that cannot be done here."""
        available()
        _sweep_stale()
        pid = os.getpid()
        with _lock:
            n = next(_counter)
        name, host_link, ns_link = f"sysgf{pid}-{n}", f"sgh{pid}n{n}"[:15], f"sgn{pid}n{n}"[:15]
        subnet = _free_subnet(pid, n)
        peer, inside = str(subnet[1]), str(subnet[2])
        netns = cls(name=name, host_link=host_link, place=Place(host=inside, peer=peer, netns=name))
        _ip("netns", "add", name)
        _made[name] = netns
        try:
            netns._inode = os.stat(f"/run/netns/{name}").st_ino
            _ip("link", "add", host_link, "type", "veth", "peer", "name", ns_link)
            _ip("link", "set", ns_link, "netns", name)
            _ip("addr", "add", f"{peer}/30", "dev", host_link)
            _ip("link", "set", host_link, "up")
            _ip("-n", name, "addr", "add", f"{inside}/30", "dev", ns_link)
            _ip("-n", name, "link", "set", ns_link, "up")
            _ip("-n", name, "link", "set", "lo", "up")
            routes = _ip("-n", name, "-4", "route", "show").stdout.split("\n")
            others = [r for r in routes if r.strip() and not r.startswith(str(subnet))]
            if others:
                raise RuntimeError(f"namespace {name} has routes beyond its /30: {others}")
        except BaseException:
            netns.delete()
            raise
        return netns

    def pids(self) -> list[int]:
        done = _ip("netns", "pids", self.name, check=False)
        return [int(word) for word in done.stdout.split() if word.isdigit()]

    def delete(self) -> None:
        """Kill what still runs inside (bounded), delete the namespace (and with it the veth pair). Idempotent."""
        if self._deleted:
            return
        self._deleted = True
        try:
            for _ in range(3):  # bounded: SIGKILL cannot be ignored; again only for a late fork
                pids = self.pids()
                if not pids:
                    break
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + KILL_TIMEOUT
                while self.pids() and time.monotonic() < deadline:
                    time.sleep(0.05)
            _ip("netns", "del", self.name, check=False)
            _ip("link", "del", self.host_link, check=False)  # gone with the namespace; this is for a half-made one
            self._kill_late_joiners()
        finally:
            _made.pop(self.name, None)

    def _kill_late_joiners(self) -> None:
        """A process that was entering the namespace (`ip netns exec` opened it, setns() not yet done) when its
        processes were listed joins it afterwards and would outlive it: found by the namespace's inode in
        /proc/PID/ns/net and killed, in a few bounded rounds (nothing new can join once the name is deleted)."""
        if self._inode is None:
            return
        for _ in range(LATE_JOIN_ROUNDS):  # bounded
            late = _pids_in_namespace(self._inode)
            for pid in late:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def exists(self) -> bool:
        return self.name in _ip("netns", "list").stdout.split() or bool(
            _ip("link", "show", self.host_link, check=False).returncode == 0)

    def __enter__(self) -> Netns:
        return self

    def __exit__(self, *exc: object) -> None:
        self.delete()


def _pids_in_namespace(inode: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry.name}/ns/net").st_ino == inode:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _free_subnet(pid: int, n: int) -> ipaddress.IPv4Network:
    used = _used_networks()
    for attempt in range(64):  # bounded
        index = (pid * 64 + n + attempt * 7919) % SUBNETS
        subnet = ipaddress.ip_network(f"{RANGE[index * 4]}/30")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("no free /30 in 198.18.0.0/15 for a test namespace")


_STALE = re.compile(r"^sysgf(\d+)-\d+$")


def _sweep_stale() -> None:
    """Namespaces of our test processes that died without their atexit hook (SIGKILL): their processes are
    killed and the namespace deleted (its veth pair goes with it). Only our own prefix, only dead owners."""
    listed = _ip("netns", "list", check=False).stdout.split("\n")
    for name in (line.split()[0] for line in listed if line.strip()):
        owner = _STALE.match(name)
        if owner is None or _alive(int(owner.group(1))):
            continue
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        for word in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(word), signal.SIGKILL)
        _ip("netns", "del", name, check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@atexit.register
def _delete_all() -> None:
    """Safety net: no namespace made by this process outlives it."""
    for netns in list(_made.values()):
        try:
            netns.delete()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass
