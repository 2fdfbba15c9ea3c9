"""Settings from the environment (prefix SECURE_); every one is documented in the README with its default."""

from __future__ import annotations

import ipaddress
import json
import re
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

POSTGRES_SCHEMES = ("postgresql://", "postgres://")  # SECURE_DATABASE_URL forms that select PostgreSQL

DEFAULT_PROXY_PORTS = [23, 80, 443, 1080, 3128, 6588, 8000, 8080, 8118, 8123, 8888, 9050]


def _split_list(value: Any) -> Any:
    """Accept a JSON list or a comma-separated string, as the README promises."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            return json.loads(text)
        return [item.strip() for item in text.split(",") if item.strip()]
    return value


def parse_listen(value: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"expected [v6]:port, got {value!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"expected host:port or [v6]:port, got {value!r}")
    port_number = int(port)
    if not 0 <= port_number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, port_number


PortList = Annotated[list[int], NoDecode]
NetworkList = Annotated[list[str], NoDecode]
StrList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SECURE_", extra="ignore")

    database_url: str = "sqlite:///./var/secure-your-server.db"  # or postgresql://USER:PASSWORD@HOST:PORT/DATABASE
    database_pool_size: int = Field(default=5, ge=1, le=100)  # PostgreSQL: connections (and threads) per process
    public_url: str = ""  # empty: http://HOST:PORT of `serve`

    secret_key: str = ""  # empty: generated once and kept in the database

    allow_networks: NetworkList = Field(default_factory=list)
    trusted_proxies: NetworkList = Field(default_factory=list)
    # the one header the trusted proxies set; the other is ignored, since a proxy passes on what it does not set
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"

    relay_ports: PortList = Field(default_factory=lambda: [25, 587, 465])
    proxy_ports: PortList = Field(default_factory=lambda: list(DEFAULT_PROXY_PORTS))

    probe_domain: str = "probe.invalid"
    probe_helo: str = "probe.invalid"
    sink_listen: str = ""
    # embedded: `serve` binds the sink and canaries itself; external: a `secure-your-server listeners` process does,
    # and they share what they see through the store (app/listeners.py)
    listeners: Literal["embedded", "external"] = "embedded"
    sink_wait: float = 20.0
    # how long an audit waits for messages a server accepted for an address at itself (accepted_as_local): a relay
    # that rewrites such an address (the percent hack) delivers at once; a server that kept it never does
    local_form_wait: float = 5.0
    canary_http_listen: str = ""
    canary_smtp_listen: str = ""
    canary_tls_listen: str = ""
    canary_address: str = ""
    canary_name: str = ""  # a DNS name of the canary address, for SOCKS4a (empty: no SOCKS4a check)
    # own addresses (issue 10): the site's public addresses, where its listeners on 0.0.0.0 / :: answer too;
    # never tested, like the canary address and an IP literal in public_url
    public_addresses: StrList = Field(default_factory=list)

    @field_validator("public_addresses", mode="before")
    @classmethod
    def _public_addresses(cls, value: Any) -> Any:
        return [str(ipaddress.ip_address(str(a).strip().strip("[]").split("%", 1)[0])) for a in _split_list(value)]

    dns_servers: StrList = Field(default_factory=list)
    probe_addresses: NetworkList = Field(default_factory=list)  # where our probes come from (the About page)
    ipv4_url: str = ""  # the site under a name with only an A record (dual-stack visitors test their other address)
    ipv6_url: str = ""  # the site under a name with only an AAAA record

    audit_deadline: float = 300.0
    connect_timeout: float = 10.0
    smtp_command_timeout: float = 30.0
    smtp_port_deadline: float = 180.0
    greylist_max_wait: float = 0.0
    proxy_step_timeout: float = 10.0

    max_connections_per_host: int = Field(default=3, ge=1, le=50)
    audits_per_hour: int = Field(default=20, ge=1)
    verifications_per_hour: int = Field(default=20, ge=1)
    max_running_per_requester: int = Field(default=2, ge=1)
    max_running_audits: int = Field(default=20, ge=1)
    target_cooldown: float = Field(default=60.0, ge=0)
    # the budget of one target address, whoever asks (issue 10): see the README's "Abuse limits"
    audits_per_target_per_hour: int = Field(default=6, ge=1)
    max_hosts_per_audit: int = Field(default=10, ge=1, le=100)
    max_queued_audits: int = Field(default=200, ge=1)
    # an instance (process) that has not renewed its heartbeat for this long is gone: its unfinished audits are
    # interrupted by the others (issue 16, item 5). It beats every sixth of it; the sweep runs once per bound.
    instance_stale_seconds: float = Field(default=30.0, gt=0)
    ipv6_requester_prefix: int = Field(default=64, ge=32, le=128)
    verification_check_interval: float = Field(default=10.0, ge=0)
    verification_checks_per_hour: int = Field(default=60, ge=1)
    verification_fetches_per_domain_per_hour: int = Field(default=10, ge=1)
    verification_fetches_per_address_per_hour: int = Field(default=30, ge=1)

    # server hygiene (issue 10): bounds on what one connection, request or requester may hold
    request_head_timeout: float = Field(default=10.0, gt=0)  # a request's head (and body) must arrive within this
    keep_alive_timeout: float = Field(default=5.0, gt=0)  # an idle keep-alive connection is closed after this
    max_header_bytes: int = Field(default=16384, ge=1024)  # the request line and headers together
    max_http_connections: int = Field(default=1000, ge=8)  # open connections; also uvicorn's limit_concurrency
    max_connections_per_peer: int = Field(default=32, ge=1)  # open connections from one address (not trusted proxies)
    max_body_bytes: int = Field(default=16384, ge=1024)  # request bodies; beyond it 413 before anything is parsed
    max_event_streams: int = Field(default=200, ge=1)  # open /events streams on the whole site
    max_event_streams_per_requester: int = Field(default=4, ge=1)

    contact_email: str = "abuse@example.org"
    verification_days: int = Field(default=30, ge=1)
    retention_days: int = Field(default=90, ge=1)
    limits_storage: str = "memory://"
    partners_file: str = "data/partners.json"
    # the public blocklists the blocklist service asks (issue 17): a TOML file, validated at start
    blocklists_file: str = "data/blocklists.toml"
    # how long one list's answer about an address is served again, to every process (the store's cache)
    blocklist_cache_seconds: float = Field(default=900.0, ge=0)
    # the time limit of all the lists' queries about one address together (they run in parallel)
    blocklist_timeout: float = Field(default=8.0, gt=0, le=60)
    log_level: str = "INFO"

    @field_validator("allow_networks", "trusted_proxies", "dns_servers", "probe_addresses", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("relay_ports", "proxy_ports", mode="before")
    @classmethod
    def _ports(cls, value: Any) -> Any:
        value = _split_list(value)
        ports = [int(p) for p in value]
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"port out of range: {port}")
        return list(dict.fromkeys(ports))

    @field_validator("forwarded_header", mode="before")
    @classmethod
    def _header(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("probe_domain", "probe_helo")
    @classmethod
    def _hostname(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        label = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
        if not re.match(rf"^(?=.{{1,253}}$){label}(?:\.{label})+$", value):
            raise ValueError("must be a fully qualified host name such as probe.example.org")
        return value

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        """sqlite:///PATH (one machine), or PostgreSQL, shared by every process of the site."""
        value = value.strip()
        if not re.match(r"^(sqlite:///.+|postgres(ql)?://\S+)$", value):
            raise ValueError("must be sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE")
        return value

    @field_validator("limits_storage")
    @classmethod
    def _limits_storage(cls, value: str) -> str:
        """memory:// or Redis: the shared slots (app.shared_slots) and slowapi's limits must live in one place."""
        value = value.strip()
        if not re.match(r"^(memory://|rediss?://\S*)$", value):
            raise ValueError("must be memory:// or a redis:// or rediss:// URI")
        return value

    @field_validator("canary_address")
    @classmethod
    def _canary_address(cls, value: str) -> str:
        value = value.strip().strip("[]")
        if value:
            ipaddress.ip_address(value)  # an address, not a name: proxies must not need DNS to reach it
        return value

    @field_validator("canary_name")
    @classmethod
    def _canary_name(cls, value: str) -> str:
        value = value.strip().rstrip(".").lower()
        if value and not re.match(r"^[a-z0-9](?:[a-z0-9.-]{0,251}[a-z0-9])?$", value):
            raise ValueError("must be a host name")
        return value

    @field_validator("public_url", "ipv4_url", "ipv6_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and not re.match(r"^https?://[^/?#\s]+$", value):
            raise ValueError("must be http(s)://host[:port], without a path")
        return value

    @field_validator("allow_networks", "trusted_proxies", "probe_addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(item, strict=False)) for item in value]

    @field_validator("sink_listen", "canary_http_listen", "canary_smtp_listen", "canary_tls_listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        if value:
            parse_listen(value)
        return value

    @property
    def allowed_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n) for n in self.allow_networks]

    @property
    def trusted_proxy_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n) for n in self.trusted_proxies]

    @property
    def database_location(self) -> str:
        """What app.store.Store opens: the SQLite file's path, or the PostgreSQL URL as given."""
        return self.database_url if self.uses_postgres else self.sqlite_path

    @property
    def uses_postgres(self) -> bool:
        """PostgreSQL is the store (and the job queue's database)."""
        return self.database_url.startswith(POSTGRES_SCHEMES)

    @property
    def sqlite_path(self) -> str:
        prefix = "sqlite:///"
        if not self.database_url.startswith(prefix):
            raise ValueError("only sqlite:///PATH database URLs are supported")
        return self.database_url[len(prefix):]


@lru_cache
def get_settings() -> Settings:
    return Settings()
