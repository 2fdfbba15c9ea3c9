"""Small asyncio SMTP servers with the behaviours real servers show only on bad days.

Each fake is a Policy: how to greet, and what to answer to EHLO/HELO, MAIL, RCPT, DATA and the message. A fake
that "relays" forwards the message to our sink with aiosmtplib, addressed to the tag it finds in the recipient,
as a real open relay would after undoing a percent hack or a bang path. Everything listens on 127.0.0.1 only,
and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

import aiosmtplib

TAG = re.compile(r"sys[0-9a-f]{16}")
MAX_LINES_PER_CONNECTION = 500


@dataclass
class Connection:
    number: int
    commands: int = 0
    mail: str = ""
    rcpts: list[str] = field(default_factory=list)


class Policy:
    """Postfix-like defaults: greets, refuses to relay anything."""

    banner: bytes = b"220 fake.test.example ESMTP FakeMail 1.0\r\n"
    ehlo_lines = ("fake.test.example", "PIPELINING", "SIZE 10240000", "8BITMIME")

    def __init__(self) -> None:
        self.connections = 0
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.sink: tuple[str, int, str] | None = None  # host, port, probe domain: where "relayed" mail goes

    async def greet(self, conn: Connection, writer: asyncio.StreamWriter) -> bool:
        writer.write(self.banner)
        return True

    def ehlo(self, conn: Connection, arg: str) -> bytes:
        lines = list(self.ehlo_lines)
        return b"".join(f"250{'-' if i < len(lines) - 1 else ' '}{line}\r\n".encode() for i, line in enumerate(lines))

    def helo(self, conn: Connection, arg: str) -> bytes:
        return b"250 fake.test.example\r\n"

    def mail(self, conn: Connection, arg: str) -> bytes:
        return b"250 2.1.0 Ok\r\n"

    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"554 5.7.1 <" + arg.encode() + b">: Relay access denied\r\n"

    def data(self, conn: Connection) -> bytes:
        return b"354 End data with <CR><LF>.<CR><LF>\r\n"

    async def message(self, conn: Connection, body: bytes) -> bytes:
        return b"250 2.0.0 Ok: queued as FAKE\r\n"

    def before_command(self, conn: Connection, line: str) -> bytes | None:
        """A reply that replaces the normal one (e.g. 421); None to go on."""
        return None

    async def relay(self, conn: Connection, body: bytes) -> None:
        """Deliver like an open relay: to the tag found in the recipients, at our sink."""
        if self.sink is None:
            return
        host, port, domain = self.sink
        for rcpt in conn.rcpts:
            match = TAG.search(rcpt)
            if match:
                await aiosmtplib.send(body, sender="relay@fake.test.example",
                                      recipients=[f"{match.group(0)}@{domain}"], hostname=host, port=port,
                                      timeout=5, start_tls=False, use_tls=False)


class FakeSmtpServer:
    """The policy on 127.0.0.1, or on several loopback addresses (127.0.0.x, Linux answers on all of 127/8) at one
    common port, as a domain's mail hosts that share a port number."""

    def __init__(self, policy: Policy, hosts: tuple[str, ...] = ("127.0.0.1",)) -> None:
        assert hosts and all(h.startswith("127.") for h in hosts), "fakes listen on loopback only"
        self.policy = policy
        self.hosts = hosts
        self._servers: list[asyncio.base_events.Server] = []

    async def __aenter__(self) -> "FakeSmtpServer":
        for _ in range(10):  # bounded: the free port of the first address may be taken on another
            first = await asyncio.start_server(self._handle, self.hosts[0], 0)
            port = first.sockets[0].getsockname()[1]
            try:
                rest = [await asyncio.start_server(self._handle, list(self.hosts[1:]), port)] if self.hosts[1:] else []
            except OSError:
                first.close()
                await first.wait_closed()
                continue
            self._servers = [first, *rest]
            return self
        raise OSError(f"no common free port on {len(self.hosts)} loopback addresses")

    async def __aexit__(self, *exc: object) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()

    @property
    def port(self) -> int:
        assert self._servers
        return self._servers[0].sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        policy = self.policy
        policy.connections += 1
        conn = Connection(policy.connections)
        try:
            if not await policy.greet(conn, writer):
                return
            await writer.drain()
            for _ in range(MAX_LINES_PER_CONNECTION):
                raw = await asyncio.wait_for(reader.readline(), 30)
                if not raw:
                    return
                line = raw.decode("latin-1").rstrip("\r\n")
                conn.commands += 1
                override = policy.before_command(conn, line)
                if override is not None:
                    writer.write(override)
                    await writer.drain()
                    if override.startswith(b"421"):
                        return
                    continue
                verb, _, arg = line.partition(" ")
                verb = verb.upper()
                if verb == "EHLO":
                    reply = policy.ehlo(conn, arg)
                elif verb == "HELO":
                    reply = policy.helo(conn, arg)
                elif verb == "MAIL":
                    conn.mail, conn.rcpts = arg, []
                    reply = policy.mail(conn, arg.partition(":")[2])
                elif verb == "RCPT":
                    arg = arg.partition(":")[2]
                    reply = policy.rcpt(conn, arg)
                    if reply.startswith(b"25"):
                        conn.rcpts.append(arg)
                elif verb == "DATA":
                    reply = policy.data(conn)
                    if reply.startswith(b"354"):
                        writer.write(reply)
                        await writer.drain()
                        body = await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 30)
                        policy.messages.append((conn.mail, list(conn.rcpts), body))
                        reply = await policy.message(conn, body)
                elif verb == "RSET":
                    conn.mail, conn.rcpts = "", []
                    reply = b"250 2.0.0 Ok\r\n"
                elif verb == "QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    reply = b"502 5.5.2 Error: command not recognized\r\n"
                writer.write(reply)
                await writer.drain()
                if reply.startswith(b"421"):
                    return
        except (asyncio.TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return
        finally:
            writer.close()


# --- the behaviours ----------------------------------------------------------------------------------------
class OpenRelay(Policy):
    """Relays everything, and really delivers to the sink."""

    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"250 2.1.5 Ok\r\n"

    async def message(self, conn: Connection, body: bytes) -> bytes:
        await self.relay(conn, body)
        return b"250 2.0.0 Ok: queued as RELAYED\r\n"


class PercentHackRelay(OpenRelay):
    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"250 2.1.5 Ok\r\n" if "%" in arg else super(OpenRelay, self).rcpt(conn, arg)


class BangPathRelay(OpenRelay):
    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"250 2.1.5 Ok\r\n" if "!" in arg else super(OpenRelay, self).rcpt(conn, arg)


class AcceptAndDiscard(Policy):
    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"250 2.1.5 Ok\r\n"


class RejectAtData(Policy):
    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"250 2.1.5 Ok\r\n"

    def data(self, conn: Connection) -> bytes:
        return b"554 5.7.1 Relaying not allowed for this message\r\n"


class RejectAfterBody(AcceptAndDiscard):
    async def message(self, conn: Connection, body: bytes) -> bytes:
        return b"550 5.7.1 Message refused: relaying denied\r\n"


class Greylisting(OpenRelay):
    """The first attempt of each (sender, recipient) triplet gets 450 with a delay; after it, mail relays."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.first_seen: dict[tuple[str, str], float] = {}

    def rcpt(self, conn: Connection, arg: str) -> bytes:
        key = (conn.mail, arg)
        now = asyncio.get_running_loop().time()
        first = self.first_seen.setdefault(key, now)
        if now - first < self.delay:
            return f"450 4.2.0 <{arg}>: Recipient address rejected: Greylisted, try again in {self.delay:g} seconds\r\n".encode()
        return b"250 2.1.5 Ok\r\n"


class TemporaryRelayDenied(Policy):
    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"454 4.7.1 <" + arg.encode() + b">: Relay access denied\r\n"


class AuthRequired(Policy):
    ehlo_lines = ("fake.test.example", "AUTH PLAIN LOGIN", "8BITMIME")

    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"530 5.7.0 Authentication required\r\n"


class SenderRejected(Policy):
    def mail(self, conn: Connection, arg: str) -> bytes:
        return b"553 5.1.8 <" + arg.encode() + b">: Sender address rejected: Domain not found\r\n"


class BlockedAtGreeting(Policy):
    banner = b"554 5.7.1 Service unavailable; client [127.0.0.1] blocked using zen.spamhaus.org\r\n"


class DropsAfter(Policy):
    """Says 421 and hangs up after `limit` commands on each connection (like a server's error limit)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def before_command(self, conn: Connection, line: str) -> bytes | None:
        if conn.commands > self.limit:
            return b"421 4.7.0 fake.test.example Error: too many errors\r\n"
        return None


class TarpitBanner(Policy):
    def __init__(self, wait: float) -> None:
        super().__init__()
        self.wait = wait

    async def greet(self, conn: Connection, writer: asyncio.StreamWriter) -> bool:
        await asyncio.sleep(self.wait)
        writer.write(self.banner)
        return True


class EndlessMultiline(Policy):
    async def greet(self, conn: Connection, writer: asyncio.StreamWriter) -> bool:
        for i in range(5000):  # bounded: far more than any client may read
            writer.write(f"220-fake.test.example line {i} of a greeting that never ends\r\n".encode())
            if i % 100 == 0:
                try:
                    await writer.drain()
                except ConnectionError:
                    return False
        return False


class HugeGreeting(Policy):
    """A hostile greeting of about `size` bytes in many `220-` lines (each line numbered, so a test can find every
    one of them), under our reader's bound of 32 KiB a reply; `binary` fills the lines with bytes
    that the evidence shows escaped (\\xNN, four characters each). Then it refuses to relay, like Postfix."""

    LINE = 250

    def __init__(self, size: int = 16 * 1024, binary: bool = False) -> None:
        super().__init__()
        count = max(1, min(62, size // self.LINE))
        fill = bytes(range(0x80, 0x100)) * 2 if binary else b"x" * self.LINE
        self.greeting_lines = [(f"huge.test.example greeting line {i:02d} ".encode() + fill)[:self.LINE - 6]
                               for i in range(count)]
        self.banner = b"".join(b"220-" + line + b"\r\n" for line in self.greeting_lines) + \
            b"220 huge.test.example ESMTP the end of a long greeting\r\n"


class Garbage(Policy):
    async def greet(self, conn: Connection, writer: asyncio.StreamWriter) -> bool:
        writer.write(bytes(range(256)) + b"\r\nHTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        return False


class HeloOnly(Policy):
    banner = b"220 old.test.example SMTP ready\r\n"

    def ehlo(self, conn: Connection, arg: str) -> bytes:
        return b"502 5.5.2 Error: command not recognized\r\n"


class LongLine(Policy):
    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"250 " + b"x" * 10000 + b"\r\n"


class StarttlsRequiredUnadvertised(Policy):
    """Says STARTTLS is required at MAIL but does not list it in EHLO, and cannot do it."""

    def mail(self, conn: Connection, arg: str) -> bytes:
        return b"530 5.7.0 Must issue a STARTTLS command first\r\n"


class AuthOffered(Policy):
    """A closed relay that offers AUTH (a submission port, Exim with an authenticator): `550 relay not permitted`."""

    ehlo_lines = ("fake.test.example", "PIPELINING", "AUTH PLAIN LOGIN", "AUTH=LOGIN", "8BITMIME")

    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"550 relay not permitted\r\n"


class NamedAuth(Policy):
    """A closed relay whose name and echoed addresses are full of words like auth, login and TLS."""

    banner = b"220 smtp-auth.login.example ESMTP FakeMail 1.0\r\n"
    ehlo_lines = ("smtp-auth.login.example", "PIPELINING", "8BITMIME")

    def mail(self, conn: Connection, arg: str) -> bytes:
        if "!" in arg or "@" not in arg:
            return b"501 " + arg.encode() + b": sender address must contain a domain\r\n"
        return b"250 OK\r\n"

    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"550 5.7.1 " + arg.encode() + b": relaying denied for smtp-auth.login.example\r\n"


class LiteralSenderRefused(Policy):
    """Exim's default: a domain-literal sender is refused at MAIL (`501 ... domain literals not allowed`)."""

    def __init__(self, relay: bool = False) -> None:
        super().__init__()
        self.open = relay

    def mail(self, conn: Connection, arg: str) -> bytes:
        if "[" in arg:
            return b"501 " + arg.encode() + b": domain literals not allowed\r\n"
        return b"250 OK\r\n"

    def rcpt(self, conn: Connection, arg: str) -> bytes:
        return b"250 Accepted\r\n" if self.open else b"550 relay not permitted\r\n"

    async def message(self, conn: Connection, body: bytes) -> bytes:
        if self.open:
            await self.relay(conn, body)
        return b"250 OK id=FAKE\r\n"
