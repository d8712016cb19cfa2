"""Every SIM on the gateway (issue 13): two modems, each on its own pty with its own simulated
SIM, one agent as a real process, a real mosquitto, signed commands.

Each SIM is activated and metered on its own (no counter of one modem counts for the other),
an order that names a SIM acts on that SIM only, an order without one acts on every SIM (or
says which it needs), and every SIM's state survives SIGKILL and restart.
"""

from __future__ import annotations

import json
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.fleet.sign import make_envelope
from drivers.simulator import SimulatedModem
from tests.broker import Broker, Subscriber, until
from tests.test_daemon import DEVICE, online, send_command, until_async
from tests.test_e2e_lifecycle import FAST, LifecycleAgent, operator_key

A, B = "8981100005819480014", "8981100005819480022"
IMSI = {A: "295050912345678", B: "295050912345679"}


@asynccontextmanager
async def two_modems(tmp_path: Path, broker: Broker) -> AsyncIterator[
        tuple[LifecycleAgent, dict[str, SimulatedModem], Any]]:
    """The agent on two simulated modems (slot ``modem`` holds SIM A, ``modem2`` SIM B), both
    SIMs in the factory manifest with a deadline a month away."""
    key, pin = operator_key(tmp_path)
    deadline = datetime.fromtimestamp(datetime.now(UTC).timestamp() + 30 * 86400, UTC)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("iccid,deadline,apn,plan_bytes\n" + "".join(
        f"{i},{deadline:%Y-%m-%dT%H:%M:%SZ},soracom.io,\n" for i in (A, B)))
    async with AsyncExitStack() as stack:
        sims = {}
        for iccid in (A, B):
            sims[iccid] = await stack.enter_async_context(SimulatedModem(
                "quectel", {"sim": {"iccid": iccid, "imsi": IMSI[iccid]}},
                link=tmp_path / f"modem-{iccid[-2:]}", boot_seconds=0.2, sim_busy_seconds=0.1))
        agent = LifecycleAgent(tmp_path, broker.port,
                               [str(tmp_path / f"modem-{i[-2:]}") for i in (A, B)],
                               FAST.format(register_timeout=2) + f'manifest = "{manifest}"\n'
                               + pin)
        agent.config.write_text(agent.config.read_text().replace(
            "[modem]\n", "[modem]\npoll_interval = 1\n", 1))
        await agent.start()
        try:
            yield agent, sims, key
        finally:
            if agent.proc is not None:
                await agent.stop(signal.SIGKILL)


async def _sims(agent: LifecycleAgent) -> dict[str, dict[str, Any]]:
    """Every SIM ``status --json`` shows, by ICCID: its lifecycle and usage."""
    return {s["iccid"]: s for s in (await agent.status())["sims"]}


async def _until_sims(agent: LifecycleAgent, what: str, check: Any) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    async def done() -> bool:
        sims = await _sims(agent)
        if check(sims):
            seen.append(sims)
            return True
        return False

    await until_async(done, what)
    return seen[0]


def _state(sims: dict[str, Any], iccid: str) -> str | None:
    lc = sims.get(iccid, {}).get("lifecycle")
    return lc["state"] if lc and lc["current"] else None


async def _until_reported(port: int, key: Any, device: Subscriber, want: dict[str, int],
                          iccid: str | None = None) -> None:
    """Signed report-usage (for ``iccid``, or every SIM) until the last reports of the SIMs
    in ``want`` count exactly those bytes up from the modem's counters (a report with the
    ``modem`` source proves that SIM's modem was read: a 0 is a count, not an absence)."""

    def last() -> dict[str, int]:
        found = {}
        for r in device.readings("usage"):
            if "modem" in r["data"]["counters"]:
                found[r["data"]["iccid"]] = r["data"]["bytes_up"]
        return found

    async def reported() -> bool:
        answer = await send_command(port, make_envelope(
            key, DEVICE, "report-usage", {} if iccid is None else {"iccid": iccid}))
        assert answer["status"] == "ok", answer
        return {i: last().get(i) for i in want} == want

    await until_async(reported, f"usage reports counting {want}")


