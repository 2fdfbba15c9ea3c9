"""Debian's redis-server as a loopback test fixture, never the system's service.

    inst = start_redis(password="secret")
    try:
        ...  # redis.Redis.from_url(inst.url): redis://:secret@127.0.0.1:PORT/0
    finally:
        inst.stop()

Each instance runs `redis-server` in the foreground with a configuration file in a private temporary folder
(servers/daemon.py), `bind 127.0.0.1` on a free port, `protected-mode yes`, no unix socket, and no persistence
(`save ""`, `appendonly no`): nothing is written but the configuration and the captured log, and stop() removes
the folder. `requirepass` when a password is given. stop() is SIGTERM, a bounded wait, SIGKILL to its group.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from servers.daemon import LOOPBACK, DaemonInstance, launch, new_directory, wait_ready, with_free_port

BINARY = "/usr/bin/redis-server"
PACKAGE = "redis-server"
START_TIMEOUT = 15.0  # seconds until it must answer PING


class RedisUnavailable(RuntimeError):
    """redis-server is not installed here. The calling test decides skip or fail."""


@dataclass(eq=False)
class RedisInstance(DaemonInstance):
    password: str | None = None

    @property
    def url(self) -> str:
        """redis://:PASSWORD@127.0.0.1:PORT/0 (no credentials without a password)."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        credentials = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{credentials}{LOOPBACK}:{self.port}/{db}"


def redis_available() -> str:
    """The redis-server binary, or RedisUnavailable."""
    found = shutil.which(BINARY)
    if found is None:
        raise RedisUnavailable(f"{BINARY} is missing: install the Debian package {PACKAGE} "
                               "(scripts/install-debian-packages.sh, which make test runs as root)")
    return found


def start_redis(*, password: str | None = None, parent: str | None = None) -> RedisInstance:
    """A new redis-server on a free port of 127.0.0.1, answering PING when this returns. `password`: requirepass
    (letters, digits and punctuation without spaces or quotes). `parent`: where its temporary folder goes."""
    if password is not None and (not password or any(c.isspace() or c in "\"'\\" for c in password)):
        raise ValueError("the password must be non-empty, without spaces, quotes or backslashes")
    binary = redis_available()

    def start(port: int) -> RedisInstance:
        instance = RedisInstance(name="redis", port=port, directory=new_directory("redis", parent),
                                 password=password)
        config = _write_config(instance)
        instance.version = _version(binary)
        launch(instance, [binary, str(config)])
        wait_ready(instance, lambda: _answers_ping(instance.port), START_TIMEOUT, in_use="Address already in use")
        return instance

    return with_free_port(start)


def _write_config(instance: RedisInstance) -> Path:
    lines = [f"bind {LOOPBACK}", f"port {instance.port}", "protected-mode yes", "daemonize no", "supervised no",
             'save ""', "appendonly no", f"dir {instance.directory}", 'logfile ""',
             "loglevel notice", "databases 16"]
    if instance.password:
        lines.append(f"requirepass {instance.password}")
    config = instance.directory / "redis.conf"
    config.write_text("\n".join(lines) + "\n")
    return config


def _version(binary: str) -> str:
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    return result.stdout.strip()


def _answers_ping(port: int) -> bool:
    """Whether the server answers PING (+PONG, or -NOAUTH when it wants a password first)."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=1) as sock:
            sock.settimeout(1)
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH"))
