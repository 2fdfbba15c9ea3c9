from app.probes import reachability
from app.verdicts import Verdict


async def test_open_port_is_inconclusive_port_open(open_port):
    result = await reachability.check("proxy", "127.0.0.1", open_port, timeout=2)
    assert (result.verdict, result.reason) == (Verdict.INCONCLUSIVE, "port_open")
    assert result.name == "proxy.reachable" and result.port == open_port
    assert result.transcript[0].text.startswith("connecting to 127.0.0.1")


async def test_refused_port_is_unreachable_refused(refused_port):
    result = await reachability.check("relay", "127.0.0.1", refused_port, timeout=2)
    assert (result.verdict, result.reason) == (Verdict.UNREACHABLE, "refused")


async def test_silent_port_is_unreachable_filtered(silent_port):
    result = await reachability.check("relay", "127.0.0.1", silent_port, timeout=0.5)
    assert (result.verdict, result.reason) == (Verdict.UNREACHABLE, "filtered")
    assert "no answer within 0.5 s" in result.detail


async def test_ipv6_loopback(refused_port):
    result = await reachability.check("relay", "::1", refused_port, timeout=2)
    assert result.verdict is Verdict.UNREACHABLE
