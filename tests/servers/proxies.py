"""Real proxies as loopback test fixtures: Squid, Dante, microsocks, tinyproxy, Apache (mod_proxy), nginx, Privoxy
and HAProxy, side by side.

    inst = start_squid(tmp_path, "open")
    try:
        ...  # talk HTTP proxy to 127.0.0.1:inst.port
    finally:
        inst.stop()

Each instance lives in its own folder under `base` (`base/NAME-N/`: config, captured stdout/stderr, logs), listens
on a free port of 127.0.0.1 only, and runs in the foreground as a child of this process (its own session, so
stop() can reach its whole process group). Kinds and what they answer are described on each start_* function.

With `place=` (servers/netns.py) an instance runs in a network namespace the test made: it listens on and
connects from place.host, the daemon is started through `ip netns exec`, and the namespace, which routes nowhere
but its own /30, is the fence (Squid's dst rule, Apache's `<ProxyMatch>`, nginx's Host check and Privoxy's fence
actions are left out there, Dante is open to `0.0.0.0/0` as its guide shows an open server, tinyproxy's Filter lets
through place.peer alone). `restart()` starts a stopped daemon again on
the same port with its (edited) configuration file, as `systemctl restart` would.

Network fences on loopback (nothing may leave loopback):
- every proxy binds its outgoing connections to 127.0.0.1 and is told to allow only 127.0.0.1 destinations where
  it can be told (Squid: `acl to_loopback dst 127.0.0.1/32` + `http_access deny !to_loopback` first; Dante:
  `socks pass ... to: 127.0.0.1/32` then `socks block` for the rest; tinyproxy: `Filter` + `FilterDefaultDeny
  Yes`). `fence="127.0.0.0/8"` widens that to all of loopback. With the default, the tests prove each fence
  with 127.0.0.2 (loopback, where nothing listens) without ever asking for a non-loopback address.
  microsocks has no such option: the tests only ever ask it for loopback.
- a hostname destination makes Dante and microsocks ask the system resolver (here a non-loopback server);
  tinyproxy's Filter refuses hostnames before resolving them, and Squid's dst check resolves through 127.0.0.1.
  Where mount namespaces are allowed (root, CAP_SYS_ADMIN) every proxy runs under `unshare --mount` with private
  bind-mounted /etc/resolv.conf (`nameserver 127.0.0.1`), /etc/hosts (`127.0.0.1 localhost`) and an nsswitch.conf
  whose hosts line is `files dns`: a name lookup can then only ever go to 127.0.0.1:53 (`ProxyInstance.dns_fenced`
  says whether this was possible; Squid's own resolver is pointed at 127.0.0.1 anyway).

Where files live: pytest's folders are 0700 root, and the daemons drop to an unprivileged user (Squid -> proxy,
tinyproxy -> tinyproxy/nobody) before they open some of their files. Squid therefore keeps its pid file, logs and
coredump_dir in a private folder under /tmp (linked from the instance folder as `run`; the logs are copied back
and the folder removed by stop()); tinyproxy logs to stdout (captured in the instance folder) instead of a
LogFile, which it would open only after dropping privileges. Dante opens its logoutput as root.
"""

from __future__ import annotations

import functools
import grp
import ipaddress
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Literal, Sequence

from ports import free_port
from servers.netns import LOOPBACK_PLACE, Place
from servers.processes import StopAtExit, accepts, group_pids, kill_group, socket_inodes, wait_until

LOOPBACK = "127.0.0.1"
SQUID = "/usr/sbin/squid"
DANTED = "/usr/sbin/danted"
MICROSOCKS = "/usr/bin/microsocks"
TINYPROXY = "/usr/bin/tinyproxy"
APACHE = "/usr/sbin/apache2"
NGINX = "/usr/sbin/nginx"
PRIVOXY = "/usr/sbin/privoxy"
HAPROXY = "/usr/sbin/haproxy"
UNSHARE = "/usr/bin/unshare"
PACKAGES = {SQUID: "squid", DANTED: "dante-server", MICROSOCKS: "microsocks", TINYPROXY: "tinyproxy",
            APACHE: "apache2", NGINX: "nginx-light", PRIVOXY: "privoxy", HAPROXY: "haproxy"}
APACHE_MODULES = "/usr/lib/apache2/modules"
PRIVOXY_STOCK = Path("/etc/privoxy")  # Debian's stock action and filter files, and the templates
RUN_ROOT = "/tmp"  # world-searchable: see the module docstring on why Squid's files live here

START_TIMEOUT = 15.0  # seconds until the instance must listen
STOP_TIMEOUT = 10.0  # seconds for the process to go after its stop signal, before SIGKILL
KILL_TIMEOUT = 5.0  # seconds for the process group to go after SIGKILL
PORT_ATTEMPTS = 3  # a free port chosen here may be taken before the daemon binds it: re-chosen this often

# Destinations a proxy may reach. The default, 127.0.0.1 alone, lets tests prove each fence with 127.0.0.2;
# "127.0.0.0/8" is there for a test that needs other loopback addresses.
Fence = Literal["127.0.0.1/32", "127.0.0.0/8"]
FENCES = ("127.0.0.1/32", "127.0.0.0/8")
TINYPROXY_FILTERS = {"127.0.0.1/32": r"^127\.0\.0\.1$", "127.0.0.0/8": r"^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$"}

SquidKind = Literal["open", "closed", "ssl_only"]
TinyproxyKind = Literal["open", "restricted"]
DanteKind = Literal["open", "closed"]
ApacheKind = Literal["open", "stock_connect", "restricted", "reverse"]
NginxKind = Literal["forward", "site"]
PrivoxyKind = Literal["open", "restricted"]
SQUID_KINDS = ("open", "closed", "ssl_only")
TINYPROXY_KINDS = ("open", "restricted")
DANTE_KINDS = ("open", "closed")
APACHE_KINDS = ("open", "stock_connect", "restricted", "reverse")
NGINX_KINDS = ("forward", "site")
PRIVOXY_KINDS = ("open", "restricted")
FOREIGN_NETWORK = "198.51.100.0/24"  # TEST-NET-2: the only clients the closed/restricted kinds accept

# Debian 12's stock squid.conf port lists (used by the ssl_only kind)
STOCK_SSL_PORTS = (443,)
STOCK_SAFE_PORTS = ("80", "21", "443", "70", "210", "1025-65535", "280", "488", "591", "777")


class ProxyUnavailable(RuntimeError):
    """The proxy cannot run here (binary missing, not root, user missing). The calling test decides skip/fail."""


class ProxyStartError(RuntimeError):
    """The proxy is installed but this instance did not come up; the message carries its output and log tail."""


class ProxyStopError(RuntimeError):
    """stop() could not free the instance's port or end its processes."""


_running = StopAtExit()  # stopped at exit if still running


