"""The SIM lifecycle end to end: the daemon as a real process (SIGKILLed and restarted), the
simulated modem on a pty, a real mosquitto, signed commands.

- killed in the middle of an activation: it resumes and completes, no state skipped;
- killed while suspended (radio scope): it comes back suspended, puts the radio back to
  ``+CFUN=4`` and never turns it on before a resume;
- a 1970 boot clock and a clock jump past the deadline, with no trusted time: activate now,
  never expire a SIM unless the lower bound proves the deadline passed;
- a permanent network reject (#7): suspended with source ``network``, then recovery.

The wall clock of the daemon is faked by :data:`SHIM`, a launcher that replaces ``time.time``
(start value and later jumps from environment and a file) and makes the kernel's NTP flag read
"not synchronised" before the agent is imported: no hook in the agent itself. Short intervals
come from the config (:data:`FAST`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.fleet.sign import make_envelope
from drivers.simulator import SimulatedModem
from tests.broker import WAIT, Broker, Subscriber, until
from tests.test_daemon import DEVICE, Agent, online, send_command, until_async

FAST = """
[lifecycle]
poll_interval = 1
register_timeout = {register_timeout}
retry_base = 0.2
retry_min = 0.1
retry_urgent = 0.5
retry_cap = 1
network_probe_interval = 1
"""

# Runs `simkeeper` with a fake wall clock: SK_TEST_WALL is the time at start, the number in the
# file SK_TEST_JUMP (if any) is added from the moment it is written; NTP reads unsynchronised.
SHIM = """
import os, sys, time
from pathlib import Path
_real, _mono = time.time, time.monotonic
_t0 = _mono()
_base = float(os.environ["SK_TEST_WALL"])
_jump = Path(os.environ.get("SK_TEST_JUMP") or "/nonexistent/sk-jump")
_cache = [0.0, -1.0]
def _offset():
    now = _mono()
    if now - _cache[1] > 0.2:
        try:
            _cache[0] = float(_jump.read_text() or 0)
        except (OSError, ValueError):
            _cache[0] = 0.0
        _cache[1] = now
    return _cache[0]
time.time = lambda: _base + (_mono() - _t0) + _offset()
import agent.core.trusted_time as tt
class _Unsynced:
    @staticmethod
    def adjtimex(_buf):
        return 5  # TIME_ERROR
tt._libc = lambda: _Unsynced
tt._TIMESYNC_FLAG = Path("/nonexistent/sk-timesync")
from agent.cli import main
sys.exit(main(sys.argv[1:]))
"""


class LifecycleAgent(Agent):
    """:class:`tests.test_daemon.Agent` with ``[modem] data_path = "agent"`` and, when
    ``wall`` is given, the fake clock of :data:`SHIM` (for ``run`` and ``status`` alike)."""

    def __init__(self, directory: Path, broker_port: int, modem: str | list[str],
                 extra: str = "", wall: float | None = None) -> None:
        super().__init__(directory, broker_port, modem, extra)
        text = self.config.read_text().replace("[modem]\n", '[modem]\ndata_path = "agent"\n', 1)
        self.config.write_text(text)
        self.jump = directory / "clock-jump"
        self.env: dict[str, str] = {}
        self.argv = [sys.executable, "-m", "agent.cli"]
        if wall is not None:
            self.env = {"SK_TEST_WALL": repr(wall), "SK_TEST_JUMP": str(self.jump)}
            self.argv = [sys.executable, "-c", SHIM]

    async def start(self, env: dict[str, str] | None = None) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv, "--log-level", "INFO", "run", "--config", str(self.config),
                stdout=subprocess.DEVNULL, stderr=log,
                env={**os.environ, **self.env, **(env or {})},
            )
        await until(self._serving, "the agent's ingest socket")

    async def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [*self.argv, args[0], "--config", str(self.config), *args[1:]]
        return await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=WAIT, check=False,
            env={**os.environ, **self.env},
        )

    async def sim_state(self) -> dict[str, Any] | None:
        """The current SIM's lifecycle summary as `simkeeper status --json` shows it."""
        sims = (await self.status())["sims"]
        current = [s["lifecycle"] for s in sims if s["lifecycle"] and s["lifecycle"]["current"]]
        return current[0] if current else None

    async def wait_state(self, want: Callable[[dict[str, Any]], bool], what: str,
                         timeout: float = WAIT) -> dict[str, Any]:
        found: list[dict[str, Any]] = []

        async def check() -> bool:
            sim = await self.sim_state()
            if sim is not None and want(sim):
                found.append(sim)
                return True
            return False

        await until_async(check, what, timeout)
        return found[0]


def operator_key(directory: Path) -> tuple[Ed25519PrivateKey, str]:
    """A fresh operator key; its public half written, and the config lines that pin it."""
    key = Ed25519PrivateKey.generate()
    pub = directory / "operator.pub"
    pub.write_bytes(key.public_key().public_bytes(Encoding.PEM,
                                                  PublicFormat.SubjectPublicKeyInfo))
    return key, f'[commands]\noperator_key = "{pub}"\n'


