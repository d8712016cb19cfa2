"""A modem session against the simulator on a real pty: it initialises, polls, meters usage,
re-initialises after a reset, re-opens a port that vanished, shows the modem's real state (hung,
resetting) with since when, and counts timeouts, hang episodes and resets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from agent.modem.session import ModemSession
from agent.usage.meter import Counters
from drivers.simulator import SimulatedModem
from tests.broker import until

Observed = list[tuple[str, str, Counters, str]]


@asynccontextmanager
async def session_on(
    port: str, observed: Observed | None = None, **kwargs: Any
) -> AsyncIterator[ModemSession]:
    async def observe(iccid: str, source: str, counters: Counters, epoch: str) -> None:
        assert observed is not None
        observed.append((iccid, source, counters, epoch))

    session = ModemSession(
        port, observe=observe if observed is not None else None,
        reopen_min=0.1, reopen_max=0.3, **kwargs,
    )
    task = asyncio.create_task(session.run())
    try:
        yield session
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert session.state == "stopped"


@asynccontextmanager
async def serving(
    personality: str = "quectel",
    observed: Observed | None = None,
    link: Path | None = None,
    **kwargs: Any,
) -> AsyncIterator[tuple[SimulatedModem, ModemSession]]:
    sim = SimulatedModem(personality, link=link, boot_seconds=0.2, sim_busy_seconds=0.1)
    async with sim, session_on(str(link or sim.path), observed, **kwargs) as session:
        yield sim, session


def ready(session: ModemSession) -> Callable[[], bool]:
    return lambda: session.state == "ready" and session.info is not None


async def test_session_reads_the_modem_and_meters_its_counters() -> None:
    observed: Observed = []
    async with serving("quectel", observed, poll_interval=0.2) as (sim, session):
        flowing = sim.add_traffic(1000, 5000)  # counted while a PDP context is active
        await until(ready(session), "first poll")
        await until(lambda: len(observed) >= 2, "two polls metered")
    info = session.info
    assert info is not None
    assert info["imei"] == sim.personality.imei
    assert info["registration"]["state"] == "roaming"
    assert session.iccid == sim.state.sim.iccid
    iccid, source, counters, epoch = observed[0]
    assert (iccid, source, epoch) == (sim.state.sim.iccid, "modem", sim.personality.imei)
    assert (counters.tx_bytes, counters.rx_bytes) == ((1000, 5000) if flowing else (0, 0))
    summary = session.summary()
    assert summary["port"] == sim.path and summary["modem"] == info


async def test_a_modem_without_counters_is_not_metered_from_the_modem() -> None:
    observed: Observed = []
    async with serving("simcom", observed, poll_interval=0.2) as (_sim, session):
        await until(ready(session), "first poll")
        first = session.polled_at
        await until(lambda: session.polled_at != first, "another poll")
    assert all(source != "modem" for _, source, _, _ in observed)


async def test_reset_re_initialises_at_once_and_is_counted() -> None:
    async with serving(poll_interval=60) as (sim, session):
        await until(ready(session), "first poll")
        inits = sim.commands.count("ATE0")
        sim.reboot()
        await until(lambda: len(session.malfunctions.resets) == 1, "reset counted")
        await until(lambda: sim.commands.count("ATE0") > inits, "init after reset")
        await until(lambda: session.info is not None and session.info["imei"] is not None,
                    "modem read again")
    assert session.summary()["resets"] == 1
    assert session.malfunctions.within(60, session.malfunctions.resets[-1]) == (0, 1)


async def test_port_that_vanishes_is_reopened_when_it_comes_back(tmp_path: Path) -> None:
    link = tmp_path / "modem"
    async with serving(link=link, poll_interval=60) as (sim, session):
        await until(ready(session), "first poll")
        sim.vanish(reappear_after=0.5)
        await until(lambda: session.state == "lost", "port lost")
        await until(lambda: session.reopens == 1 and session.state == "ready", "back")
        assert session.info is not None and session.info["imei"] == sim.personality.imei


async def test_a_port_that_never_was_is_retried_not_fatal(tmp_path: Path) -> None:
    async with session_on(str(tmp_path / "nothing"), poll_interval=60) as session:
        await until(lambda: session.state == "lost", "lost")
        assert "no such port" in (session.detail or "")
        await asyncio.sleep(0.3)
        assert session.state == "lost"


async def test_timeouts_are_counted_with_their_time() -> None:
    async with serving(poll_interval=0.2, command_timeout=0.2) as (sim, session):
        await until(ready(session), "first poll")
        sim.silence(1.5)
        await until(lambda: len(session.malfunctions.timeouts) >= 1, "timeout counted")
        await until(lambda: session.consecutive_timeouts == 0, "modem answering again")
    timeouts, _ = session.malfunctions.within(60, session.malfunctions.timeouts[-1])
    assert timeouts >= 1


async def test_stop_while_a_command_is_in_flight_is_not_lost() -> None:
    async with asyncio.timeout(10):  # a lost cancellation would keep the session polling
        async with serving(poll_interval=0.1, command_timeout=5) as (sim, session):
            await until(ready(session), "first poll")
            sim.silence(30)
            ignored = sim.ignored
            await until(lambda: sim.ignored > ignored, "a command waiting on the silent modem")


class States:
    """Every state the session shows, with its ``since`` (its ``on_change`` hook)."""

    def __init__(self) -> None:
        self.session: ModemSession | None = None
        self.seen: list[tuple[str, float | None]] = []

    def __call__(self) -> None:
        s = self.session
        if s is None:
            return
        now = (s.state, s.summary().get("since"))
        if not self.seen or self.seen[-1] != now:
            self.seen.append(now)

    def names(self) -> list[str]:
        return [name for name, _ in self.seen]


async def test_a_hang_shows_as_hung_and_is_one_episode() -> None:
    states = States()
    async with serving(poll_interval=0.1, command_timeout=0.3, on_change=states) as (
            sim, session):
        states.session = session
        await until(ready(session), "first poll")
        began = time.time()
        sim.silence(1.5)  # many commands time out in it
        await until(lambda: session.state == "hung", "hung")
        hung = session.summary()
        assert hung["since"] >= began and "recovery" in (hung["detail"] or "")
        await until(lambda: session.state == "ready" and not sim.silent, "answering again")
        summary, names = session.summary(), states.names()
    assert summary["hangs"] == 1 and summary["timeouts"] >= 2
    assert summary["last_hang"] is not None and summary["last_hang"] >= began
    assert summary["since"] >= hung["since"]
    assert names[-2:] == ["hung", "ready"]


async def test_a_requested_reset_shows_as_resetting_then_ready() -> None:
    states = States()
    async with serving(poll_interval=60, on_change=states) as (sim, session):
        states.session = session
        await until(ready(session), "first poll")
        inits = sim.commands.count("ATE0")
        began = time.time()
        assert await session.reset() == f"modem {sim.path} reset"
        await until(lambda: "resetting" in states.names(), "resetting")
        await until(lambda: sim.commands.count("ATE0") > inits, "initialised again")
        await until(lambda: session.state == "ready", "ready again")
        summary = session.summary()
    since = states.seen[states.names().index("resetting")][1]
    assert since is not None and since >= began and summary["since"] >= since
    assert summary["resets"] == 1 and summary["hangs"] == 0
