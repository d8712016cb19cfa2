"""The remote AT console: the ``at`` command runs one AT command on one of the gateway's modems,
through the channel the agent owns, and answers with the modem's lines and final result.

- The modem: the one in the slot ``modem`` names (``modem``, ``modem2``...), or the one
  holding the SIM ``iccid`` names; without either, the only modem connected. With several
  connected and neither given, nothing is sent: the refusal lists the slots and their SIMs.
- Only what ``[commands] at_allow`` allows is sent (:mod:`agent.core.at_allow`: by default
  read-only queries), in the form that matched (upper case outside quotes).
- Nothing is sent while a decommission is under way or done, while that modem's SIM is under a
  radio suspension by operator order (a radio held off stays off), or while that modem is
  absent, hung or resetting; each refusal says why.
- It is one command in the channel's queue, with the channel's own per-command timeout (5 s):
  the keeper's and the session's commands wait for it no longer than for any other. A command
  the modem does not answer within that time is a hang, recovered as any other.
- Every command, sent or refused, is an ``at-command`` event: ``command``, ``slot`` (the
  modem's; null when the refusal came before one was chosen), ``final`` (the modem's final
  result, null when none came), ``error`` (why none came, or the refusal) and ``by`` (the id of
  the signed command that asked).

The answer (the result's detail): ``{"command", "slot", "lines": [the modem's information
lines], "final": "OK" | "ERROR" | "+CME ERROR: <n>" | ...}``. A final error is an answer, not a
failure; ``fleet at`` exits 1 for it. URCs that arrive meanwhile are not part of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from agent.commands.processor import running_command
from agent.core.at_allow import fold, refusal
from agent.core.modem_config import slot_order
from agent.sim.keeper import KeeperError
from agent.sim.keepers import SimKeepers
from drivers.channel import AtChannel
from drivers.errors import CommandError, ModemError

log = logging.getLogger(__name__)


class AtRefused(Exception):
    """A command the console does not send; the message says which and why."""


class AtConsole:
    """``allow``: the ``at_allow`` patterns; ``decommissioned()``: a decommission has begun;
    ``emit``: :meth:`agent.telemetry.events.Events.emit`. The daemon attaches the channel of
    each modem, by its slot (:meth:`attach` / :meth:`detach`)."""

    def __init__(self, allow: Sequence[str], keepers: SimKeepers, *,
                 decommissioned: Callable[[], bool], emit: Callable[..., Any]) -> None:
        self._allow = allow
        self._keepers = keepers
        self._decommissioned = decommissioned
        self._emit = emit
        self._channels: dict[str, AtChannel] = {}  # slot: its modem's channel

    def attach(self, channel: AtChannel, slot: str = "modem") -> None:
        self._channels[slot] = channel

    def detach(self, slot: str = "modem") -> None:
        self._channels.pop(slot, None)

    async def run(self, command: str, *, modem: str | None = None,
                  iccid: str | None = None) -> dict[str, Any]:
        """Send ``command`` (one AT command line) to the modem in slot ``modem``, or the one
        holding SIM ``iccid``, or the only one; raise :class:`AtRefused` when it may not be,
        the channel's error when no final result came."""
        slot, why = self._check(command, modem, iccid)
        if why is not None:
            self._event(command, slot, None, f"refused: {why}")
            raise AtRefused(f"{command}: {why}")
        assert slot is not None  # _check said so
        sent = fold(command)
        try:
            lines = await self._channels[slot].command(sent)
        except CommandError as exc:  # a final result that is an error: the modem's answer
            lines, final = [], exc.text
        except ModemError as exc:
            self._event(sent, slot, None, str(exc))
            raise
        else:
            final = "OK"
        self._event(sent, slot, final, None)
        return {"command": sent, "slot": slot, "lines": lines, "final": final}

    def _check(self, command: str, modem: str | None,
               iccid: str | None) -> tuple[str | None, str | None]:
        """The slot of the modem the command goes to (None when none is), and why it may not
        go now (None when it may)."""
        why = refusal(command, self._allow)
        if why is None and self._decommissioned():
            why = "this gateway is being decommissioned; no command goes to its modem"
        if why is not None:
            return None, why
        slot, why = self._target(modem, iccid)
        return slot, why or self._held(slot)

    def _target(self, modem: str | None, iccid: str | None) -> tuple[str | None, str | None]:
        """The modem named (by slot or by the SIM it holds), else the only one connected; with
        several connected, the refusal says which names to choose from."""
        connected = sorted(self._channels, key=slot_order)
        if modem is not None and iccid is not None:
            return None, "name the modem by its slot (modem) or by its SIM (iccid), not both"
        if iccid is not None:
            try:
                return self._keepers.targets(iccid)[0].slot, None
            except KeeperError as exc:
                return None, str(exc)
        if modem is not None:
            return modem, (None if modem in self._channels else f"no modem is connected in"
                           f" slot {modem} (connected: {', '.join(connected) or 'none'})")
        if len(connected) > 1:
            held = {k.slot: k.iccid for k in self._keepers.keepers}
            which = ", ".join(f"{s} (SIM {held.get(s) or 'not read'})" for s in connected)
            return None, (f"this gateway has {len(connected)} modems: name one by its slot"
                          f" (modem) or its SIM (iccid): {which}")
        return (connected[0] if connected else None), None

    def _held(self, slot: str | None) -> str | None:
        """Why no command may go to the modem in ``slot`` now, or None."""
        keeper = next((k for k in self._keepers.keepers if k.slot == slot), None)
        sims = keeper.summaries() if keeper is not None else []  # all seen while unread
        for sim in [s for s in sims if s["current"]] or sims:
            held = sim["suspension"]
            if held is not None and held["scope"] == "radio" and held["source"] == "operator":
                return (f"SIM {sim['iccid']} is suspended by operator order (scope radio): the"
                        " radio stays off; resume it first")
        channel = self._channels.get(slot) if slot is not None else None
        if channel is None or not channel.is_open:
            return "no modem is connected"
        state, since = channel.condition
        if state != "ready":
            return f"the modem is {state} (for {since:.0f} s); try again once it answers"
        return None

    def _event(self, command: str, slot: str | None, final: str | None,
               error: str | None) -> None:
        try:
            self._emit("at-command", command=command, slot=slot, final=final, error=error,
                       by=running_command.get())
        except Exception:  # the answer still goes back; the log says what was not recorded
            log.exception("at-command event not emitted (%s)", command)
