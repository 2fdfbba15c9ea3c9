"""The site's own listeners (app/listeners.py): started on loopback, named as the site's own, and what proxies are
asked to reach (CanaryTargets)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from support import free_port

from app.access.targets import Listener
from app.listeners import ListenerConfigError, _canary_targets, start_listeners
from app.probes.canary import Canary


async def refused(port: int, host: str = "127.0.0.1") -> bool:
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_every_listener_is_started_and_counted_as_the_sites_own(settings):
    settings.sink_listen = "127.0.0.1:0"
    settings.canary_smtp_listen = settings.canary_http_listen = settings.canary_tls_listen = "127.0.0.1:0"
    settings.canary_name = "canary.example"
    app = Listener("127.0.0.1", 8000)
    listeners = await start_listeners(settings, "secret", [app])
    try:
        targets = listeners.targets
        assert targets is not None and listeners.sink is not None
        assert (targets.address, targets.name) == ("127.0.0.1", "canary.example")
        own_app, sink, smtp, http, tls = listeners.own  # in the order they started
        assert own_app == app and {sink.host, smtp.host, http.host, tls.host} == {"127.0.0.1"}
        ports = [sink.port, smtp.port, http.port, tls.port]
        assert all(ports) and len(set(ports)) == 4  # the ports they got, not the 0 they asked for
        assert (sink.port, smtp.port, tls.port) == (listeners.sink.port, targets.smtp_port, targets.tls_port)
        assert targets.http_base == f"http://127.0.0.1:{http.port}"
        assert not any([await refused(port) for port in ports])
    finally:
        await listeners.stop()
    assert [await refused(port) for port in ports] == [True] * 4


async def test_no_canary_and_no_address_means_no_canary_targets(settings):
    listeners = await start_listeners(settings, "secret", [])
    try:
        assert listeners.targets is None and listeners.sink is None and listeners.own == []
    finally:
        await listeners.stop()


@pytest.mark.parametrize("public_url,http_base", [
    ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
    ("http://127.0.0.1", "http://127.0.0.1:80"),
    ("https://127.0.0.1", None),  # the site answers /canary/<id>, but a proxy's GET is plain HTTP
    ("http://site.example", None),  # not the canary address
])
async def test_without_an_http_canary_the_site_itself_may_be_it(settings, public_url, http_base):
    settings.canary_smtp_listen = "127.0.0.1:0"
    settings.public_url = public_url
    listeners = await start_listeners(settings, "secret", [])
    try:
        assert listeners.targets is not None and listeners.targets.http_base == http_base
        assert listeners.targets.tls_port is None and listeners.targets.smtp_port == listeners.own[0].port
    finally:
        await listeners.stop()


async def test_an_ipv6_canary_address_is_bracketed_in_urls(settings):
    settings.canary_http_listen = "[::1]:0"
    try:
        listeners = await start_listeners(settings, "secret", [])
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert listeners.targets is not None and listeners.targets.address == "::1"
        assert listeners.targets.http_base == f"http://[::1]:{listeners.own[0].port}"
    finally:
        await listeners.stop()


async def test_the_canary_address_setting_wins_over_the_listen_address(settings):
    settings.canary_smtp_listen = "127.0.0.1:0"
    settings.canary_address = "127.0.0.2"
    listeners = await start_listeners(settings, "secret", [])
    try:
        assert listeners.targets is not None and listeners.targets.address == "127.0.0.2"
    finally:
        await listeners.stop()


def test_a_canary_on_every_address_needs_the_canary_address(settings):
    """Checked without listening on every address: the rule that start_listeners applies to what it started."""
    canary = Canary("secret")
    with pytest.raises(ListenerConfigError, match="SECURE_CANARY_ADDRESS"):
        _canary_targets(settings, canary, {"smtp": 2525}, ["0.0.0.0"])
    with pytest.raises(ListenerConfigError):
        _canary_targets(settings, canary, {"smtp": 2525, "tls": 4443}, ["::", "0.0.0.0"])
    # another canary on one address says where: the first such host
    targets = _canary_targets(settings, canary, {"smtp": 2525, "tls": 4443}, ["0.0.0.0", "127.0.0.3", "127.0.0.4"])
    assert targets is not None and targets.address == "127.0.0.3"
    settings.canary_address = "192.0.2.10"
    targets = _canary_targets(settings, canary, {"smtp": 2525}, ["0.0.0.0"])
    assert targets is not None and (targets.address, targets.smtp_port, targets.tls_port) == ("192.0.2.10", 2525, None)


async def test_a_listener_that_cannot_start_stops_those_already_started(settings):
    sink_port = free_port()
    taken = socket.create_server(("127.0.0.1", 0))
    settings.sink_listen = f"127.0.0.1:{sink_port}"
    settings.canary_smtp_listen = "127.0.0.1:0"
    settings.canary_tls_listen = f"127.0.0.1:{taken.getsockname()[1]}"
    try:
        with pytest.raises(OSError):
            await start_listeners(settings, "secret", [])
    finally:
        taken.close()
    assert await refused(sink_port)


async def test_external_listeners_bind_nothing_and_name_the_configured_ports_as_the_sites_own(settings, store):
    """SECURE_LISTENERS=external: another process binds them; this one must still never test them, and must ask
    proxies to reach them."""
    from app.listeners import StoredArrivals, external_listeners

    sink, smtp, tls = free_port(), free_port(), free_port()
    settings.sink_listen, settings.canary_smtp_listen = f"127.0.0.1:{sink}", f"127.0.0.1:{smtp}"
    settings.canary_tls_listen = f"127.0.0.1:{tls}"
    listeners = await external_listeners(settings, "secret", [Listener("127.0.0.1", 8000)], store)
    assert listeners.sink is None and isinstance(listeners.arrivals, StoredArrivals)
    assert [(o.host, o.port) for o in listeners.own] == [("127.0.0.1", p) for p in (8000, sink, smtp, tls)]
    assert listeners.targets is not None and listeners.targets.canary.journal is store
    assert (listeners.targets.address, listeners.targets.smtp_port, listeners.targets.tls_port) == (
        "127.0.0.1", smtp, tls)
    assert all([await refused(port) for port in (sink, smtp, tls)])  # nothing bound here
    settings.canary_smtp_listen = "127.0.0.1:0"
    with pytest.raises(ListenerConfigError, match="fixed port"):
        await external_listeners(settings, "secret", [], store)


async def test_stored_arrivals_see_what_another_connection_recorded(tmp_path):
    """The waiting process reads the arrivals the listeners process wrote (another connection to the file)."""
    from app.listeners import StoredArrivals
    from app.store import Store

    path = str(tmp_path / "db.sqlite")
    writer, reader = Store(path), Store(path)
    await writer.open()
    await reader.open()
    try:
        arrivals = StoredArrivals(reader, interval=0.01)
        wanted = {"sys0000000000000001", "sys0000000000000002"}
        assert await arrivals.wait_for(wanted, 0) == set()
        await writer.record_observation("sink", "sys0000000000000001")
        assert await arrivals.wait_for(wanted, 0.05) == {"sys0000000000000001"}  # one of two: after the wait

        async def later() -> None:
            await asyncio.sleep(0.05)
            await writer.record_observation("sink", "sys0000000000000002")
        task = asyncio.create_task(later())
        assert await arrivals.wait_for(wanted, 30) == wanted  # returns once both are in, long before 30 s
        await task
    finally:
        await writer.close()
        await reader.close()


async def test_a_canary_with_a_journal_records_before_it_answers_and_reads_every_process(tmp_path):
    from app.probes.canary import SmtpCanary
    from app.store import Store

    path = str(tmp_path / "db.sqlite")
    mine, theirs = Store(path), Store(path)
    await mine.open()
    await theirs.open()
    listener = SmtpCanary(Canary("secret", theirs))  # the listeners process's canary
    here = Canary("secret", mine)  # the process that ran the check: it saw nothing itself
    cid = here.new_check_id()  # issued under the site's secret: the listeners process writes it to the store
    port = await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(f"EHLO {cid}\r\n".encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert answer.decode().strip() == "250 " + here.token(cid)
        assert here.seen_from(cid) == []
        assert await here.observed(cid) == ["127.0.0.1"]  # in the store once the token came
        assert await Canary("secret").observed(cid) == []  # no journal: this process only
    finally:
        await listener.stop()
        await mine.close()
        await theirs.close()