@dataclass(eq=False)
class ProxyInstance:
    name: str  # e.g. "squid-open"
    port: int  # listening port on 127.0.0.1
    directory: Path
    config_file: Path | None = None
    log_files: list[Path] = field(default_factory=list)  # read by log(), in this order
    output_file: Path | None = None  # the process's stdout+stderr
    dns_fenced: bool = False  # runs with a private resolv.conf/hosts (see the module docstring)
    start_seconds: float = 0.0  # from Popen to listening
    stop_seconds: float | None = None  # set by the first stop()
    run_dir: Path | None = None  # a private folder in /tmp (Squid, Apache, nginx, Privoxy; removed by stop())
    stop_signal: int = signal.SIGTERM
    own_pid_namespace: bool = False  # the daemon is init of its own PID namespace (Dante: see start_dante)
    host: str = LOOPBACK  # where it listens: place.host
    place: Place = LOOPBACK_PLACE  # loopback, or a network namespace (servers/netns.py)
    argv: list[str] = field(default_factory=list, repr=False)  # the daemon's command, before wrapping (restart)
    extra: dict = field(default_factory=dict, repr=False)  # what _launch was given besides (restart)
    _process: subprocess.Popen | None = field(default=None, repr=False)
    _out: object | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _t0: float = field(default=0.0, repr=False)  # time.monotonic() at Popen

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def pids(self) -> list[int]:
        """Live (not zombie) processes of this instance: its process group."""
        if self._process is None:
            return []
        return group_pids(self._process.pid)

    def sockets(self) -> list[tuple[str, str, int, str]]:
        """(proto, local address, local port, state) of every TCP/UDP socket the instance's processes hold."""
        return _sockets_of(self.pids())

    def log(self) -> str:
        """The instance's logs (access/cache log, daemon log) and its captured stdout/stderr, for debugging."""
        parts = []
        for path in [*self.log_files, *([self.output_file] if self.output_file else [])]:
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            parts.append(f"==> {path.name} <==\n{text}")
        return "\n".join(parts)

    def stop(self, *, keep_run_dir: bool = False) -> None:
        """Stop the instance: stop signal, bounded wait, then SIGKILL to its process group; idempotent.
        `keep_run_dir` (restart()) leaves the private run folder in place for the instance that follows."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            started = time.monotonic()
            try:
                self._stop()
            finally:
                self.stop_seconds = time.monotonic() - started
                _running.discard(self)
                self._finish_files(keep_run_dir)
            self._check_port_free()

    def _stop(self) -> None:
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            try:
                if self.own_pid_namespace:
                    # `unshare --fork` blocks SIGTERM in itself: signal the daemon, its child (or the whole group)
                    daemons = _children(process.pid)
                    if daemons:
                        for pid in daemons:
                            os.kill(pid, self.stop_signal)
                    else:
                        os.killpg(process.pid, self.stop_signal)
                else:
                    process.send_signal(self.stop_signal)
            except ProcessLookupError:
                pass
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        kill_group(process, timeout=KILL_TIMEOUT)  # the process itself if it hung, and children it left

    def _finish_files(self, keep_run_dir: bool = False) -> None:
        if self._out is not None:
            self._out.close()  # type: ignore[attr-defined]
            self._out = None
        run = None if keep_run_dir else self.run_dir
        if run is not None and run.parent == Path(RUN_ROOT) and run.is_dir():
            for path in self.log_files:
                if path.parent == run and path.is_file():
                    shutil.copyfile(path, self.directory / path.name)
            shutil.rmtree(run, ignore_errors=True)
            link = self.directory / "run"
            if link.is_symlink():
                link.unlink()
            self.log_files = [self.directory / p.name for p in self.log_files]

    def _check_port_free(self) -> None:
        leftovers = self.pids()
        if self.place.namespaced:  # the host's /proc/net does not show the namespace's sockets: ask the port
            listening = wait_until(lambda: not accepts(self.host, self.port), seconds=KILL_TIMEOUT)
        else:
            listening = wait_until(lambda: not _listening_on(self.port), seconds=KILL_TIMEOUT)
        if leftovers or not listening:
            raise ProxyStopError(f"{self.name} on {self.host}:{self.port}: still running after stop() "
                                 f"(pids {leftovers}, port listening: {not listening})")

    def __enter__(self) -> "ProxyInstance":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- availability ---------------------------------------------------------------------------------------------

_NEEDS_ROOT = {SQUID: "Squid drops to the proxy user", DANTED: "Dante drops to nobody",
               TINYPROXY: "tinyproxy drops to its own user", APACHE: "Apache's children run as www-data",
               NGINX: "nginx's workers run as www-data", PRIVOXY: "Privoxy drops to the privoxy user",
               HAPROXY: "HAProxy drops to the haproxy user"}


def available(binary: str) -> None:
    """Raise ProxyUnavailable (with the package to install) unless `binary` can be run as a fixture here.

    `binary` is a path (/usr/sbin/squid) or a short name: squid, danted (or dante), microsocks, tinyproxy.
    """
    path = resolve_binary(binary)
    package = PACKAGES.get(path, "?")
    if not os.access(path, os.X_OK):
        raise ProxyUnavailable(f"{path} is missing: install the Debian package {package}")
    if path in _NEEDS_ROOT and os.geteuid() != 0:
        raise ProxyUnavailable(f"{path} fixtures need root ({_NEEDS_ROOT[path]})")
    users = {SQUID: ["proxy"], DANTED: ["nobody"], TINYPROXY: [], APACHE: ["www-data"], NGINX: ["www-data"],
             PRIVOXY: ["privoxy"], HAPROXY: ["haproxy"]}.get(path, [])
    for user in users:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise ProxyUnavailable(f"{path} needs the user {user!r}, which is missing") from None
    if path == TINYPROXY:
        _tinyproxy_user()  # raises when neither tinyproxy nor nobody/nogroup exist


def resolve_binary(binary: str) -> str:
    """The full path for a short name (squid, danted/dante, microsocks, tinyproxy, apache2/apache, nginx, privoxy,
    haproxy); a path is returned as is."""
    names = {"squid": SQUID, "danted": DANTED, "dante": DANTED, "dante-server": DANTED, "microsocks": MICROSOCKS,
             "tinyproxy": TINYPROXY, "apache2": APACHE, "apache": APACHE, "nginx": NGINX, "privoxy": PRIVOXY,
             "haproxy": HAPROXY}
    return names.get(binary, binary)


def _tinyproxy_user() -> tuple[str, str]:
    for user, group in (("tinyproxy", "tinyproxy"), ("nobody", "nogroup")):
        try:
            pwd.getpwnam(user)
            grp.getgrnam(group)
            return user, group
        except KeyError:
            continue
    raise ProxyUnavailable("tinyproxy needs the tinyproxy user (or nobody/nogroup)")


# --- configurations -------------------------------------------------------------------------------------------

def _check_fence(fence: str) -> None:
    if fence not in FENCES:
        raise ValueError(f"fence must be one of {FENCES}, not {fence!r}")


def squid_config(kind: SquidKind, *, port: int, run_dir: Path, ssl_ports: Iterable[int] = (),
                 fence: Fence = "127.0.0.1/32", place: Place = LOOPBACK_PLACE) -> str:
    """squid.conf for one instance: private files in run_dir, fenced to `fence` destinations (in a network
    namespace, the namespace is the fence: it routes nowhere but its /30, so the dst rule is left out there)."""
    _check_fence(fence)
    lines = [
        "# Generated by tests/servers/proxies.py: a private instance",
        f"http_port {place.host}:{port}",
        f"pid_filename {run_dir}/squid.pid",
        f"access_log stdio:{run_dir}/access.log",
        f"cache_log {run_dir}/cache.log",
        "cache_store_log none",
        f"coredump_dir {run_dir}",
        "cache deny all",
        "pinger_enable off",
        "shutdown_lifetime 1 seconds",
        "visible_hostname squid-test.invalid",
        "netdb_filename none",
        # the fence: Squid's own resolver asks 127.0.0.1 only (IP-literal destinations need none), every
        # connection leaves from 127.0.0.1, and only `fence` destinations pass the first http_access rule
        # (a hostname is resolved through 127.0.0.1 for this dst check, and denied if that fails)
        f"dns_nameservers {LOOPBACK}",
        f"tcp_outgoing_address {place.host}",
        f"udp_outgoing_address {place.host}",
    ]
    if not place.namespaced:
        lines += [f"acl to_loopback dst {fence}", "http_access deny !to_loopback"]
    if kind == "open":
        # no `deny !Safe_ports` and no `deny CONNECT !SSL_ports`: GET/POST and CONNECT to every port
        lines += ["http_access allow all"]
    elif kind == "closed":
        lines += [
            f"acl foreign_clients src {FOREIGN_NETWORK}",
            "acl loopback_clients src 127.0.0.0/8",
            "http_access deny loopback_clients",
            "http_access allow foreign_clients",
            "http_access deny all",
        ]
    elif kind == "ssl_only":
        extra = [str(int(p)) for p in ssl_ports]
        lines += [
            # Debian 12's stock rules; SSL_ports also lists the test's TLS canary port(s)
            "acl SSL_ports port " + " ".join([*map(str, STOCK_SSL_PORTS), *extra]),
            "acl Safe_ports port " + " ".join(STOCK_SAFE_PORTS),
            "acl CONNECT method CONNECT",
            "http_access deny !Safe_ports",
            "http_access deny CONNECT !SSL_ports",
            "http_access allow all",
        ]
    else:
        raise ValueError(f"squid kind must be one of {SQUID_KINDS}, not {kind!r}")
    return "\n".join(lines) + "\n"


def dante_config(*, port: int, log_file: Path, fence: Fence = "127.0.0.1/32", kind: DanteKind = "open",
                 place: Place = LOOPBACK_PLACE) -> str:
    """danted.conf: SOCKS4/SOCKS5 without authentication, fenced to `fence`. "open": for loopback clients (every
    client the test has). "closed": as an administrator limits it to the LAN, here 198.51.100.0/24 only; a
    loopback client is dropped by the `client block` rule right after it connects (checked by the tests).

    In a network namespace "open" is open as the Dante guide shows an open server (`from: 0.0.0.0/0` in both rule
    lists): the namespace, which routes nowhere but its /30, is the fence there."""
    _check_fence(fence)
    if kind not in DANTE_KINDS:
        raise ValueError(f"dante kind must be one of {DANTE_KINDS}, not {kind!r}")
    if kind == "open":
        clients = "0.0.0.0/0" if place.namespaced else "127.0.0.0/8"
    else:
        clients = FOREIGN_NETWORK
    destinations = "0.0.0.0/0" if place.namespaced else fence
    return f"""\