async def test_two_modems_each_sim_kept_metered_and_ordered_on_its_own(
        tmp_path: Path, broker: Broker) -> None:
    device = Subscriber(broker.port, f"simkeeper/{DEVICE}/#")
    try:
        async with two_modems(tmp_path, broker) as (agent, sims, key):
            await online(broker.port)
            both = await _until_sims(agent, "both SIMs activated, each in its own slot",
                                     lambda s: _state(s, A) == _state(s, B) == "active")
            assert both[A]["lifecycle"]["slot"] == "modem"
            assert both[B]["lifecycle"]["slot"] == "modem2"
            status = await agent.status()
            assert sorted(m["slot"] for m in status["modems"]) == ["modem", "modem2"]
            assert sorted(m["modem"]["sim"]["iccid"] for m in status["modems"]) == [A, B]
            # Each activation is its own event; the retained state shows both SIMs in use.
            await until(lambda: {r["data"]["iccid"] for r in device.readings("events")
                                 if r["data"].get("to") == "active"} == {A, B},
                        "both activation events")
            await until(lambda: _retained_slots(device) == {A: "modem", B: "modem2"},
                        "the retained state with both SIMs")

            # Metered apart: traffic on A's modem only. B's counters are read too (the "did not
            # happen" proof: its modem was polled while A's moved), and count nothing.
            # Metered apart: traffic on A's modem, then on B's. Each report comes from a
            # signed report-usage (the runtime row is not rewritten for counters alone).
            await until(lambda: sims[A].add_traffic(60_000, 0), "traffic on A's modem")
            await _until_reported(broker.port, key, device, {A: 60_000, B: 0})
            await until(lambda: sims[B].add_traffic(25_000, 0), "traffic on B's modem")
            await _until_reported(broker.port, key, device, {A: 60_000, B: 25_000}, iccid=B)

            # An order naming B acts on B only.
            answer = await send_command(broker.port, make_envelope(
                key, DEVICE, "suspend", {"scope": "data", "iccid": B, "reason": "unpaid"}))
            assert answer["status"] == "ok", answer
            assert answer["detail"] == f"suspended (data; readings: keep): SIM {B}"
            after = await _until_sims(agent, "B suspended", lambda s: _state(s, B) == "suspended")
            assert _state(after, A) == "active" and after[A]["lifecycle"]["suspension"] is None
            assert any(c.startswith("AT+CGACT=0") for c in sims[B].commands)
            assert not any(c.startswith("AT+CGACT=0") for c in sims[A].commands)

            # A deadline is one SIM's: without an ICCID the order says which it needs.
            answer = await send_command(broker.port, make_envelope(
                key, DEVICE, "set-activation-deadline", {"deadline": 2_000_000_000}))
            assert answer["status"] == "failed", answer
            assert f"name the one (iccid): {A}, {B}" in answer["detail"]
            # An ICCID no modem holds is refused, saying what is in use.
            answer = await send_command(broker.port, make_envelope(
                key, DEVICE, "resume", {"iccid": "8981100000000000001"}))
            assert answer["status"] == "failed", answer
            assert "in none of this gateway's modems" in answer["detail"]

            # Every SIM's state survives SIGKILL and restart.
            await agent.stop(signal.SIGKILL)
            await agent.start()
            back = await _until_sims(agent, "both SIMs read again after the restart", lambda s: (
                _state(s, A) is not None and _state(s, B) is not None))
            assert _state(back, A) == "active" and _state(back, B) == "suspended"
            assert back[B]["lifecycle"]["suspension"]["reason"] == "unpaid"
            await _until_reported(broker.port, key, device, {A: 60_000, B: 25_000})

            # Without an ICCID, an order acts on every SIM it applies to, and names them.
            answer = await send_command(broker.port, make_envelope(key, DEVICE, "resume", {}))
            assert answer["status"] == "ok", answer
            assert answer["detail"] == f"resumed: SIM {B}"  # the one suspended
            await _until_sims(agent, "both SIMs active again",
                              lambda s: _state(s, A) == _state(s, B) == "active")
            answer = await send_command(broker.port, make_envelope(
                key, DEVICE, "suspend", {"scope": "telemetry"}))
            assert answer["detail"] == f"suspended (telemetry; readings: keep): SIMs {A}, {B}"
            await _until_sims(agent, "both SIMs suspended",
                              lambda s: _state(s, A) == _state(s, B) == "suspended")
            answer = await send_command(broker.port, make_envelope(key, DEVICE, "resume", {}))
            assert answer["detail"] == f"resumed: SIMs {A}, {B}", answer
    finally:
        device.close()


def _retained_slots(sub: Subscriber) -> dict[str, str]:
    states = [json.loads(m.payload) for m in sub.on("state")]
    return {s["iccid"]: s["slot"] for s in states[-1]["sims"] if s["current"]} if states else {}
