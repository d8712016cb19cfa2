"""One owner stops the SIM keeper: under the daemon's supervisor, :meth:`SimKeeper.run` ends only
when its task is cancelled; nothing the keeper is told (a stop, an attach) makes it return, so
the supervisor never sees it "end unexpectedly" and never restarts it behind a stop."""

from __future__ import annotations

from pathlib import Path

from agent.core.tasks import Supervisor
from tests.test_keeper_harness import refused_probe, rig, until

ICCID = "8981100005819480014"


async def test_only_the_supervisor_stops_a_supervised_keeper(tmp_path: Path) -> None:
    async with rig(tmp_path, start=False, probe=refused_probe()) as r:
        supervisor = Supervisor(0.01, 0.02)
        supervisor.spawn("sim-keeper", r.keeper.run)
        try:
            await until(lambda: r.keeper.iccid == ICCID, what="running")
            await r.keeper.stop()  # the daemon's exit stack used to call it too: a no-op here
            await r.keeper.stop()  # idempotent
            reads = r.count("AT+QCCID")
            r.keeper.attach(r.channel, r.modem.profile)  # the session comes back
            await until(lambda: r.count("AT+QCCID") > reads, what="a round after the attach")
            status = supervisor.status()["sim-keeper"]
            assert status == {"running": True, "restarts": 0, "last_error": None,
                              "last_error_at": None}
        finally:
            await supervisor.stop()
        assert "sim-keeper" not in supervisor.status()


async def test_the_summaries_are_read_once_per_change_not_per_look(tmp_path: Path) -> None:
    """The runtime row and the retained state compare the summaries every second; they are
    read from the store when the keeper changed something, not on every look."""
    async with rig(tmp_path, probe=refused_probe()) as r:
        await until(lambda: r.keeper.iccid == ICCID, what="running")
        reads = 0
        real = r.keeper._sim.summaries

        def counted() -> list[dict[str, object]]:
            nonlocal reads
            reads += 1
            return real()

        r.keeper._sim.summaries = counted  # type: ignore[method-assign]
        # From here on no await: no keeper round can change anything in between.
        r.keeper._changed()
        first = r.keeper.summaries()
        for _ in range(50):
            assert r.keeper.summaries() is first
        assert reads == 1
        r.keeper.suspend("telemetry")  # an order: the summaries change
        assert r.keeper.summaries()[0]["suspension"]["scope"] == "telemetry"
        assert reads == 2
