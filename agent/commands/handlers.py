"""What each signed command does on this gateway: the handlers of the command processor.

:mod:`agent.commands.processor` decides whether a command may run; this module only says
what running it means, in terms of the parts the daemon owns: the SIM keeper (lifecycle
orders), the usage meter (plans, reports), the modem sessions (reset) and the state the
daemon publishes. A handler returns the result's detail; what it changes shows in ``state``
and ``events``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from agent.commands.at_console import AtConsole
from agent.commands.diagnosis import worst
from agent.commands.processor import Handler
from agent.core.store import Store
from agent.sim.conformance import Format
from agent.sim.keeper import KeeperError
from agent.sim.keepers import SimKeepers
from agent.sim.lifecycle import Readings
from agent.usage.meter import UsageMeter


def handlers(
    keepers: SimKeepers,
    usage: UsageMeter,
    store: Store,
    *,
    state: Callable[[], dict[str, Any]],
    reset_modem: Callable[[str | None], Awaitable[str]],
    decommission: Callable[[], str],
    at_console: AtConsole,
    diagnose: Callable[[], Awaitable[list[dict[str, Any]]]],
) -> Mapping[str, Handler]:
    """The handlers, over the parts they act on; ``state`` is the retained ``state`` now,
    ``reset_modem`` resets the modem holding a SIM (None: the only one), ``decommission``
    begins one, ``diagnose`` runs the diagnosis (agent.commands.diagnosis_host.live).

    An order on SIMs takes an optional ``iccid``: that SIM, else every SIM in the modems
    (agent.sim.keepers); its detail names the SIMs it acted on. ``at`` goes to one modem: the
    one its ``modem`` (a slot) or ``iccid`` names, else the only one (agent.commands.at_console)."""

    async def suspend(args: dict[str, Any]) -> str:
        await keepers.sim_known()
        readings: Readings = args.get("readings") or "keep"
        done = keepers.suspend(args["scope"], until=args.get("until"),
                               reason=args.get("reason", ""), readings=readings,
                               iccid=args.get("iccid"))
        return f"suspended ({args['scope']}; readings: {readings}): {_sims(done)}"

    async def resume(args: dict[str, Any]) -> str:
        await keepers.sim_known()
        done = keepers.resume(args.get("reason") or "order", iccid=args.get("iccid"))
        return f"resumed: {_sims(done)}"

    async def set_deadline(args: dict[str, Any]) -> str:
        await keepers.sim_known()
        done = keepers.set_deadline(float(args["deadline"]), args.get("iccid"))
        return f"deadline set: {_sims(done)}"

    async def activate(args: dict[str, Any]) -> str:
        await keepers.sim_known()
        done = keepers.activate(args.get("iccid"))
        return f"activation started: {_sims(done)}"

    def decommission_(_: dict[str, Any]) -> str:
        # agent.sim.decommission: this result goes up first, then the uplink stops, the identity
        # keys are wiped and the radio goes off.
        return decommission()

    def clear_malfunction(_: dict[str, Any]) -> str:
        if not keepers.clear_malfunction():
            raise KeeperError("no malfunction to clear")
        return "malfunction cleared"

    def update_conformance(args: dict[str, Any]) -> str:
        fmt: Format = args.get("format") or "toml"
        keepers.update_conformance(args["list"].encode(), args["signature"], fmt)
        return "conformance list installed"

    async def set_plan(args: dict[str, Any]) -> str:
        await store.run(usage.set_plan, args["iccid"], args["bytes"], args.get("cycle_day"))
        return "plan set"

    async def report_usage(args: dict[str, Any]) -> str:
        if (iccid := args.get("iccid")) is not None:
            await store.run(usage.publish, [iccid])
            return f"usage report queued: SIM {iccid}"
        ids = await store.run(usage.publish)
        return f"{len(ids)} usage report(s) queued"

    def get_state(_: dict[str, Any]) -> dict[str, Any]:
        return state()

    def reset_modem_(args: dict[str, Any]) -> Awaitable[str]:
        return reset_modem(args.get("iccid"))

    async def diagnose_(_: dict[str, Any]) -> dict[str, Any]:
        checks = await diagnose()
        return {"status": worst(checks), "checks": checks}

    async def at(args: dict[str, Any]) -> dict[str, Any]:
        if args.get("iccid") is not None:
            await keepers.sim_known()
        return await at_console.run(args["command"], modem=args.get("modem"),
                                    iccid=args.get("iccid"))

    return {
        "suspend": suspend,
        "resume": resume,
        "set-activation-deadline": set_deadline,
        "activate": activate,
        "decommission": decommission_,
        "clear-malfunction": clear_malfunction,
        "update-conformance": update_conformance,
        "set-plan": set_plan,
        "report-usage": report_usage,
        "get-state": get_state,
        "reset-modem": reset_modem_,
        "at": at,
        "diagnose": diagnose_,
    }


def _sims(iccids: list[str]) -> str:
    return ("SIM " if len(iccids) == 1 else "SIMs ") + ", ".join(iccids)
