"""Debian's PostgreSQL as a loopback test fixture: a cluster of its own per instance, never the system's.

    inst = start_postgres()
    try:
        ...  # psycopg.connect(inst.dsn): postgresql://USER:PASSWORD@127.0.0.1:PORT/DATABASE
    finally:
        inst.stop()

Each instance gets a private temporary folder (servers/daemon.py) holding its cluster (`data/`, made by `initdb`)
and its unix socket (`sockets/`), and runs the `postgres` binary of the newest major under /usr/lib/postgresql in
the foreground, listening on a free port of 127.0.0.1 only. PostgreSQL refuses to run as root: as root, initdb and
the server run as the `postgres` system user (the folder is handed to it); otherwise as ourselves. Settings are for
speed, not durability (fsync, synchronous_commit and full_page_writes off): a crashed instance is thrown away.

Access: TCP needs a password (scram-sha-256), for the superuser `postgres` (`admin_dsn`) and for the role the DSN
names, which owns its database and may create others (`new_database()`). The unix socket, in a folder only the
server's user (and root) may enter, trusts that user: the fixture itself makes the role and databases through it
with `psql`. Debian's cluster tools (pg_ctlcluster, the `postgresql` service) are never used, and nothing is
written outside the instance's folder.

stop() is the server's fast shutdown (SIGINT), a bounded wait, SIGKILL to its process group, the folder removed.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

from servers.daemon import (
    LOOPBACK,
    DaemonInstance,
    DaemonStartError,
    launch,
    new_directory,
    wait_ready,
    with_free_port,
)

INSTALL_ROOT = Path("/usr/lib/postgresql")
PACKAGE = "postgresql"
SYSTEM_USER = "postgres"  # the server's user when we are root
SUPERUSER = "postgres"  # the cluster's superuser role
START_TIMEOUT = 30.0  # seconds until the server must accept connections (initdb comes before, bounded apart)
INITDB_TIMEOUT = 60.0
PSQL_TIMEOUT = 30.0
NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # role and database names we make: plain identifiers
SETTINGS = {
    "listen_addresses": LOOPBACK,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "max_connections": "100",
    "unix_socket_permissions": "0700",
    "logging_collector": "off",
    "log_min_messages": "warning",
}


class PostgresUnavailable(RuntimeError):
    """PostgreSQL cannot run here (package missing, or root without the postgres user). The test decides."""


@dataclass(eq=False)
class PostgresInstance(DaemonInstance):
    user: str = "app"
    password: str = ""
    database: str = "app"
    admin_password: str = ""
    bin_dir: Path = INSTALL_ROOT
    run_as: str | None = None  # the system user the server runs as (None: ourselves)

    @property
    def dsn(self) -> str:
        """postgresql://USER:PASSWORD@127.0.0.1:PORT/DATABASE for the role that owns `database`."""
        return self.dsn_for(self.database)

    @property
    def admin_dsn(self) -> str:
        """The superuser's DSN (database `postgres`)."""
        return f"postgresql://{SUPERUSER}:{quote(self.admin_password, safe='')}@{LOOPBACK}:{self.port}/postgres"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "sockets"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def dsn_for(self, database: str) -> str:
        return (f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}@{LOOPBACK}:{self.port}/"
                f"{quote(database, safe='')}")

    def psql(self, sql: str, database: str = "postgres", **variables: str) -> str:
        """Run `sql` as the superuser through the unix socket (psql, ON_ERROR_STOP; `:'name'`/`:"name"` read
        `variables`, quoted by psql) and return its output; DaemonStartError when psql fails."""
        argv = [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h",
                str(self.socket_dir), "-p", str(self.port), "-U", SUPERUSER, "-d", database, "-f", "-"]
        for name, value in variables.items():
            argv[1:1] = ["-v", f"{name}={value}"]
        result = subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=PSQL_TIMEOUT,
                                **_as_user(self.run_as))
        if result.returncode != 0:
            raise DaemonStartError(f"psql on {self.name}:{self.port} failed: {result.stderr.strip()}")
        return result.stdout

    def new_database(self, name: str | None = None) -> str:
        """A fresh, empty database owned by the DSN's role; returns its DSN."""
        name = name or f"db_{secrets.token_hex(6)}"
        _check_name(name)
        self.psql('CREATE DATABASE :"db" OWNER :"role";\n', db=name, role=self.user)
        return self.dsn_for(name)

    def end_sessions(self, dsn: str) -> int:
        """Ends every session on the database `dsn` names (what a restart or a failover does to its clients);
        returns how many there were."""
        database = unquote(dsn.rsplit("/", 1)[1])
        _check_name(database)
        ended = self.psql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                          " WHERE datname = :'db' AND pid <> pg_backend_pid();\n", db=database)
        return int(ended.strip())