@asynccontextmanager
async def lifecycle_rig(
    tmp_path: Path, broker: Broker, *, extra: str | Callable[[SimulatedModem], str] = "",
    register_timeout: float = 2,
    wall: float | None = None, before: Callable[[SimulatedModem], None] | None = None,
    scenario: dict[str, Any] | None = None,
) -> AsyncIterator[tuple[LifecycleAgent, SimulatedModem, Subscriber]]:
    """The simulator (its ``scenario``; ``before`` may set it up), the agent started, and a
    subscriber to every topic of the device. ``extra``: config lines after ``[lifecycle]``'s,
    or a function of the simulator that makes them."""
    link = tmp_path / "modem"
    sub = Subscriber(broker.port, f"simkeeper/{DEVICE}/#")
    try:
        async with SimulatedModem("quectel", scenario, link=link, boot_seconds=0.2,
                                  sim_busy_seconds=0.1) as sim:
            if before is not None:
                before(sim)
            lines = extra(sim) if callable(extra) else extra
            agent = LifecycleAgent(tmp_path, broker.port, str(link),
                                   FAST.format(register_timeout=register_timeout) + lines,
                                   wall=wall)
            await agent.start()
            try:
                yield agent, sim, sub
            finally:
                if agent.proc is not None:
                    await agent.stop(signal.SIGKILL)
    finally:
        sub.close()


def transitions(sub: Subscriber) -> list[dict[str, Any]]:
    """The lifecycle transitions that reached the broker, once each, in order."""
    seen: set[str] = set()
    out = []
    for reading in sub.readings("events"):
        data = reading["data"]
        if reading["id"] in seen or "from" not in data or "to" not in data:
            continue
        seen.add(reading["id"])
        out.append(data)
    return out


def assert_chained(steps: list[dict[str, Any]]) -> None:
    """Each transition starts where the one before ended: no state skipped."""
    for before, after in itertools.pairwise(steps):
        assert after["from"] == before["to"], steps