# Generated by tests/servers/proxies.py: a private instance
logoutput: {log_file}
internal: {place.host} port = {port}
external: {place.host}
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody

client pass {{
    from: {clients} to: 0.0.0.0/0
    log: error connect disconnect
}}
client block {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: connect error
}}

# the fence: CONNECT to {fence} only (tests prove 127.0.0.1/32 with 127.0.0.2 -> reply 02); no BIND, no UDP.
# The rules use IP addresses only: a hostname destination is resolved by Dante to match them (see the module
# docstring on the DNS fence).
socks pass {{
    from: {clients} to: {destinations}
    command: connect
    protocol: tcp
    log: error connect disconnect
}}
socks block {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: connect error
}}
"""


def tinyproxy_config(kind: TinyproxyKind, *, port: int, pid_file: Path, filter_file: Path,
                     place: Place = LOOPBACK_PLACE) -> str:
    """tinyproxy.conf. "open": no Allow line (every client) and no ConnectPort line (CONNECT to every port).

    "restricted": `Allow 198.51.100.0/24` only; a loopback client gets `HTTP/1.0 403 Access denied` whatever
    it asks (checked by tests/servers/test_proxy_fixtures.py).
    The fence (tinyproxy 1.11.1, checked): Filter applies to CONNECT and to IP-literal hosts, matched against
    the host string before any resolution; with FilterDefaultDeny only hosts matching a line pass, and others
    get `HTTP/1.1 403 Filtered`.
    """
    if kind not in TINYPROXY_KINDS:
        raise ValueError(f"tinyproxy kind must be one of {TINYPROXY_KINDS}, not {kind!r}")
    user, group = _tinyproxy_user()
    lines = [
        "# Generated by tests/servers/proxies.py: a private loopback instance",
        f"User {user}",
        f"Group {group}",
        f"Port {port}",
        f"Listen {place.host}",
        f"Bind {place.host}",
        # written as root before dropping privileges; at exit tinyproxy (unprivileged by then) logs that it
        # cannot remove it when a parent folder is 0700 (pytest's): harmless
        f'PidFile "{pid_file}"',
        # no LogFile: tinyproxy opens it only after dropping privileges, and pytest's folders are 0700;
        # in the foreground (-d) without LogFile it logs to stdout, captured in tinyproxy.log
        "LogLevel Info",
        "MaxClients 20",
        "Timeout 30",
        'ViaProxyName "tinyproxy"',  # as Debian's stock file (else the machine's hostname)
    ]
    lines += [f'Filter "{filter_file}"', "FilterType ere", "FilterDefaultDeny Yes"]
    if kind == "restricted":
        lines += [f"Allow {FOREIGN_NETWORK}"]
    return "\n".join(lines) + "\n"


# --- Apache, nginx, Privoxy, HAProxy: web servers and proxies as administrators write them --------------------
# Their unprivileged processes (www-data, privoxy) open files after start-up, so like Squid each keeps its files in a
# private folder under /tmp (`run`, copied back and removed by stop()). Their destination fence is 127.0.0.1 only
# (no `fence` parameter): the tests prove it with 127.0.0.2.

APACHE_FENCE = r"^(?!(http://)?127\.0\.0\.1[:/])"  # every proxied URL (CONNECT: host:port) but 127.0.0.1's
NGINX_FENCE = r"^127\.0\.0\.1(:[0-9]+)?$"  # the Host header the classic forward proxy dials
# In a network namespace, the application a fixed `proxy_pass` is meant to serve: a server block of the same nginx
# on the namespace's own loopback (which no other namespace shares, so the port is fixed)
NGINX_APP = "127.0.0.1:8081"
UNUSED_BACKEND = 9  # a reverse proxy's application port when the test gives none: nothing listens on it
PRIVOXY_FENCE_ACTION = """\
# Generated by tests/servers/proxies.py: the test fence, every destination but 127.0.0.1 is blocked (403)
{+block{outside the test fence: only 127.0.0.1 may be reached}}
/
{-block}
127.0.0.1
"""


def apache_config(kind: ApacheKind, *, port: int, run_dir: Path, backend_port: int = UNUSED_BACKEND,
                  place: Place = LOOPBACK_PLACE) -> str:
    """A private Apache 2.4 with mod_proxy, mod_proxy_http and mod_proxy_connect, children as www-data.

    - "open": the forward proxy the mod_proxy manual warns about, `ProxyRequests On` with `<Proxy "*"> Require all
      granted`, and `AllowCONNECT 25 443 563 1025-65535` (CONNECT to mail and TLS ports; our loopback canaries
      listen on ephemeral ports and stand in for 25 and 443).
    - "stock_connect": the same without AllowCONNECT, so CONNECT only to mod_proxy_connect's default 443 and 563.
    - "restricted": `ProxyRequests On`, but `<Proxy "*"> Require ip 198.51.100.0/24` (a foreign network).
    - "reverse": `ProxyRequests Off` and `ProxyPass "/app/"` to a fixed backend: a reverse proxy, not open.
    Every kind denies proxied URLs to anything but 127.0.0.1 (a `<ProxyMatch>` after the `<Proxy>` section). In a
    network namespace (place) it listens on place.host and that fence is left out: "open" is then the open proxy
    of the Apache guide, for every client and destination, and the namespace, which routes nowhere but its /30, is
    the fence.
    """
    if kind not in APACHE_KINDS:
        raise ValueError(f"apache kind must be one of {APACHE_KINDS}, not {kind!r}")
    lines = [
        "# Generated by tests/servers/proxies.py: a private loopback instance",
        f"ServerRoot {run_dir}",
        "ServerName apache-test.invalid",
        f"Listen {place.host}:{port}",
        f"PidFile {run_dir}/httpd.pid",
        f"DefaultRuntimeDir {run_dir}",
        f"ErrorLog {run_dir}/error.log",
        "LogLevel info proxy:debug proxy_connect:debug",
        *(f"LoadModule {m}_module {APACHE_MODULES}/mod_{m}.so"
          for m in ("mpm_event", "authz_core", "authz_host", "proxy", "proxy_http", "proxy_connect")),
        'LogFormat "%h %l %u %t \\"%r\\" %>s %b" common',
        f"CustomLog {run_dir}/access.log common",
        "User www-data",
        "Group www-data",
        f"DocumentRoot {run_dir}/htdocs",
        "StartServers 1",
        "ServerLimit 1",
        "ThreadsPerChild 25",
        "MaxRequestWorkers 25",
    ]
    if kind == "reverse":
        lines += ["ProxyRequests Off",
                  f'ProxyPass "/app/" "http://{LOOPBACK}:{backend_port}/"',
                  f'ProxyPassReverse "/app/" "http://{LOOPBACK}:{backend_port}/"']
    else:
        lines += ["ProxyRequests On"]
        if kind != "stock_connect":
            lines += ["AllowCONNECT 25 443 563 1025-65535"]
        require = "ip " + FOREIGN_NETWORK if kind == "restricted" else "all granted"
        lines += ['<Proxy "*">', f"    Require {require}", "</Proxy>"]
    if not place.namespaced:
        lines += ["# the test fence", f'<ProxyMatch "{APACHE_FENCE}">', "    Require all denied", "</ProxyMatch>"]
    return "\n".join(lines) + "\n"


def nginx_config(kind: NginxKind, *, port: int, run_dir: Path, backend_port: int = UNUSED_BACKEND,
                 place: Place = LOOPBACK_PLACE) -> str:
    """A private nginx (master as root, one worker as www-data, `daemon off`).

    - "forward": the classic misconfigured forward proxy, `resolver` + `proxy_pass $scheme://$http_host$request_uri`
      (found in tutorials and in the wild): any Host is fetched for anyone. nginx has no CONNECT (400).
    - "site": a normal site (a static root) with a reverse proxy to a fixed backend under /app/: not open.
    The fence: "forward" answers 403 unless the Host header is 127.0.0.1[:port]; outgoing connections leave from
    127.0.0.1 (`proxy_bind`).
    In a network namespace (place) "forward" listens on place.host, its resolver is the namespace's own loopback
    (where nothing answers: our canaries are IP addresses), and the Host fence is left out: the namespace, which
    routes nowhere but its /30, is the fence. A second server block there, on NGINX_APP, is the application that a
    reverse proxy serves: the nginx guide's Fix points `proxy_pass` at such a server.
    """
    if kind not in NGINX_KINDS:
        raise ValueError(f"nginx kind must be one of {NGINX_KINDS}, not {kind!r}")
    temp = "\n".join(f"    {what}_temp_path {run_dir}/tmp/{what};"
                     for what in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    if kind == "forward" and place.namespaced:
        server = f"""\
    server {{
        listen {place.host}:{port};
        resolver {LOOPBACK};
        proxy_bind {place.host};
        location / {{
            proxy_pass $scheme://$http_host$request_uri;
        }}
    }}
    server {{
        listen {NGINX_APP};
        location / {{
            return 200 "the application behind this nginx\\n";
        }}
    }}"""
    elif kind == "forward":
        server = f"""\
    server {{
        listen {LOOPBACK}:{port};
        resolver {LOOPBACK};
        proxy_bind {LOOPBACK};
        if ($http_host !~ "{NGINX_FENCE}") {{ return 403; }}  # the test fence
        location / {{
            proxy_pass $scheme://$http_host$request_uri;
        }}
    }}"""
    else:
        server = f"""\
    server {{
        listen {place.host}:{port} default_server;
        server_name www.example.test;
        root {run_dir}/site;
        index index.html;
        location / {{
            try_files $uri $uri/ =404;
        }}
        location /app/ {{
            proxy_pass http://{LOOPBACK}:{backend_port}/;
            proxy_bind {LOOPBACK};
        }}
    }}"""
    return f"""\
