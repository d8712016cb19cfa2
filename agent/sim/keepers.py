"""Every SIM on the gateway: one :class:`~agent.sim.keeper.SimKeeper` per modem, and the orders,
gates and summaries over all of them.

Each modem's SIM slot has its keeper (its lifecycle, deadline, suspension, conformance verdict
and malfunction count); the slots are named by position: ``modem`` for the first (the name a
one-modem gateway always had, so its notes carry on), then ``modem2``, ``modem3``... The
keepers share the store, the trusted clock and the conformance list.

Orders (:meth:`SimKeepers.targets`): with an ``iccid``, the keeper whose modem holds that SIM;
without one, every keeper that has read a SIM, except where acting on all would be wrong
(a deadline is one SIM's: :meth:`set_deadline` asks for the ICCID when there are several).
Each order returns the ICCIDs it acted on, for the command's result.

Gates: readings go up over whichever link the gateway uses, so they are held only when every
SIM seen refuses them (one SIM suspended leaves the other's link to carry them); with one SIM
that is exactly its own gate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from agent.core.config import Config, canonical_iccid
from agent.core.modem_config import ModemConfig, slot_name
from agent.core.store import Store
from agent.sim.conformance import Format
from agent.sim.keeper import ORDER_WAIT, KeeperError, SimKeeper
from agent.sim.lifecycle import Readings, Scope

Spawn = Callable[[str, Callable[[], Coroutine[Any, Any, None]]], None]


def task_name(index: int) -> str:
    return "sim keeper" if index == 0 else f"sim keeper {slot_name(index)}"


def probe_interface(modem: ModemConfig, index: int) -> str | None:
    """The interface the ``index``-th modem's activation probe is bound to: with several modems
    configured (a list of ports, or ``"auto"`` with a list of interfaces) and the data path the
    agent's or NetworkManager's, the modem's own, so another modem's link never proves its SIM
    active; else none (the default route, as a one-modem gateway always had)."""
    several = len(modem.ports) > 1 or (not modem.ports and isinstance(modem.interface, tuple))
    if not several or modem.data_path not in ("agent", "networkmanager"):
        return None
    return modem.interface_for(index)


def keeper_from_config(cfg: Config, store: Store, emit: Callable[..., Any], *, index: int = 0,
                       **kwargs: Any) -> SimKeeper:
    """The keeper of the ``index``-th modem's slot. With several modems, NetworkManager is told
    only of the modem's own connection, never ``radio wwan`` (every modem's); a later modem with
    no connection named is held by AT commands only. Its probe: :func:`probe_interface`."""
    kwargs.setdefault("uplink", cfg.uplink)
    kwargs.setdefault("probe_interface", probe_interface(cfg.modem, index))
    data_path, connection = cfg.modem.data_path, cfg.modem.nm_connection_for(index)
    if index > 0 and data_path == "networkmanager" and connection is None:
        data_path = "agent"
    return SimKeeper(store, emit, lifecycle=cfg.lifecycle, conformance=cfg.conformance,
                     operator_key=cfg.commands.operator_key, data_path=data_path,
                     nm_connection=connection, nm_radio=not cfg.modem.several,
                     slot=slot_name(index), dual_sim=cfg.modem.dual_sim, **kwargs)


class SimKeepers:
    """``make(index)`` builds the keeper of the ``index``-th modem's slot; :meth:`slot` makes
    it on first use and, once :meth:`start` gave a ``spawn``, runs it under the daemon's
    supervisor."""

    def __init__(self, make: Callable[[int], SimKeeper]) -> None:
        self._make = make
        self.by_index: dict[int, SimKeeper] = {}
        self._spawn: Spawn | None = None
        self.slot(0)  # the first slot exists from the start: its last SIM gates readings

    def slot(self, index: int) -> SimKeeper:
        keeper = self.by_index.get(index)
        if keeper is None:
            keeper = self.by_index[index] = self._make(index)
            if self._spawn is not None:
                self._spawn(task_name(index), keeper.run)
        return keeper

    def start(self, spawn: Spawn) -> None:
        self._spawn = spawn
        for index, keeper in sorted(self.by_index.items()):
            spawn(task_name(index), keeper.run)

    @property
    def keepers(self) -> list[SimKeeper]:
        return [k for _i, k in sorted(self.by_index.items())]

    @property
    def first(self) -> SimKeeper:
        return self.by_index[0]

    # -- orders --------------------------------------------------------------------------------

    def targets(self, iccid: str | None = None) -> list[SimKeeper]:
        """The keepers an order acts on (module doc); raises KeeperError when there are none."""
        held = [k for k in self.keepers if k.iccid is not None]
        if iccid is None:
            if not held:
                raise KeeperError("no SIM known yet in this modem" if len(self.by_index) == 1
                                  else "no SIM known yet in any modem")
            return held
        wanted = canonical_iccid(iccid)
        found = [k for k in held if k.iccid == wanted]
        if not found:
            here = ", ".join(f"{k.iccid} ({k.slot})" for k in held) or "none read yet"
            raise KeeperError(f"SIM {wanted} is in none of this gateway's modems (in use:"
                              f" {here})")
        return found

    async def sim_known(self, timeout: float = ORDER_WAIT) -> None:
        """Return once the SIM of the first modem and of every other modem present is known,
        or after ``timeout`` seconds (an order that names a SIM not read by then says so). A
        modem that is absent is not waited for."""
        waited = [k for k in self.keepers if k is self.first or k.attached]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(k.sim_known(timeout) for k in waited))

    def suspend(self, scope: Scope, until: float | None = None, reason: str = "",
                readings: Readings = "keep", iccid: str | None = None) -> list[str]:
        return _each(self.targets(iccid), lambda k: k.suspend(scope, until, reason, readings))

    def resume(self, reason: str = "order", iccid: str | None = None) -> list[str]:
        """Without ``iccid``: every suspended SIM (one that is not has nothing to resume)."""
        targets = self.targets(iccid)
        if iccid is None and len(targets) > 1:
            targets = [k for k in targets if (k.summary() or {}).get("state") == "suspended"]
            if not targets:
                raise KeeperError("no SIM in this gateway's modems is suspended")
        return _each(targets, lambda k: k.resume(reason))

    def activate(self, iccid: str | None = None) -> list[str]:
        """Try now. Without ``iccid``: every SIM that has something to activate."""
        targets = self.targets(iccid)
        errors: list[str] = []
        done: list[str] = []
        for keeper in targets:
            try:
                keeper.activate()
            except KeeperError as exc:
                errors.append(str(exc))
            else:
                done.append(str(keeper.iccid))
        if not done:
            raise KeeperError("; ".join(errors))
        return done

    def set_deadline(self, deadline: float, iccid: str | None = None) -> list[str]:
        """A deadline is one SIM's: with several SIMs, the order must name it."""
        if iccid is None:
            held = self.targets()
            if len(held) > 1:
                raise KeeperError("this gateway holds several SIMs: name the one (iccid): "
                                  + ", ".join(str(k.iccid) for k in held))
            keeper = held[0]
        else:
            wanted = canonical_iccid(iccid)
            keeper = next((k for k in self.keepers if k.iccid == wanted), self.first)
        keeper.set_deadline(deadline, iccid)
        return [canonical_iccid(iccid) if iccid else str(keeper.iccid)]

    def decommission(self, *, announce: bool = True) -> list[str]:
        return _each(self.targets(), lambda k: k.decommission(announce=announce))

    def retire(self) -> None:
        for keeper in self.keepers:
            keeper.retire()

    def clear_malfunction(self) -> bool:
        cleared = [k.clear_malfunction() for k in self.keepers]  # each terminal's, all
        return any(cleared)

    def update_conformance(self, data: bytes, signature: str, fmt: Format) -> None:
        for keeper in self.keepers:
            keeper.update_conformance(data, signature, fmt)

    def reload_manifest(self, path: Path | None = None) -> None:
        for keeper in self.keepers:
            keeper.reload_manifest(path)

    # -- gates and what it shows ---------------------------------------------------------------

    @property
    def iccid(self) -> str | None:
        """The first modem's SIM."""
        return self.first.iccid

    def telemetry_allowed(self) -> bool:
        seen = [k for k in self.keepers if k.seen]
        return not seen or any(k.telemetry_allowed() for k in seen)

    def accepting(self) -> str | None:
        refusals = [k.accepting() for k in self.keepers if k.seen]
        if not refusals or None in refusals:
            return None
        return "; ".join(dict.fromkeys(r for r in refusals if r))

    def summary(self, iccid: str | None = None) -> dict[str, Any] | None:
        """One SIM: the one named, else the first modem's."""
        if iccid is not None:
            wanted = canonical_iccid(iccid)
            for keeper in self.keepers:
                if keeper.iccid == wanted:
                    return keeper.summary()
        return self.first.summary(iccid)

    def summaries(self) -> list[dict[str, Any]]:
        """Every SIM this store has seen: those in a modem first, by slot (each with its
        ``slot``), then the rest."""
        current: list[dict[str, Any]] = []
        for keeper in self.keepers:
            mine = keeper.summaries()
            if mine and mine[0]["current"]:
                dual = keeper.dual.summary() if keeper.dual is not None else None
                current.append({**mine[0], "slot": keeper.slot, "dual_sim": dual})
        held = {s["iccid"] for s in current}
        rest = [{**s, "current": False, "slot": None}
                for s in self.first.summaries() if s["iccid"] not in held]
        return current + rest


def _each(keepers: list[SimKeeper], act: Callable[[SimKeeper], None]) -> list[str]:
    """``act`` on each keeper; the ICCIDs acted on."""
    done = []
    for keeper in keepers:
        act(keeper)
        done.append(str(keeper.iccid))
    return done