def manifest(directory: Path, iccid: str, deadline: float) -> str:
    path = directory / "manifest.csv"
    when = datetime.fromtimestamp(deadline, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    path.write_text(f"iccid,deadline,apn,plan_bytes\n{iccid},{when},soracom.io,\n")
    return f'manifest = "{path}"\n'


def unset_modem_clock(sim: SimulatedModem) -> None:
    """The modem's clock was never set by the network: +CCLK answers 1970."""
    start = time.monotonic()
    sim.engine.wall_clock = lambda: 3600.0 + time.monotonic() - start


# -- (a) SIGKILL in the middle of an activation ------------------------------------------------


async def test_sigkill_mid_activation_resumes_and_completes(tmp_path: Path,
                                                            broker: Broker) -> None:
    async with lifecycle_rig(tmp_path, broker, register_timeout=60,
                             before=lambda sim: sim.set_network("searching")) as (agent, sim, sub):
        await agent.wait_state(lambda s: s["state"] == "activating", "activation under way")
        await agent.stop(signal.SIGKILL)
        await agent.start()
        sim_after = await agent.wait_state(lambda s: True, "the SIM known again")
        assert sim_after["state"] == "activating"  # resumed where it was, not started over
        sim.set_network("home")
        await agent.wait_state(lambda s: s["state"] == "active", "activation completed")
        await until(lambda: any(t["to"] == "active" for t in transitions(sub)),
                    "the activation event")
        steps = transitions(sub)
    assert steps[0]["from"] == "awaiting-activation" and steps[-1]["to"] == "active"
    assert_chained(steps)
    assert [t["kind"] for t in steps].count("activation-started") == 1, steps


# -- (b) SIGKILL while suspended ---------------------------------------------------------------


async def test_sigkill_while_suspended_comes_back_suspended(tmp_path: Path,
                                                            broker: Broker) -> None:
    key, pin = operator_key(tmp_path)
    async with lifecycle_rig(tmp_path, broker, extra=pin) as (agent, sim, sub):
        await online(broker.port)
        await agent.wait_state(lambda s: s["state"] == "active", "activation")
        order = make_envelope(key, DEVICE, "suspend", {"scope": "radio", "reason": "test"})
        assert (await send_command(broker.port, order))["status"] == "ok"
        await until(lambda: sim.state.radio == 4, "AT+CFUN=4 at the simulator")
        await agent.stop(signal.SIGKILL)
        sim.set_radio(1)  # the modem lost power with the agent and came back on the air
        sim.commands.clear()
        await agent.start()
        await until(lambda: sim.state.radio == 4 and "AT+CFUN=4" in sim.commands,
                    "the radio put back to low power")
        state = await agent.wait_state(lambda s: s["state"] == "suspended", "suspended")
        assert state["suspension"]["scope"] == "radio"
        assert state["suspension"]["source"] == "operator"
        # Three whole keeper rounds: each starts with the SIM check (AT+QCCID, sent by nothing
        # else once the modem is set up) and ends with the radio and data enforcement, so the
        # fourth check means the third round is over. None of them turns the radio on.
        seen = len(sim.commands)
        await until(lambda: sim.commands[seen:].count("AT+QCCID") >= 4, "three keeper rounds")
        assert "AT+CFUN=1" not in sim.commands and sim.state.radio == 4
        resume = make_envelope(key, DEVICE, "resume")
        assert (await send_command(broker.port, resume))["status"] == "ok"
        await until(lambda: "AT+CFUN=1" in sim.commands, "the radio on after the resume")
        await agent.wait_state(lambda s: s["state"] == "active", "active again")

        def back_active() -> bool:  # resume, then activation again: every event of it is here
            kinds = [t["kind"] for t in transitions(sub)]
            return "resume" in kinds and "activation-succeeded" in kinds[kinds.index("resume"):]

        await until(back_active, "the events of the resume and the activation after it")
        assert_chained(transitions(sub))


# -- (c) a 1970 boot clock and a jump past the deadline, no trusted time -----------------------


async def test_1970_boot_clock_activates_now_and_never_expires(tmp_path: Path,
                                                               broker: Broker) -> None:
    deadline = time.time() + 30 * 86400  # far away, but nothing tells the agent so

    def before(sim: SimulatedModem) -> None:
        unset_modem_clock(sim)
        sim.set_network("searching")

    def factory_manifest(sim: SimulatedModem) -> str:  # a [lifecycle] key
        return manifest(tmp_path, sim.state.sim.iccid, deadline)

    async with lifecycle_rig(tmp_path, broker, wall=86400.0, before=before,
                             extra=factory_manifest) as (agent, sim, sub):
        state = await agent.wait_state(
            lambda s: s["deadline"] is not None and s["activation"]["attempts"] >= 1,
            "an activation attempt at once")
        assert state["trusted_time"] is None
        assert state["time_left"] is not None and state["time_left"] <= 0  # treated as near
        assert state["state"] in ("awaiting-activation", "activating")
        sim.set_network("home")
        state = await agent.wait_state(lambda s: s["state"] == "active", "activation")
        assert state["activated_at"] is not None
        # Events reach the broker in order: with the activation's, every earlier one is here.
        await until(lambda: any(t["to"] == "active" for t in transitions(sub)),
                    "the activation event")
        steps = transitions(sub)
    assert not any(t["to"] == "expired" for t in steps)


async def test_clock_jump_past_the_deadline_does_not_expire_unless_provable(
    tmp_path: Path, broker: Broker
) -> None:
    key, pin = operator_key(tmp_path)
    deadline = int(time.time()) + 86400  # tomorrow

    def before(sim: SimulatedModem) -> None:
        unset_modem_clock(sim)
        sim.set_network("searching")  # never activated: only the deadline decides

    async with lifecycle_rig(tmp_path, broker, extra=pin, wall=time.time(),
                             before=before) as (agent, _sim, sub):
        await online(broker.port)
        await agent.wait_state(lambda s: True, "the SIM known (an order needs one)")
        order = make_envelope(key, DEVICE, "set-activation-deadline", {"deadline": deadline})
        assert (await send_command(broker.port, order))["status"] == "ok"
        await agent.wait_state(lambda s: s["deadline"] == deadline, "the deadline")
        jumped = time.time() + 5 * 86400
        agent.jump.write_text(str(10 * 86400))  # the system clock jumps ten days ahead
        # The daemon stamps events with its system clock (no trusted time here): a failed
        # attempt stamped past the jump shows the daemon reads the new time, and its lifecycle
        # tick right after it (and every later one) judged the deadline on it.
        await until(lambda: any(t["kind"] == "activation-failed" and t["ts"] >= jumped
                                for t in transitions(sub)), "an attempt on the jumped clock")
        attempts = (await agent.sim_state() or {})["activation"]["attempts"]
        state = await agent.wait_state(
            lambda s: s["activation"]["attempts"] >= attempts + 2, "more keeper rounds")
        assert state["state"] in ("awaiting-activation", "activating"), state
        assert state["trusted_time"] is None and state["time_left"] <= 0
        # A deadline the lower bound (no trusted reading predates 2024) proves past: expired.
        past = make_envelope(key, DEVICE, "set-activation-deadline",
                             {"deadline": 1_700_000_000})
        assert (await send_command(broker.port, past))["status"] == "ok"
        await agent.wait_state(lambda s: s["state"] == "expired", "expired when provable")


# -- (d) a permanent network reject -------------------------------------------------------------


async def test_permanent_reject_suspends_then_recovers(tmp_path: Path, broker: Broker) -> None:
    async with lifecycle_rig(tmp_path, broker) as (agent, sim, sub):
        await agent.wait_state(lambda s: s["state"] == "active", "activation")
        sim.set_network("denied", reject_cause=7)
        state = await agent.wait_state(lambda s: s["state"] == "suspended", "barred")
        assert state["suspension"]["source"] == "network"
        assert "#7" in state["suspension"]["reason"]
        done = await agent.cli("status", "--json")
        assert json.loads(done.stdout)["running"] is True
        sim.set_network("home")
        state = await agent.wait_state(lambda s: s["state"] == "active", "recovered")
        assert state["suspension"] is None
        await until(lambda: any(t["kind"] == "network-recovered" for t in transitions(sub)),
                    "the recovery event")
        assert_chained(transitions(sub))
