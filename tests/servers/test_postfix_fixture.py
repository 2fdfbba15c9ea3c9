"""The Postfix fixture itself: real instances on loopback relay (or refuse) as their kind says, side by side.

Every instance sends what it accepts to an aiosmtpd sink on 127.0.0.1; nothing leaves the box.
"""

from __future__ import annotations

import os
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Callable, Iterator

import pytest
from aiosmtpd.controller import Controller
from support import free_port

import servers.postfix as postfix_module
from servers.postfix import PostfixInstance, PostfixUnavailable, start_postfix

SENDER = "a@sender.example"
RCPT = "tag123@probe.example"


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    at: float  # time.monotonic() when the sink had the whole message


@dataclass
class Sink:
    """An SMTP sink on 127.0.0.1 that records every envelope it is handed."""

    port: int = 0
    received: list[Received] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 - aiosmtpd's hook name
        with self._cond:
            self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                                          time.monotonic()))
            self._cond.notify_all()
        return "250 2.0.0 Ok: recorded"

    def wait_for(self, rcpt: str, seconds: float = 5.0) -> Received:
        deadline = time.monotonic() + seconds
        with self._cond:
            while True:
                for item in self.received:
                    if rcpt in item.rcpt_tos:
                        return item
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"the sink got nothing for {rcpt} within {seconds} s: {self.received}")
                self._cond.wait(timeout=min(left, 0.1))


@pytest.fixture
def sink() -> Iterator[Sink]:
    recorder = Sink()
    recorder.port = free_port()
    controller = Controller(recorder, hostname="127.0.0.1", port=recorder.port, server_hostname="sink.test.example",
                            ready_timeout=5.0)
    controller.start()
    try:
        yield recorder
    finally:
        controller.stop()


@pytest.fixture
def postfix(tmp_path: Path, sink: Sink, postfix_ok: None) -> Iterator[Callable[..., PostfixInstance]]:
    """Start instances relaying to the sink; all of them are stopped (and checked gone) after the test."""
    started: list[PostfixInstance] = []

    def start(kind: str, **kwargs) -> PostfixInstance:
        t0 = time.monotonic()
        instance = start_postfix(tmp_path, kind, sink_port=sink.port, **kwargs)  # type: ignore[arg-type]
        print(f"start_postfix({kind!r}) took {time.monotonic() - t0:.3f} s, port {instance.port}")
        started.append(instance)
        return instance

    try:
        yield start
    finally:
        for instance in started:
            instance.stop()
        for instance in started:
            assert not _alive(instance), f"postfix {instance.kind} still running after stop()"


