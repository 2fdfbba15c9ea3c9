"""A re-test shows, per check, what changed: fixed, still open, newly open."""

from fakes import smtp as fakes
from support import running_app, wait_done

from app.probes.smtp import VARIANTS

# The fake accepts every form but delivers nothing (no sink here): the 11 recipient forms addressed to the server
# itself are closed/accepted_as_local whether it is open or not, so only the other 11 rows change.
FOREIGN = {f"relay.{v.id}" for v in VARIANTS if not v.to_target}


def changed(data) -> dict[str, str | None]:
    return {c["name"]: c["change"] for c in data["checks"] if c["change"] is not None}


class Switchable(fakes.OpenRelay):
    """Relays while `open`; refuses like a closed Postfix afterwards (the owner fixed it)."""

    open = True

    def rcpt(self, conn, arg):
        return super().rcpt(conn, arg) if self.open else fakes.Policy.rcpt(self, conn, arg)


async def test_a_fixed_relay_shows_fixed_on_the_retest(settings):
    policy = Switchable()
    async with fakes.FakeSmtpServer(policy) as server:
        settings.relay_ports = [server.port]
        settings.proxy_ports = []
        async with running_app(settings) as client:
            first = (await client.post("/api/v1/audits", json={"target": "self", "checks": ["relay"]})).json()["id"]
            data = await wait_done(client, first)
            assert data["summary"]["relay"] == "open"
            policy.open = False
            second = (await client.post(f"/api/v1/audits/{first}/retest")).json()["id"]
            data = await wait_done(client, second)
            assert data["summary"]["relay"] == "closed"
            assert changed(data) == dict.fromkeys(FOREIGN, "fixed")
            page = (await client.get(f"/audits/{second}")).text
            assert "11 fixed" in page and "We found no open relay" in page
            policy.open = True
            third = (await client.post(f"/api/v1/audits/{second}/retest")).json()["id"]
            data = await wait_done(client, third)
            assert changed(data) == dict.fromkeys(FOREIGN, "newly_open")
            fourth = (await client.post(f"/api/v1/audits/{third}/retest")).json()["id"]
            data = await wait_done(client, fourth)
            assert changed(data) == dict.fromkeys(FOREIGN, "still_open")
            assert "11 still open" in (await client.get(f"/audits/{fourth}")).text


async def test_inside_the_cooldown_the_retest_button_says_when(settings):
    settings.target_cooldown = 300
    async with running_app(settings) as client:
        audit_id = (await client.post("/api/v1/audits/self")).json()["id"]
        await wait_done(client, audit_id)
        page = (await client.get(f"/audits/{audit_id}")).text
        assert "disabled" in page and "a new test is possible from" in page
