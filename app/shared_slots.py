"""Slots that must hold across processes: at most `per_key` held at once per key (a requester, a target address),
and at most `total` on the whole site.

With SECURE_LIMITS_STORAGE=memory:// (the default, one process) they live in this process's memory. With a
redis:// or rediss:// URI they live in Redis, shared by every process that names it: each held slot is a lease (a
member of a sorted set scored by its expiry, Redis's own clock) that this process renews while it holds it, so the
slots of a process that dies (kill -9, host lost) come back within LEASE seconds. One Lua script checks and takes a
slot, so two processes can never both take the last one.

Used by the open event streams (app.web.api) and the connections to one target address (app.fairness).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Any, Protocol
from urllib.parse import urlsplit

from app import logs
from app.fairness import AddressSlots

LEASE = 60.0  # seconds a held slot survives its process
RENEW_EVERY = LEASE / 4
POLL_FIRST, POLL_MOST = 0.02, 0.25  # seconds between tries while waiting for a slot in Redis
REDIS_SCHEMES = ("redis", "rediss")
REDIS_TIMEOUT = 2.0  # seconds a Redis command or connection may take: a stalled Redis fails a request, never hangs it
log = logs.get_logger("app.shared_slots")

# KEYS: the key's set, the site's set (may be the same name when there is no total); ARGV: token, per_key, total
# (0 = none), lease seconds. Returns 1 when the slot was taken.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lease = tonumber(ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
if tonumber(ARGV[3]) > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return 0 end
  redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
  redis.call('EXPIRE', KEYS[2], math.ceil(lease) + 1)
end
redis.call('ZADD', KEYS[1], now + lease, ARGV[1])
redis.call('EXPIRE', KEYS[1], math.ceil(lease) + 1)
return 1
"""
# KEYS: the sets; ARGV: lease seconds, then the tokens: pushes the expiry of tokens still held (XX: never re-adds)
_RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i = 2, #ARGV do
  for _, key in ipairs(KEYS) do redis.call('ZADD', key, 'XX', until_, ARGV[i]) end
end
for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, math.ceil(tonumber(ARGV[1])) + 1) end
return 1
"""


def is_redis(uri: str) -> bool:
    return urlsplit(uri).scheme in REDIS_SCHEMES


class Slots(Protocol):
    async def acquire(self, key: str) -> str | None:
        """A token for one slot of `key`, or None when the key or the site is full."""

    async def release(self, key: str, token: str) -> None:
        """Give back a slot `acquire` gave (never fails: a slot not given back expires in Redis)."""


class MemorySlots:
    """The slots of this process alone."""

    def __init__(self, total: int | None, per_key: int) -> None:
        self.total, self.per_key = total, per_key
        self.open: dict[str, int] = {}

    async def acquire(self, key: str) -> str | None:
        if (self.total is not None and sum(self.open.values()) >= self.total) or self.open.get(key, 0) >= self.per_key:
            return None
        self.open[key] = self.open.get(key, 0) + 1
        return "held"

    async def release(self, key: str, token: str) -> None:
        count = self.open.get(key, 0) - 1
        if count > 0:
            self.open[key] = count
        else:
            self.open.pop(key, None)


class RedisSlots:
    """The slots of every process sharing one Redis; `name` separates the kinds (streams, connections)."""

    def __init__(self, client: Any, name: str, total: int | None, per_key: int, lease: float = LEASE) -> None:
        self.client, self.name, self.total, self.per_key, self.lease = client, name, total, per_key, lease
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, set[str]] = {}  # key -> tokens this process holds
        self._renewer: asyncio.Task[None] | None = None
        self._local = AddressSlots(per_key)  # this process's waiters queue here first, in order; only those
        # that could hold a slot if the other processes held none poll Redis

    def _keys(self, key: str) -> list[str]:
        # one hash tag: both sets on one Redis Cluster node, as a script needs
        return [f"sys:{{{self.name}}}:key:{key}", f"sys:{{{self.name}}}:total"]

    async def acquire(self, key: str) -> str | None:
        token = secrets.token_hex(12)
        taken = await self._acquire(keys=self._keys(key), args=[token, self.per_key, self.total or 0, self.lease])
        if not taken:
            return None
        self._held.setdefault(key, set()).add(token)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_forever(), name=f"renew-{self.name}")
        return token

    async def release(self, key: str, token: str) -> None:
        tokens = self._held.get(key, set())
        tokens.discard(token)
        if not tokens:
            self._held.pop(key, None)
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                for name in self._keys(key):
                    pipe.zrem(name, token)
                await pipe.execute()
        except Exception:  # Redis gone for a moment: the lease expires on its own
            log.warning("slots.release_failed", extra={"slots": self.name}, exc_info=True)

    async def renew(self) -> None:
        for key, tokens in list(self._held.items()):
            if tokens:
                await self._renew(keys=self._keys(key), args=[self.lease, *tokens])

    async def _renew_forever(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease / 4)
            try:
                await self.renew()
            except Exception:
                log.warning("slots.renew_failed", extra={"slots": self.name}, exc_info=True)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Wait for a slot of `key` (app.fairness.ConnectionSlots)."""
        async with self._local.hold(key), hold(self, key):
            yield

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)


@contextlib.asynccontextmanager
async def hold(slots: Slots, key: str) -> AsyncIterator[None]:
    """Wait for a slot of `key` (polling, with a growing pause), hold it for the block, give it back."""
    pause = POLL_FIRST
    while (token := await slots.acquire(key)) is None:
        await asyncio.sleep(pause * (0.5 + secrets.randbelow(1000) / 1000))  # jitter: waiters do not march in step
        pause = min(POLL_MOST, pause * 2)
    try:
        yield
    finally:
        await slots.release(key, token)


def redis_client(uri: str) -> Any:
    """A redis-py asyncio client for SECURE_LIMITS_STORAGE (the `redis` extra)."""
    try:
        from redis import asyncio as aioredis
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("SECURE_LIMITS_STORAGE names Redis: install the redis extra "
                           "(pip install 'secure-your-server[redis]')") from exc
    return aioredis.Redis.from_url(uri, socket_timeout=REDIS_TIMEOUT, socket_connect_timeout=REDIS_TIMEOUT)