def _alive(instance: PostfixInstance) -> bool:
    """Any process still working in the instance's queue directory (the master and its daemons)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(os.readlink(f"/proc/{entry.name}/cwd")) == instance.queue_dir:
                    return True
            except OSError:
                continue
    return False


def _client(instance: PostfixInstance) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", instance.port, local_hostname="client.test.example", timeout=10)


def _message(rcpt: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = SENDER
    msg["To"] = rcpt
    msg["Subject"] = "relay probe"
    msg.set_content("probe body\n")
    return msg.as_bytes()


def _relay(smtp: smtplib.SMTP, rcpt: str) -> float:
    """MAIL, RCPT, DATA all accepted; returns the monotonic time of the final 250."""
    code, text = smtp.mail(SENDER)
    assert code == 250, text
    code, text = smtp.rcpt(rcpt)
    assert code == 250, text
    code, text = smtp.data(_message(rcpt))
    assert code == 250, text
    assert b"queued as" in text
    return time.monotonic()


def _wait_log(instance: PostfixInstance, needle: str, seconds: float = 5.0) -> str:
    deadline = time.monotonic() + seconds
    while True:
        text = instance.log()
        if needle in text or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def test_open_relays_to_the_sink(postfix, sink: Sink) -> None:
    instance = postfix("open")
    with _client(instance) as smtp:
        code, banner = smtp.ehlo()
        assert code == 250
        accepted_at = _relay(smtp, RCPT)
    got = sink.wait_for(RCPT)
    print(f"delivery to the sink {got.at - accepted_at:.3f} s after 250 queued")
    assert got.rcpt_tos == [RCPT]
    assert got.mail_from == SENDER
    assert b"Subject: relay probe" in got.content
    assert b"mx.test.example" in got.content  # Postfix's Received: header
    log = _wait_log(instance, "status=sent")
    assert f"relay=127.0.0.1[127.0.0.1]:{sink.port}" in log and "status=sent" in log, log


def test_open_banner_and_address(postfix) -> None:
    instance = postfix("open")
    with socket.create_connection(("127.0.0.1", instance.port), timeout=5) as sock:
        assert sock.recv(512) == b"220 mx.test.example ESMTP Postfix (Debian/GNU)\r\n"
        sock.sendall(b"QUIT\r\n")
    assert instance.config_dir.joinpath("main.cf").is_file()
    assert f"127.0.0.1:{instance.port} inet" in instance.config_dir.joinpath("master.cf").read_text()


def test_closed_refuses_relay(postfix, sink: Sink) -> None:
    instance = postfix("closed")
    with _client(instance) as smtp:
        smtp.ehlo()
        code, text = smtp.mail(SENDER)
        assert code == 250, text
        code, text = smtp.rcpt(RCPT)
    assert code == 554, text
    assert b"5.7.1" in text and b"Relay access denied" in text
    assert RCPT.encode() in text
    assert sink.received == []
    assert "Relay access denied" in _wait_log(instance, "Relay access denied")
    # Postfix's own defences stay at their defaults (benchmarks measure them)
    limits = subprocess.run(["/usr/sbin/postconf", "-c", str(instance.config_dir), "-h", "smtpd_soft_error_limit",
                             "smtpd_error_sleep_time", "smtpd_hard_error_limit"],
                            capture_output=True, text=True, timeout=30, check=True).stdout.split()
    assert limits == ["10", "1s", "${stress?{1}:{20}}"]


def test_starttls_required_before_mail(postfix, sink: Sink) -> None:
    instance = postfix("starttls")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with _client(instance) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls")
        code, text = smtp.mail(SENDER)
        assert code == 530, text
        assert b"STARTTLS" in text
        code, _ = smtp.starttls(context=context)
        assert code == 220
        assert isinstance(smtp.sock, ssl.SSLSocket)
        assert smtp.sock.getpeercert(binary_form=True)  # the self-signed certificate
        smtp.ehlo()
        accepted_at = _relay(smtp, RCPT)
    got = sink.wait_for(RCPT)
    print(f"delivery to the sink {got.at - accepted_at:.3f} s after 250 queued (over TLS)")
    assert got.rcpt_tos == [RCPT]


def test_two_kinds_side_by_side(postfix, sink: Sink) -> None:
    open_ = postfix("open")
    closed = postfix("closed")
    assert open_.port != closed.port
    assert open_.queue_dir != closed.queue_dir and open_.config_dir != closed.config_dir
    with _client(open_) as a, _client(closed) as b:
        a.ehlo()
        b.ehlo()
        b.mail(SENDER)
        code, text = b.rcpt("side@probe.example")
        assert code == 554 and b"Relay access denied" in text
        _relay(a, "side@probe.example")
    assert sink.wait_for("side@probe.example").rcpt_tos == ["side@probe.example"]
    assert len(sink.received) == 1
    closed.stop()
    with _client(open_) as a:  # the other one keeps serving
        assert a.noop()[0] == 250


def test_stop_is_idempotent_and_frees_the_port(postfix) -> None:
    instance = postfix("open", port=free_port())
    pid = instance.master_pid()
    assert pid is not None
    t0 = time.monotonic()
    instance.stop()
    print(f"stop() took {time.monotonic() - t0:.3f} s")
    instance.stop()
    assert not _alive(instance)
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        state = "gone"
    assert state == "gone", state  # reaped: start-fg keeps the master our (grand)child
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", instance.port), timeout=2).close()


def test_missing_postfix_is_a_clear_error(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(postfix_module, "POSTFIX", str(tmp_path / "no-postfix"))
    with pytest.raises(PostfixUnavailable, match="is missing"):
        start_postfix(tmp_path, "open", sink_port=free_port())


def test_submission_wants_starttls_then_a_login(postfix, sink: Sink) -> None:
    """Debian's stock submission block: encryption first, AUTH only over TLS, nothing for strangers."""
    instance = postfix("submission")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with _client(instance) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        code, text = smtp.mail(SENDER)
        assert code == 530 and b"STARTTLS" in text
        assert smtp.starttls(context=context)[0] == 220
        smtp.ehlo()
        assert {"PLAIN", "LOGIN"} <= set(smtp.esmtp_features["auth"].upper().split())
        assert smtp.mail(SENDER)[0] == 250
        code, text = smtp.rcpt(RCPT)
    assert code == 554 and b"5.7.1" in text and b"Recipient address rejected: Access denied" in text
    master = instance.config_dir.joinpath("master.cf").read_text()
    assert "  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject\n" in master
    assert sink.received == []
