"""A dual-SIM modem's switches (issue 13): how long the link is gone during a switch, and how
long a standby SIM's activation by a brief switch takes.

A :class:`agent.sim.keeper.SimKeeper` with ``[modem.dual_sim]`` on the simulated Quectel
(``AT+QDSIM``, two SIMs) on a real pty, in this process; the round trip probe is a no-op (the
broker's round trip is not what is measured), the simulator's own timings (boot, SIM busy,
registration) are those of its quectel personality. ``RUNS`` times each:

- **failover gap**: the primary gets a permanent reject (EMM #7); from ``AT+CFUN=0`` (the
  switch begins: the link is down from here) to the backup SIM active with its data context up;
- **standby activation**: a standby SIM a day from its deadline (lead two days); from the
  switch to it (``AT+CFUN=0``) until the modem is back on the primary and the standby active.

Median and max are printed; nothing is asserted. The simulator registers at once, so these are
the agent's own share (the commands and the keeper's rounds); on a real gateway add the
network's registration and PDP set-up (typically seconds to tens of seconds).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench.bench_suspend import Stamped, _until

RUNS = 5
A, B = "8981100005819480014", "8981200001234567898"


async def _run(root: Path, standby: bool) -> float:
    from agent.core.config import LifecycleConfig
    from agent.core.modem_config import DualSimConfig
    from agent.core.store import Store
    from agent.core.trusted_time import TrustedClock
    from agent.sim.keeper import SimKeeper
    from drivers.channel import AtChannel
    from drivers.modem import Modem
    from drivers.simulator import SimulatedModem

    async def probe() -> None:
        return None

    sim = SimulatedModem("quectel", {"sim": {"iccid": A}, "network": {"state": "home"},
                                     "sim2": {"iccid": B, "imsi": "440101234567890"}},
                         boot_seconds=0.2, sim_busy_seconds=0.05)
    sim.commands = commands = Stamped()
    await sim.start()
    channel = await AtChannel.open(sim.path, timeout=2.0)
    store = Store(root / "bench.db")
    clock = TrustedClock(synchronised=lambda: True)
    keeper = SimKeeper(store, lambda *_a, **_k: None, data_path="agent",
                       lifecycle=LifecycleConfig(poll_interval=1), clock=clock, probe=probe,
                       register_poll=0.05, dual_sim=DualSimConfig(
                           enabled=True, min_dwell=0, standby_lead=2 * 86400))
    now = time.time()
    keeper.set_deadline(now + 30 * 86400, A)
    keeper.set_deadline(now + (86400 if standby else 30 * 86400), B)

    def state(iccid: str) -> str | None:
        summary = keeper.summary(iccid)
        return None if summary is None else str(summary["state"])

    try:
        keeper.attach(channel, await Modem(channel).init())
        keeper.start()
        if standby:
            await _until(lambda: state(B) == "active" and keeper.iccid == A
                         and sim.active_slot == 1, timeout=60)
            since = next(i for i, c in enumerate(commands) if c == "AT+QDSIM=1")
            second = next(i for i in range(since + 1, len(commands))
                          if commands[i] == "AT+QDSIM=1")  # after the inventory's
            start = max(i for i in range(second) if commands[i] == "AT+CFUN=0")
            return time.perf_counter() - commands.at[start]
        await _until(lambda: state(A) == "active" and sim.active_slot == 1
                     and keeper.dual is not None and keeper.dual.errand == "inventory-done",
                     timeout=60)
        mark = len(commands)
        sim.set_network("denied", reject_cause=7, slot=1)
        await _until(lambda: keeper.iccid == B and state(B) == "active", timeout=60)
        start = next(i for i in range(mark, len(commands)) if commands[i] == "AT+CFUN=0")
        return time.perf_counter() - commands.at[start]
    finally:
        await keeper.stop()
        await channel.close()
        store.close()
        await sim.close()


def _figures(name: str, samples: list[float]) -> None:
    print(f"{name}: n={len(samples)} median {statistics.median(samples) * 1000:.1f} ms,"
          f" max {max(samples) * 1000:.1f} ms (on the simulator; no goal)", flush=True)


async def _main() -> None:
    for name, standby in (("failover gap (AT+CFUN=0 to the backup active)", False),
                          ("standby activation (switch, activate, back)", True)):
        samples = []
        for _ in range(RUNS):
            with tempfile.TemporaryDirectory(prefix="bench-dual-") as d:
                samples.append(await _run(Path(d), standby))
        _figures(name, samples)


def main() -> None:
    asyncio.run(_main())


if __name__ == "__main__":
    main()
