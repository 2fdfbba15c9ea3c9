"""The Exim, Sendmail and OpenSMTPD fixtures themselves: real daemons from their extracted Debian packages, on
loopback, relaying (or refusing) as their kind says, side by side, and gone after stop().

Every instance sends what it relays to our sink (app.probes.sink) on 127.0.0.1; nothing leaves the box.
"""

from __future__ import annotations

import asyncio
import smtplib
import socket
from pathlib import Path

import pytest
from support import PROBE_DOMAIN

from app.probes.sink import new_tag
from servers import exim, opensmtpd, sendmail
from servers.mta import MtaUnavailable

NAMES = ("exim", "opensmtpd", "sendmail")
BANNERS = {"exim": b"ESMTP Exim 4.96", "sendmail": b"ESMTP Sendmail 8.17.1.9", "opensmtpd": b"ESMTP OpenSMTPD"}
VERSIONS = {"exim": "4.96", "sendmail": "8.17.1.9", "opensmtpd": "6.8.0p2"}
SENDER = f"someone@{PROBE_DOMAIN}"




def _send(port: int, rcpt: str) -> tuple[int, bytes]:
    """MAIL, RCPT and (when accepted) the message: the RCPT reply, or the end-of-data reply."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test.example", timeout=10) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(SENDER)
        assert code == 250, text
        code, text = smtp.rcpt(rcpt)
        if code != 250:
            return code, text
        return smtp.data(f"Subject: fixture test\r\nX-Secure-Your-Server-Tag: {rcpt}\r\n\r\nbody\r\n".encode())


def _banner(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        data = sock.recv(512)
        sock.sendall(b"QUIT\r\n")
    return data


@pytest.mark.parametrize("name", NAMES)
async def test_open_relays_to_our_sink(mta, sink, name):
    instance = await mta(name, "open")
    assert BANNERS[name] in _banner(instance.port) and instance.version == VERSIONS[name]
    tag = new_tag()
    code, text = await asyncio.to_thread(_send, instance.port, f"{tag}@{PROBE_DOMAIN}")
    assert code == 250, text
    assert await sink.wait_for({tag}, 10) == {tag}


@pytest.mark.parametrize("name", NAMES)
async def test_closed_refuses_a_stranger(mta, sink, name):
    instance = await mta(name, "closed")
    code, text = await asyncio.to_thread(_send, instance.port, f"{new_tag()}@{PROBE_DOMAIN}")
    assert code == 550 or code == 554, text
    await asyncio.sleep(0.3)
    assert not sink.arrivals


@pytest.mark.parametrize("name,offered,refusal", [
    ("exim", None, b"relay not permitted"),  # AUTH only after STARTTLS (Debian's exim4-config)
    ("sendmail", "PLAIN LOGIN", b"Relaying denied. Proper authentication required."),
    ("opensmtpd", None, None),  # MAIL itself needs AUTH first (530); AUTH only after STARTTLS
])
async def test_auth_kind_relays_only_after_a_login(mta, sink, name, offered, refusal):
    instance = await mta(name, "auth")

    def talk() -> tuple[str | None, int, bytes]:
        with smtplib.SMTP("127.0.0.1", instance.port, local_hostname="client.test.example", timeout=10) as smtp:
            smtp.ehlo()
            auth = smtp.esmtp_features.get("auth")
            code, text = smtp.mail(SENDER)
            if code != 250:
                return auth, code, text
            code, text = smtp.rcpt(f"{new_tag()}@{PROBE_DOMAIN}")
            return auth, code, text

    auth, code, text = await asyncio.to_thread(talk)
    assert (auth.strip() if auth else None) == offered
    if refusal is None:
        assert code == 530 and b"Must issue an AUTH command first" in text
    else:
        assert code == 550 and refusal in text, text
    assert not sink.arrivals


async def test_instances_side_by_side_and_stop(mta, sink):
    first = await mta("exim", "open")
    second = await mta("sendmail", "closed")
    third = await mta("opensmtpd", "closed")
    assert len({first.port, second.port, third.port}) == 3
    assert len({first.directory, second.directory, third.directory}) == 3
    pids = first.pids()
    assert pids
    first.stop()
    first.stop()  # idempotent
    assert not first.pids()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", first.port), timeout=2).close()
    assert BANNERS["sendmail"] in _banner(second.port)  # the others keep serving
    assert BANNERS["opensmtpd"] in _banner(third.port)


@pytest.mark.parametrize("module,attribute", [(exim, "EXIM"), (sendmail, "SENDMAIL"), (opensmtpd, "SMTPD")])
def test_a_missing_binary_is_a_clear_error(monkeypatch, tmp_path: Path, module, attribute):
    monkeypatch.setattr(module, attribute, tmp_path / "missing")
    start = getattr(module, f"start_{module.__name__.rsplit('.', 1)[1]}")
    with pytest.raises(MtaUnavailable, match="install-mta.sh"):
        start(tmp_path, "open", sink_port=1)