def bin_dir() -> Path:
    """/usr/lib/postgresql/<newest major>/bin, or PostgresUnavailable."""
    majors = sorted((p for p in INSTALL_ROOT.glob("*/bin/postgres") if p.parent.parent.name.isdigit()),
                    key=lambda p: int(p.parent.parent.name))
    if not majors:
        raise PostgresUnavailable(f"no {INSTALL_ROOT}/<major>/bin/postgres: install the Debian package {PACKAGE} "
                                  "(scripts/install-debian-packages.sh, which make test runs as root)")
    return majors[-1].parent


def postgres_available() -> Path:
    """The binaries' folder, when an instance can run here; PostgresUnavailable otherwise."""
    found = bin_dir()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresUnavailable(f"running as root and the system user {SYSTEM_USER} (made by the Debian "
                                      f"package {PACKAGE}) is missing: PostgreSQL refuses to run as root") from None
    return found


def start_postgres(*, user: str = "app", password: str | None = None, database: str = "app",
                   parent: str | None = None) -> PostgresInstance:
    """A new cluster on a free port of 127.0.0.1, with the role `user` (password given or random) owning the
    database `database`; ready for connections when this returns. `parent`: where its temporary folder goes."""
    _check_name(user)
    _check_name(database)
    found = postgres_available()
    run_as = SYSTEM_USER if os.geteuid() == 0 else None
    password = password if password is not None else secrets.token_urlsafe(12)

    def start(port: int) -> PostgresInstance:
        instance = PostgresInstance(name="postgres", port=port, directory=new_directory("postgres", parent),
                                    stop_signal=signal.SIGINT, user=user, password=password, database=database,
                                    admin_password=secrets.token_urlsafe(12), bin_dir=found, run_as=run_as)
        try:
            _initdb(instance)
        except BaseException:
            instance.stop()
            raise
        return _serve(instance)

    return with_free_port(start)


def _initdb(instance: PostgresInstance) -> None:
    directory = instance.directory
    instance.socket_dir.mkdir(mode=0o700)
    password_file = directory / "superuser-password"
    password_file.write_text(instance.admin_password + "\n")
    if instance.run_as is not None:
        entry = pwd.getpwnam(instance.run_as)
        for path in (directory, instance.socket_dir, password_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    argv = [str(instance.bin_dir / "initdb"), "-D", str(instance.data_dir), "-U", SUPERUSER,
            f"--pwfile={password_file}", "--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8",
            "--locale=C", "--no-sync", "--no-instructions"]
    try:
        result = subprocess.run(argv, cwd=directory, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=INITDB_TIMEOUT, **_as_user(instance.run_as))
    finally:
        password_file.unlink(missing_ok=True)
    if result.returncode != 0:
        raise DaemonStartError(f"initdb failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    version = subprocess.run([str(instance.bin_dir / "postgres"), "--version"], capture_output=True, text=True,
                             timeout=PSQL_TIMEOUT)
    instance.version = version.stdout.strip()


def _serve(instance: PostgresInstance) -> PostgresInstance:
    """Start the server of an initialised cluster, wait until it accepts connections, make the role and database."""
    settings = {**SETTINGS, "port": str(instance.port), "unix_socket_directories": str(instance.socket_dir)}
    argv = [str(instance.bin_dir / "postgres"), "-D", str(instance.data_dir)]
    for name, value in settings.items():
        argv += ["-c", f"{name}={value}"]
    launch(instance, argv, **_as_user(instance.run_as))
    wait_ready(instance, lambda: "ready to accept connections" in instance.log(), START_TIMEOUT,
               in_use="Address already in use")
    try:
        instance.psql('CREATE ROLE :"role" LOGIN CREATEDB PASSWORD :\'password\';\n'
                      'CREATE DATABASE :"db" OWNER :"role";\n',
                      role=instance.user, password=instance.password, db=instance.database)
    except BaseException:
        instance.stop()
        raise
    return instance


def _as_user(user: str | None) -> dict[str, object]:
    """subprocess arguments that run a command as `user` (its group, no supplementary groups), or as ourselves."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    env = {"PATH": "/usr/bin:/bin", "HOME": entry.pw_dir, "LANG": "C.UTF-8"}
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "env": env}


def _check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ValueError(f"not a plain lower-case identifier: {name!r}")
