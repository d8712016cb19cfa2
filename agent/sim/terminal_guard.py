"""The keeper's side of terminal conformance: the signed list kept current, the verdict, and the
malfunction report.

- The list (``[conformance] list``, detached signature ``signature`` or ``<list>.sig``, operator
  key ``[commands] operator_key``) is verified with :func:`agent.sim.conformance.load_signed`; the
  last good one is kept in the store (re-verified when read back), so a corrupted, unsigned or
  replayed file leaves the agent on the list it had.
- :meth:`TerminalGuard.verdict` judges the modem against it, with the serving country when the
  MCC is known (None without a list: nothing to enforce).
- Malfunction (terms §14.3): modem hangs (one per episode, from the first timeout until the modem
  answers again, however many commands timed out) and spontaneous resets (not the ones the agent
  asked for: recovery, the ``reset-modem`` order) feed a
  :class:`agent.sim.conformance.MalfunctionDetector`; once tripped the report is persisted (a
  restart does not clear it) until :meth:`TerminalGuard.clear_malfunction`, the operator's order.
  It is a report, not a sentence: the radio stays on (a hang is not misbehaviour on the air, and
  a gateway with its radio off could never hear the order).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.sim.conformance import (
    ConformanceError,
    ConformanceList,
    Format,
    MalfunctionDetector,
    Verdict,
    check,
    load_signed,
)
from agent.sim.notes import KeeperStore
from drivers.modem import Identity

log = logging.getLogger(__name__)

_LIST_NOTE = "conformance.list"
_MALFUNCTION_NOTE = "malfunction"


def _format(path: Path) -> Format:
    return "json" if path.suffix.lower() == ".json" else "toml"


class TerminalGuard:
    def __init__(
        self,
        notes: KeeperStore,
        *,
        list_path: Path | None = None,
        signature_path: Path | None = None,
        key_path: Path | None = None,
        malfunction_resets: int = 5,
        malfunction_window: float = 3600.0,
        mono: Callable[[], float] = time.monotonic,
        slot: str = "modem",
    ) -> None:
        self._notes = notes
        # a malfunction is the terminal's: one note per modem (the first keeps the old name)
        self._malfunction_note = (_MALFUNCTION_NOTE if slot == "modem"
                                  else f"{_MALFUNCTION_NOTE}.{slot}")
        self.list_path = list_path
        self.signature_path = signature_path or (
            list_path.with_name(list_path.name + ".sig") if list_path else None)
        self.key_path = key_path
        self._mono = mono
        self.detector = MalfunctionDetector(malfunction_resets, malfunction_window)
        self.list: ConformanceList | None = None
        self.error: str | None = None  # why the configured list was last refused
        latched = notes.get(self._malfunction_note)
        self.malfunction: dict[str, Any] | None = latched if isinstance(latched, dict) else None
        self._restore()

    # -- the list --------------------------------------------------------------------------

    def _key(self) -> bytes:
        if self.key_path is None:
            raise ConformanceError("no operator key ([commands] operator_key) to verify it with")
        try:
            return self.key_path.read_bytes()
        except OSError as exc:
            raise ConformanceError(f"operator key {self.key_path}: {exc.strerror}") from None

    def _restore(self) -> None:
        saved = self._notes.get(_LIST_NOTE)
        if not isinstance(saved, dict):
            return
        try:
            self.list = load_signed(str(saved["data"]).encode(), str(saved["sig"]), self._key(),
                                    saved["fmt"])
        except (ConformanceError, KeyError) as exc:
            log.error("stored conformance list refused: %s", exc)

    def load(self) -> bool:
        """Read the configured list; True when a new list was taken. A refused list is logged,
        kept in :attr:`error`, and the last good one stays."""
        if self.list_path is None or self.signature_path is None:
            return False
        try:
            data = self.list_path.read_bytes()
            sig = self.signature_path.read_bytes()
        except OSError as exc:
            self.error = f"cannot read {exc.filename}: {exc.strerror}"
            log.error("conformance list: %s", self.error)
            return False
        try:
            self.update(data, sig.decode("ascii", "replace"), _format(self.list_path))
        except ConformanceError as exc:
            self.error = str(exc)
            log.error("conformance list %s refused (keeping v%s): %s", self.list_path,
                      self.list.version if self.list else "none", exc)
            return False
        return True

    def update(self, data: bytes, signature: str, fmt: Format) -> ConformanceList:
        """Take a new signed list (also the ``update-conformance`` order); raises
        :class:`ConformanceError` and keeps the current one when it is refused."""
        current = self.list
        new = load_signed(data, signature, self._key(), fmt, current=current)
        if current is not None and new == current:
            self.error = None
            return current
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:  # load_signed has parsed it: cannot happen
            raise ConformanceError("list is not UTF-8") from None
        self._notes.put(_LIST_NOTE, {"data": text, "sig": signature.strip(), "fmt": fmt})
        self.list, self.error = new, None
        log.info("conformance list v%d (%s) in use", new.version, new.policy)
        return new

    def verdict(self, identity: Identity | None, mcc_mnc: str | None) -> Verdict | None:
        if self.list is None or identity is None:
            return None
        return check(identity, self.list, mcc_mnc)

    # -- malfunction -----------------------------------------------------------------------

    def record(self, what: str) -> bool:
        """One hang episode or spontaneous reset; True when this one trips the report."""
        if self.malfunction is not None:
            return False
        if not self.detector.record(self._mono()):
            return False
        verdict = self.detector.verdict()
        reason = verdict.failures[0].reason if verdict else what
        self.malfunction = {"reason": reason, "last": what, "since": time.time()}
        self._notes.put(self._malfunction_note, self.malfunction)
        return True

    def clear_malfunction(self) -> bool:
        """The operator's order; False when none was latched."""
        was = self.malfunction is not None
        self.detector.clear()
        self.malfunction = None
        self._notes.put(self._malfunction_note, None)
        return was

    def summary(self) -> dict[str, Any]:
        lst = self.list
        return {
            "list_version": lst.version if lst else None,
            "policy": lst.policy if lst else None,
            "list_error": self.error,
            "malfunction": self.malfunction,
            "malfunction_signals": self.detector.count(self._mono()),
        }