# Generated by tests/servers/proxies.py: a private loopback instance
user www-data;
worker_processes 1;
daemon off;
pid {run_dir}/nginx.pid;
error_log {run_dir}/error.log info;
events {{
    worker_connections 64;
}}
http {{
    access_log {run_dir}/access.log;
{temp}
{server}
}}
"""


def privoxy_config(kind: PrivoxyKind, *, port: int, run_dir: Path, place: Place = LOOPBACK_PLACE) -> str:
    """Debian's stock Privoxy 3.0 configuration (its action and filter files, copied into run_dir), with the
    change administrators make to share it: `listen-address` on the network, here 127.0.0.1:port.

    - "open": no `permit-access` line, so every client may use it. The stock files apply no `limit-connect`
      (default.action's `+limit-connect{,}` sits in the `standard.Advanced` block, which matches no real
      host), so Privoxy 3.0.34 tunnels CONNECT to every port (checked by the tests).
    - "restricted": `permit-access 198.51.100.0/24`; Privoxy drops any other client's connection as soon as it is
      accepted ("dropped due to ACL"), before reading a byte.
    The fence: an extra actions file blocks every host but 127.0.0.1 (`403 Request blocked by Privoxy`).
    In the foreground (--no-daemon) Privoxy logs to stderr, captured in privoxy.out.
    In a network namespace (place) it listens on place.host:port, and the fence's actions file is left out: "open"
    is then the open Privoxy of its guide, and the namespace, which routes nowhere but its /30, is the fence.
    """
    if kind not in PRIVOXY_KINDS:
        raise ValueError(f"privoxy kind must be one of {PRIVOXY_KINDS}, not {kind!r}")
    lines = [
        "# Generated by tests/servers/proxies.py: Debian's stock config, listening on 127.0.0.1",
        f"confdir {run_dir}",
        f"templdir {PRIVOXY_STOCK}/templates",
        f"logdir {run_dir}",
        "actionsfile match-all.action",
        "actionsfile default.action",
        "actionsfile user.action",
        *([] if place.namespaced else ["actionsfile fence.action"]),
        "filterfile default.filter",
        "filterfile user.filter",
        "debug 1",  # every request
        "debug 2",  # connections (and the ones permit-access drops)
        "debug 512",  # common log format
        "debug 4096",  # startup banner and warnings
        "debug 8192",  # non-fatal errors
        f"listen-address {place.host}:{port}",
        "toggle 1",
        "enable-remote-toggle 0",
        "enable-remote-http-toggle 0",
        "enable-edit-actions 0",
        "enforce-blocks 0",
        "buffer-limit 4096",
        "enable-proxy-authentication-forwarding 0",
        "forwarded-connect-retries 0",
        "accept-intercepted-requests 0",
        "allow-cgi-request-crunching 0",
        "split-large-forms 0",
        "keep-alive-timeout 5",
        "tolerate-pipelining 1",
        "socket-timeout 300",
    ]
    if kind == "restricted":
        lines += [f"permit-access {FOREIGN_NETWORK}"]
    return "\n".join(lines) + "\n"


def haproxy_config(*, port: int, backend_port: int) -> str:
    """An ordinary HAProxy reverse proxy: `mode http`, one frontend on 127.0.0.1:port, one backend server (a fixed
    local web server). It forwards whatever it gets, absolute-URI GETs and CONNECT included, to that server, never
    to the host the request names: it must never be reported open. Logs go to stdout (captured in haproxy.out)."""
    return f"""\
