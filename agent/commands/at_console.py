"""The remote AT console: the ``at`` command runs one AT command on the modem that carries the
SIM, through the channel the agent owns, and answers with the modem's lines and final result.

- Only what ``[commands] at_allow`` allows is sent (:mod:`agent.core.at_allow`: by default
  read-only queries), in the form that matched (upper case outside quotes).
- Nothing is sent while a decommission is under way or done, while the SIM is under a radio
  suspension by operator order (a radio held off stays off), or while the modem is absent, hung
  or resetting; each refusal says why.
- It is one command in the channel's queue, with the channel's own per-command timeout (5 s):
  the keeper's and the session's commands wait for it no longer than for any other. A command
  the modem does not answer within that time is a hang, recovered as any other.
- Every command, sent or refused, is an ``at-command`` event: ``command``, ``final`` (the
  modem's final result, null when none came), ``error`` (why none came, or the refusal) and
  ``by`` (the id of the signed command that asked).

The answer (the result's detail): ``{"command", "lines": [the modem's information lines],
"final": "OK" | "ERROR" | "+CME ERROR: <n>" | ...}``. A final error is an answer, not a
failure; ``fleet at`` exits 1 for it. URCs that arrive meanwhile are not part of it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from agent.commands.processor import running_command
from agent.core.at_allow import fold, refusal
from agent.sim.keepers import SimKeepers
from drivers.channel import AtChannel
from drivers.errors import CommandError, ModemError

log = logging.getLogger(__name__)


class AtRefused(Exception):
    """A command the console does not send; the message says which and why."""


class AtConsole:
    """``allow``: the ``at_allow`` patterns; ``decommissioned()``: a decommission has begun;
    ``emit``: :meth:`agent.telemetry.events.Events.emit`. The daemon attaches the channel of
    the modem that carries the SIM (:meth:`attach` / :meth:`detach`)."""

    def __init__(self, allow: Sequence[str], keeper: SimKeepers, *,
                 decommissioned: Callable[[], bool], emit: Callable[..., Any]) -> None:
        self._allow = allow
        self._keeper = keeper
        self._decommissioned = decommissioned
        self._emit = emit
        self._channel: AtChannel | None = None

    def attach(self, channel: AtChannel) -> None:
        self._channel = channel

    def detach(self) -> None:
        self._channel = None

    async def run(self, command: str) -> dict[str, Any]:
        """Send ``command`` (one AT command line); raise :class:`AtRefused` when it may not be,
        the channel's error when no final result came."""
        why = refusal(command, self._allow) or self._held()
        if why is not None:
            self._event(command, None, f"refused: {why}")
            raise AtRefused(f"{command}: {why}")
        assert self._channel is not None  # _held() said so
        sent = fold(command)
        try:
            lines = await self._channel.command(sent)
        except CommandError as exc:  # a final result that is an error: the modem's answer
            lines, final = [], exc.text
        except ModemError as exc:
            self._event(sent, None, str(exc))
            raise
        else:
            final = "OK"
        self._event(sent, final, None)
        return {"command": sent, "lines": lines, "final": final}

    def _held(self) -> str | None:
        """Why no command may go to the modem now, or None."""
        if self._decommissioned():
            return "this gateway is being decommissioned; no command goes to its modem"
        sims = self._keeper.summaries()  # the SIM in the slot first; all seen while unread
        current = [s for s in sims if s["current"]] or sims
        for sim in current:
            held = sim["suspension"]
            if held is not None and held["scope"] == "radio" and held["source"] == "operator":
                return (f"SIM {sim['iccid']} is suspended by operator order (scope radio): the"
                        " radio stays off; resume it first")
        channel = self._channel
        if channel is None or not channel.is_open:
            return "no modem is connected"
        state, since = channel.condition
        if state != "ready":
            return f"the modem is {state} (for {since:.0f} s); try again once it answers"
        return None

    def _event(self, command: str, final: str | None, error: str | None) -> None:
        try:
            self._emit("at-command", command=command, final=final, error=error,
                       by=running_command.get())
        except Exception:  # the answer still goes back; the log says what was not recorded
            log.exception("at-command event not emitted (%s)", command)