# Generated by tests/servers/proxies.py: a private loopback instance
global
    log stdout format raw local0 info
    user haproxy
    group haproxy
    maxconn 100

defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend www
    bind {LOOPBACK}:{port}
    default_backend web

backend web
    server web1 {LOOPBACK}:{backend_port}
"""


def _private_run_dir(directory: Path, name: str) -> Path:
    """A fresh world-searchable folder under /tmp (see the module docstring), linked from `directory` as `run`."""
    run = Path(tempfile.mkdtemp(prefix=f"proxy-{name}-", dir=RUN_ROOT))
    os.chmod(run, 0o755)
    link = directory / "run"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(run)
    return run


def _config_check(argv: list[str], run: Path, what: str) -> None:
    """Run a product's own syntax check (apache2 -t, nginx -t, privoxy --config-test, haproxy -c)."""
    try:
        result = subprocess.run(argv, cwd=run, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(run, ignore_errors=True)
        raise ProxyStartError(f"{what}: {' '.join(argv)} did not finish in 30 s") from exc
    if result.returncode != 0:
        shutil.rmtree(run, ignore_errors=True)
        raise ProxyStartError(f"{what}: {' '.join(argv)} failed (exit {result.returncode}):\n"
                              f"{_tail(result.stdout + result.stderr)}")


# --- starting -------------------------------------------------------------------------------------------------

def start_squid(base: Path, kind: SquidKind, ssl_ports: Sequence[int] = (), *, fence: Fence = "127.0.0.1/32",
                timeout: float = START_TIMEOUT, place: Place = LOOPBACK_PLACE) -> ProxyInstance:
    """A private Squid 5 (`squid -N`, foreground) on 127.0.0.1 (or on place.host in place's network namespace).

    - "open": every client, GET/POST and CONNECT to any (loopback) port.
    - "closed": only 198.51.100.0/24 clients; loopback clients are denied explicitly, so everything from here
      gets `HTTP/1.1 403 Forbidden` with `X-Squid-Error: ERR_ACCESS_DENIED 0`.
    - "ssl_only": Debian's stock rules (deny !Safe_ports, deny CONNECT !SSL_ports, then allow all); SSL_ports is
      443 plus `ssl_ports`, so CONNECT works to those and gets 403 to every other port. GET to ports 80, 443
      and 1025-65535 (Safe_ports) passes.
    `ssl_ports` is ignored by the other kinds. Every kind denies destinations outside `fence` first (403).
    """
    if kind not in SQUID_KINDS:
        raise ValueError(f"squid kind must be one of {SQUID_KINDS}, not {kind!r}")
    _check_fence(fence)
    available(SQUID)
    name = f"squid-{kind}"

    def prepare(directory: Path, port: int) -> tuple[list[str], dict]:
        run = Path(tempfile.mkdtemp(prefix=f"proxy-{name}-", dir=RUN_ROOT))
        os.chmod(run, 0o750)
        shutil.chown(run, "proxy", "proxy")
        link = directory / "run"
        if link.is_symlink():
            link.unlink()
        link.symlink_to(run)
        conf = directory / "squid.conf"
        conf.write_text(squid_config(kind, port=port, run_dir=run, ssl_ports=ssl_ports, fence=fence, place=place))
        _squid_parse(conf, run)
        return ([SQUID, "-N", "-f", str(conf)],
                {"config_file": conf, "run_dir": run, "log_files": [run / "access.log", run / "cache.log"],
                 # SIGINT: Squid shuts down without waiting shutdown_lifetime for open connections
                 "stop_signal": signal.SIGINT})

    return _start(base, name, prepare, timeout=timeout, place=place)


def _squid_parse(conf: Path, run: Path) -> None:
    try:
        result = subprocess.run([SQUID, "-k", "parse", "-f", str(conf)], cwd=run, stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        shutil.rmtree(run, ignore_errors=True)
        raise ProxyStartError(f"squid -k parse -f {conf} did not finish in 30 s") from exc
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if "ERROR" in line or "FATAL" in line]
    if result.returncode != 0 or problems:
        shutil.rmtree(run, ignore_errors=True)
        if (conf.parent / "run").is_symlink():
            (conf.parent / "run").unlink()
        raise ProxyStartError(f"squid -k parse -f {conf} failed (exit {result.returncode}):\n{_tail(output)}")


def start_dante(base: Path, kind: DanteKind = "open", *, fence: Fence = "127.0.0.1/32",
                timeout: float = START_TIMEOUT, place: Place = LOOPBACK_PLACE) -> ProxyInstance:
    """A private Dante (`danted -f FILE -p PIDFILE`, foreground): SOCKS4 and SOCKS5, no authentication; CONNECT
    only, to `fence` only (anything else: SOCKS5 reply 02 / SOCKS4 5b). "open" serves loopback clients (every
    client, in a namespace); "closed" serves 198.51.100.0/24 only (see dante_config).

    Dante's mother process exits on SIGTERM without reaping the ~20 children it forks, so they would linger as
    zombies of PID 1 (for seconds here; for ever where PID 1 does not reap). Where PID namespaces are allowed it
    therefore runs as init of its own (`unshare --pid --fork --kill-child`): when it exits the kernel kills and
    reaps everything in that namespace. Its pid file then says 1.
    """
    if kind not in DANTE_KINDS:
        raise ValueError(f"dante kind must be one of {DANTE_KINDS}, not {kind!r}")
    available(DANTED)
    _check_fence(fence)
    name = "dante" if kind == "open" else f"dante-{kind}"

    def prepare(directory: Path, port: int) -> tuple[list[str], dict]:
        conf, log_file = directory / "danted.conf", directory / "danted.log"
        conf.write_text(dante_config(port=port, log_file=log_file, fence=fence, kind=kind, place=place))
        return ([DANTED, "-f", str(conf), "-p", str(directory / "danted.pid")],
                {"config_file": conf, "log_files": [log_file], "own_pid_namespace": _pid_namespace_possible()})

    return _start(base, name, prepare, timeout=timeout, place=place)


def start_microsocks(base: Path, user: str | None = None, password: str | None = None, *,
                     timeout: float = START_TIMEOUT, place: Place = LOOPBACK_PLACE) -> ProxyInstance:
    """microsocks (SOCKS5 only) on 127.0.0.1, outgoing from 127.0.0.1. With user/password it requires
    username/password auth (a no-auth greeting gets `05 ff`); without, it is open. It answers any SOCKS4
    request with `05 ff`. It has no destination fence: tests only ask it for loopback."""
    available(MICROSOCKS)
    if (user is None) != (password is None):
        raise ValueError("give both user and password, or neither")
    name = "microsocks-auth" if user is not None else "microsocks-open"

    def prepare(directory: Path, port: int) -> tuple[list[str], dict]:
        argv = [MICROSOCKS, "-i", place.host, "-p", str(port), "-b", place.host]
        if user is not None:
            argv += ["-u", user, "-P", str(password)]
        return argv, {}

    return _start(base, name, prepare, timeout=timeout, place=place)


def start_tinyproxy(base: Path, kind: TinyproxyKind, *, fence: Fence = "127.0.0.1/32",
                    timeout: float = START_TIMEOUT, place: Place = LOOPBACK_PLACE) -> ProxyInstance:
    """tinyproxy 1.11 (`tinyproxy -d -c FILE`, foreground) on 127.0.0.1. See tinyproxy_config for the kinds;
    destinations outside `fence` get `HTTP/1.1 403 Filtered`. In place's network namespace it listens on
    place.host, and the filter lets through place.peer (where our canaries are) alone."""
    if kind not in TINYPROXY_KINDS:
        raise ValueError(f"tinyproxy kind must be one of {TINYPROXY_KINDS}, not {kind!r}")
    _check_fence(fence)
    available(TINYPROXY)
    name = f"tinyproxy-{kind}"

    def prepare(directory: Path, port: int) -> tuple[list[str], dict]:
        filter_file = directory / "filter"
        pattern = "^" + place.peer.replace(".", r"\.") + "$" if place.namespaced else TINYPROXY_FILTERS[fence]
        filter_file.write_text(pattern + "\n")
        filter_file.chmod(0o644)
        conf = directory / "tinyproxy.conf"
        conf.write_text(tinyproxy_config(kind, port=port, pid_file=directory / "tinyproxy.pid",
                                         filter_file=filter_file, place=place))
        return [TINYPROXY, "-d", "-c", str(conf)], {"config_file": conf}

    return _start(base, name, prepare, timeout=timeout, place=place)


def start_apache(base: Path, kind: ApacheKind, *, backend_port: int = UNUSED_BACKEND,
                 timeout: float = START_TIMEOUT, place: Place = LOOPBACK_PLACE) -> ProxyInstance:
    """A private Apache 2.4 (`apache2 -f FILE -DFOREGROUND`) on 127.0.0.1 (or on place.host in place's network
    namespace); see apache_config for the kinds.
    The config is checked with `apache2 -t` first. Logs: access.log (the request and status) and error.log
    (mod_proxy's debug lines: where it connected, or why it refused)."""
    if kind not in APACHE_KINDS:
        raise ValueError(f"apache kind must be one of {APACHE_KINDS}, not {kind!r}")
    available(APACHE)
    name = f"apache-{kind}"

    def prepare(directory: Path, port: int) -> tuple[list[str], dict]:
        run = _private_run_dir(directory, name)
        (run / "htdocs").mkdir(mode=0o755)
        (run / "htdocs" / "index.html").write_text("<h1>It works</h1>\n")
        conf = directory / "apache2.conf"
        conf.write_text(apache_config(kind, port=port, run_dir=run, backend_port=backend_port, place=place))
        _config_check(place.wrap([APACHE, "-t", "-f", str(conf)]), run, name)
        return ([APACHE, "-f", str(conf), "-DFOREGROUND"],
                {"config_file": conf, "run_dir": run, "log_files": [run / "access.log", run / "error.log"]})

    return _start(base, name, prepare, timeout=timeout, place=place)


def start_nginx(base: Path, kind: NginxKind, *, backend_port: int = UNUSED_BACKEND,
                timeout: float = START_TIMEOUT, place: Place = LOOPBACK_PLACE) -> ProxyInstance:
    """A private nginx (`nginx -c FILE`, `daemon off`) on 127.0.0.1 (or on place.host in place's network
    namespace); see nginx_config for the kinds. Checked with
    `nginx -t` first. SIGQUIT stops it (graceful: the worker finishes its requests, then the master exits)."""
    if kind not in NGINX_KINDS:
        raise ValueError(f"nginx kind must be one of {NGINX_KINDS}, not {kind!r}")
    available(NGINX)
    name = f"nginx-{kind}"

    def prepare(directory: Path, port: int) -> tuple[list[str], dict]:
        run = _private_run_dir(directory, name)
        (run / "tmp").mkdir(mode=0o700)
        shutil.chown(run / "tmp", "www-data")
        (run / "site").mkdir(mode=0o755)
        (run / "site" / "index.html").write_text("<h1>Welcome to www.example.test</h1>\n")
        conf = directory / "nginx.conf"
        conf.write_text(nginx_config(kind, port=port, run_dir=run, backend_port=backend_port, place=place))
        _config_check(place.wrap([NGINX, "-t", "-q", "-c", str(conf), "-p", str(run)]), run, name)  # it binds
        return ([NGINX, "-c", str(conf), "-p", str(run)],
                {"config_file": conf, "run_dir": run, "log_files": [run / "access.log", run / "error.log"],
                 "stop_signal": signal.SIGQUIT})

    return _start(base, name, prepare, timeout=timeout, place=place)


def start_privoxy(base: Path, kind: PrivoxyKind, *, timeout: float = START_TIMEOUT,
                  place: Place = LOOPBACK_PLACE) -> ProxyInstance:
    """A private Privoxy 3.0 (`privoxy --no-daemon --user privoxy FILE`) on 127.0.0.1 (or on place.host in place's
    network namespace); see privoxy_config.
    Checked with `privoxy --config-test` first; its log (requests, the common log format lines, errors such as
    "Invalid server or forwarder response") is its stderr, in privoxy.out."""
    if kind not in PRIVOXY_KINDS:
        raise ValueError(f"privoxy kind must be one of {PRIVOXY_KINDS}, not {kind!r}")
    available(PRIVOXY)
    name = f"privoxy-{kind}"

    def prepare(directory: Path, port: int) -> tuple[list[str], dict]:
        run = _private_run_dir(directory, name)
        for stock in ("match-all.action", "default.action", "user.action", "default.filter", "user.filter"):
            shutil.copyfile(PRIVOXY_STOCK / stock, run / stock)
            (run / stock).chmod(0o644)
        (run / "fence.action").write_text(PRIVOXY_FENCE_ACTION)
        (run / "fence.action").chmod(0o644)
        conf = run / "config"
        conf.write_text(privoxy_config(kind, port=port, run_dir=run, place=place))
        conf.chmod(0o644)
        _config_check(place.wrap([PRIVOXY, "--config-test", str(conf)]), run, name)
        return ([PRIVOXY, "--no-daemon", "--pidfile", str(directory / "privoxy.pid"), "--user", "privoxy",
                 str(conf)], {"config_file": conf, "run_dir": run})

    return _start(base, name, prepare, timeout=timeout, place=place)


def start_haproxy(base: Path, backend_port: int, *, timeout: float = START_TIMEOUT) -> ProxyInstance:
    """A private HAProxy (`haproxy -db -f FILE`, foreground) on 127.0.0.1 in front of the web server on
    127.0.0.1:backend_port (tests use an nginx "site"); see haproxy_config. Checked with `haproxy -c` first."""
    available(HAPROXY)
    name = "haproxy"

    def prepare(directory: Path, port: int) -> tuple[list[str], dict]:
        conf = directory / "haproxy.cfg"
        conf.write_text(haproxy_config(port=port, backend_port=backend_port))
        _config_check([HAPROXY, "-c", "-q", "-f", str(conf)], directory, name)
        return [HAPROXY, "-db", "-f", str(conf)], {"config_file": conf}

    return _start(base, name, prepare, timeout=timeout)


def _start(base: Path, name: str, prepare: Callable[[Path, int], tuple[list[str], dict]], *,
           timeout: float, place: Place = LOOPBACK_PLACE) -> ProxyInstance:
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    directory = _new_directory(base.resolve(), name)
    error: ProxyStartError | None = None
    for _ in range(PORT_ATTEMPTS):  # bounded: a new port only when the chosen one was taken meanwhile
        port = free_port()
        argv, extra = prepare(directory, port)
        instance = _launch(name, directory, port, argv, place=place, **extra)
        try:
            _wait_listening(instance, timeout=timeout)
            return instance
        except ProxyStartError as exc:
            error = exc
            try:
                instance.stop()
            except ProxyStopError:
                pass
            if "in use" not in str(exc):
                raise
    assert error is not None
    raise error


def restart(instance: ProxyInstance, *, timeout: float = START_TIMEOUT) -> ProxyInstance:
    """Stop the instance and start its daemon again with the same command, folder, port and place, as
    `systemctl restart` does: it reads its configuration file anew. Returns the new instance, which takes over the
    private run folder (Apache, nginx, Privoxy: their files stay where they are; the new instance's stop() copies
    the logs back and removes it). Squid re-reads its file on `squid -k reconfigure` instead."""
    try:
        instance.stop(keep_run_dir=True)
        again = _launch(instance.name, instance.directory, instance.port, instance.argv, place=instance.place,
                        **instance.extra)
    except BaseException:
        instance._finish_files()  # nobody took the run folder over: the logs are copied back, the folder removed
        raise
    try:
        _wait_listening(again, timeout=timeout)
    except BaseException:
        try:
            again.stop()
        except ProxyStopError:
            pass
        raise
    return again


def _new_directory(base: Path, name: str) -> Path:
    for n in range(1, 1000):  # bounded
        directory = base / f"{name}-{n}"
        try:
            directory.mkdir(mode=0o755)
            os.chmod(directory, 0o755)
            return directory
        except FileExistsError:
            continue
    raise ProxyStartError(f"no free instance folder for {name} under {base}")


def _launch(name: str, directory: Path, port: int, argv: list[str], *, place: Place = LOOPBACK_PLACE,
            **extra) -> ProxyInstance:
    binary = Path(argv[0]).name
    output_file = directory / f"{binary}.out"
    if binary in ("microsocks", "tinyproxy"):  # their stdout is their log
        output_file = directory / f"{binary}.log"
    out = open(output_file, "ab")
    fence = _dns_fence_files(directory)
    command = argv if fence is None else _fenced(argv, fence)
    if extra.get("own_pid_namespace"):
        namespace = [UNSHARE, "--pid", "--fork", "--kill-child"]
        command = [*namespace, *command[1:]] if command[0] == UNSHARE else [*namespace, "--", *command]
    command = place.wrap(command)
    instance = ProxyInstance(name=name, port=port, directory=directory, output_file=output_file,
                             dns_fenced=fence is not None, host=place.host, place=place, argv=list(argv),
                             extra=dict(extra), **extra)
    instance._out = out
    _running.add(instance)
    t0 = time.monotonic()
    try:
        instance._process = subprocess.Popen(command, cwd=directory, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as exc:
        out.close()
        instance._out = None
        _running.discard(instance)
        raise ProxyStartError(f"{name}: cannot run {argv[0]}: {exc}") from exc
    instance._t0 = t0
    return instance


def _wait_listening(instance: ProxyInstance, *, timeout: float) -> None:
    process = instance._process
    assert process is not None
    t0 = instance._t0
    deadline = t0 + timeout
    for _ in range(int(timeout / 0.02) + 1):  # bounded in count and in time
        if process.poll() is not None:
            raise ProxyStartError(f"{instance.name} on {instance.host}:{instance.port} exited during start-up "
                                  f"(exit {process.returncode}):\n{_tail(instance.log())}")
        # the sockets of the daemon's own network namespace (/proc/PID/net), which may not be ours
        owners = _listening_on(instance.port, netns_of=process.pid if instance.place.namespaced else None)
        if owners:
            mine = socket_inodes(instance.pids())
            if owners & mine:
                instance.start_seconds = time.monotonic() - t0
                return
            # someone else took the port first: the daemon will fail to bind
            raise ProxyStartError(f"{instance.name}: {instance.host}:{instance.port} is in use by another process")
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)
    raise ProxyStartError(f"{instance.name} did not listen on {instance.host}:{instance.port} within {timeout} s:\n"
                          f"{_tail(instance.log())}")


# --- the DNS fence (private resolv.conf/hosts in a mount namespace) ------------------------------------------

FENCE_RESOLV = f"nameserver {LOOPBACK}\noptions timeout:1 attempts:1\n"
FENCE_HOSTS = f"{LOOPBACK} localhost\n"
_FENCE_SCRIPT = ('set -e; mount --bind "$1" /etc/resolv.conf; mount --bind "$2" /etc/hosts; '
                 'if [ -n "$3" ]; then mount --bind "$3" /etc/nsswitch.conf; fi; shift 3; exec "$@"')


def _dns_fence_files(directory: Path) -> tuple[Path, Path, str] | None:
    if not _dns_fence_possible():
        return None
    fence = directory / "fence"
    fence.mkdir(mode=0o755, exist_ok=True)
    resolv, hosts = fence / "resolv.conf", fence / "hosts"
    resolv.write_text(FENCE_RESOLV)
    hosts.write_text(FENCE_HOSTS)
    nsswitch = ""
    system = Path("/etc/nsswitch.conf")
    if system.is_file():
        lines = [line for line in system.read_text().splitlines() if not line.strip().startswith("hosts:")]
        (fence / "nsswitch.conf").write_text("\n".join([*lines, "hosts: files dns"]) + "\n")
        nsswitch = str(fence / "nsswitch.conf")
    for path in fence.iterdir():
        path.chmod(0o644)
    return resolv, hosts, nsswitch


def _fenced(argv: list[str], fence: tuple[Path, Path, str]) -> list[str]:
    resolv, hosts, nsswitch = fence
    return [UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _FENCE_SCRIPT, "fence",
            str(resolv), str(hosts), nsswitch, *argv]


@functools.lru_cache(maxsize=1)
def _pid_namespace_possible() -> bool:
    """Whether `unshare --pid --fork` works here (root with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not os.access(UNSHARE, os.X_OK):
        return False
    try:
        result = subprocess.run([UNSHARE, "--pid", "--fork", "--kill-child", "--", "/bin/sh", "-c", "echo $$"],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0 and result.stdout.strip() == "1"


@functools.lru_cache(maxsize=1)
def _dns_fence_possible() -> bool:
    """Whether `unshare --mount` and bind mounts over /etc files work here (root with CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not os.access(UNSHARE, os.X_OK) or not Path("/etc/resolv.conf").exists():
        return False
    with tempfile.TemporaryDirectory(prefix="proxy-fence-check-") as tmp:
        resolv, hosts = Path(tmp) / "resolv.conf", Path(tmp) / "hosts"
        resolv.write_text(FENCE_RESOLV)
        hosts.write_text(FENCE_HOSTS)
        try:
            result = subprocess.run(
                [UNSHARE, "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _FENCE_SCRIPT, "fence",
                 str(resolv), str(hosts), "", "/bin/cat", "/etc/resolv.conf"],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return result.returncode == 0 and result.stdout == FENCE_RESOLV


# --- /proc helpers ---------------------------------------------------------------------------------------------

def _children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
               "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN",
               "0B": "CLOSING"}


def _proc_net(netns_of: int | None = None) -> list[tuple[str, str, int, str, int]]:
    """(proto, local address, local port, state, inode) of every socket in /proc/net/{tcp,tcp6,udp,udp6}: of our
    network namespace, or of the one process `netns_of` is in (/proc/PID/net)."""
    rows = []
    root = "/proc/net" if netns_of is None else f"/proc/{netns_of}/net"
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"{root}/{proto}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            hex_addr, hex_port = parts[1].split(":")
            raw = bytes.fromhex(hex_addr)
            # the kernel prints each 32-bit word of the address in host byte order
            words = [raw[i:i + 4][::-1] if _little_endian() else raw[i:i + 4] for i in range(0, len(raw), 4)]
            address = str(ipaddress.ip_address(b"".join(words)))
            state = _TCP_STATES.get(parts[3], parts[3]) if proto.startswith("tcp") else "UDP"
            rows.append((proto, address, int(hex_port, 16), state, int(parts[9])))
    return rows


@functools.lru_cache(maxsize=1)
def _little_endian() -> bool:
    import sys

    return sys.byteorder == "little"


def _listening_on(port: int, netns_of: int | None = None) -> set[int]:
    """Inodes of TCP sockets listening on port (any address, IPv4 or IPv6), in our network namespace or in the
    one process `netns_of` is in."""
    return {inode for proto, _, p, state, inode in _proc_net(netns_of)
            if proto.startswith("tcp") and p == port and state == "LISTEN"}


def _sockets_of(pids: Iterable[int]) -> list[tuple[str, str, int, str]]:
    mine = socket_inodes(pids)
    return [(proto, address, port, state) for proto, address, port, state, inode in _proc_net() if inode in mine]


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


# --- several at once -------------------------------------------------------------------------------------------

class ProxySet:
    """Starts proxies under one base folder and stops them all (in parallel) with stop_all().

    on_unavailable, when given, is called with the ProxyUnavailable message instead of raising it (the test
    fixture in conftest.py passes a function that fails under CI and skips otherwise).
    """

    def __init__(self, base: Path, on_unavailable: Callable[[str], None] | None = None) -> None:
        self.base = Path(base)
        self.instances: list[ProxyInstance] = []
        self._on_unavailable = on_unavailable

    def _add(self, start: Callable[..., ProxyInstance], *args, **kwargs) -> ProxyInstance:
        try:
            instance = start(self.base, *args, **kwargs)
        except ProxyUnavailable as exc:
            if self._on_unavailable is None:
                raise
            self._on_unavailable(str(exc))
            raise
        self.instances.append(instance)
        return instance

    def squid(self, kind: SquidKind, ssl_ports: Sequence[int] = (), **kwargs) -> ProxyInstance:
        return self._add(start_squid, kind, ssl_ports, **kwargs)

    def dante(self, kind: DanteKind = "open", **kwargs) -> ProxyInstance:
        return self._add(start_dante, kind, **kwargs)

    def microsocks(self, user: str | None = None, password: str | None = None, **kwargs) -> ProxyInstance:
        return self._add(start_microsocks, user, password, **kwargs)

    def tinyproxy(self, kind: TinyproxyKind, **kwargs) -> ProxyInstance:
        return self._add(start_tinyproxy, kind, **kwargs)

    def apache(self, kind: ApacheKind, **kwargs) -> ProxyInstance:
        return self._add(start_apache, kind, **kwargs)

    def nginx(self, kind: NginxKind, **kwargs) -> ProxyInstance:
        return self._add(start_nginx, kind, **kwargs)

    def privoxy(self, kind: PrivoxyKind, **kwargs) -> ProxyInstance:
        return self._add(start_privoxy, kind, **kwargs)

    def haproxy(self, backend_port: int, **kwargs) -> ProxyInstance:
        return self._add(start_haproxy, backend_port, **kwargs)

    def stop_all(self) -> None:
        """Stop every instance, in parallel (Squid and tinyproxy take about a second each); re-raise the
        first ProxyStopError after all have been tried."""
        errors: list[BaseException] = []

        def stop(instance: ProxyInstance) -> None:
            try:
                instance.stop()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=stop, args=(i,), daemon=True) for i in self.instances]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=3 * STOP_TIMEOUT + 5)
        if errors:
            raise errors[0]

