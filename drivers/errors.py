"""The error tree of the modem stack.

Every error a modem can give maps to one type here. ``TransientError`` marks the ones worth
retrying (SIM busy, a timeout, a modem rebooting); retry policies retry those and nothing else.
``+CME ERROR`` codes (3GPP TS 27.007 section 9.2) and their verbose texts map to subclasses of
``CmeError`` through one table, so a caller catches ``SimPinRequired`` whether the modem said
``+CME ERROR: 11`` or ``+CME ERROR: SIM PIN required``.
"""

from __future__ import annotations


class ModemError(Exception):
    """Base of every error raised by the modem stack."""


class TransientError(ModemError):
    """A failure that may go away by itself: retry later."""


class PortError(ModemError):
    """The port cannot be opened, is busy, or vanished."""


class CommandTimeout(TransientError):
    """No final result arrived within the command's timeout."""


class ModemHung(CommandTimeout):
    """The command was never sent: the channel spent the command's whole timeout recovering a
    hung modem (or waiting for a reset modem to come back). Not a new timeout of the modem's:
    the hang that started the recovery was reported once, when it began."""


class ModemReset(TransientError):
    """The modem rebooted (``RDY`` or another banner) while a command was in flight."""


class NotConnected(ModemError):
    """The channel is closed."""


class SimSlotsUnsupported(ModemError):
    """The modem has one SIM slot as far as the stack knows: its profile has no slot command,
    or the modem refused the vendor's (plain ``ERROR``, ``+CME ERROR: 4``)."""


class CommandError(ModemError):
    """The modem answered a plain ``ERROR`` (or a vendor's equivalent)."""

    def __init__(self, command: str, text: str = "ERROR") -> None:
        super().__init__(f"{command}: {text}")
        self.command = command
        self.text = text


class CallError(CommandError):
    """A call-control final result: ``NO CARRIER``, ``BUSY``, ``NO ANSWER``, ``NO DIALTONE``."""


class CmsError(CommandError):
    """``+CMS ERROR``: a message service error (TS 27.005 section 3.2.5)."""

    def __init__(self, command: str, code: int | None, text: str) -> None:
        super().__init__(command, f"+CMS ERROR: {text}")
        self.code = code


class CmeError(CommandError):
    """``+CME ERROR``: a mobile equipment error. ``code`` is None when the modem gave only
    text that the table does not know."""

    code: int | None = None

    def __init__(self, command: str, code: int | None, text: str) -> None:
        super().__init__(command, f"+CME ERROR: {text}")
        self.code = code


class OperationNotAllowed(CmeError):
    code = 3


class OperationNotSupported(CmeError):
    code = 4


class PhSimPinRequired(CmeError):
    code = 5


class SimNotInserted(CmeError):
    code = 10


class SimPinRequired(CmeError):
    code = 11


class SimPukRequired(CmeError):
    code = 12


class SimFailure(CmeError):
    code = 13


class SimBusy(CmeError, TransientError):
    code = 14


class SimWrong(CmeError):
    code = 15


class IncorrectPassword(CmeError):
    code = 16


class SimPin2Required(CmeError):
    code = 17


class SimPuk2Required(CmeError):
    code = 18


class MemoryFull(CmeError):
    code = 20


class NotFound(CmeError):
    code = 22


class NoNetworkService(CmeError, TransientError):
    code = 30


class NetworkTimeout(CmeError, TransientError):
    code = 31


class EmergencyCallsOnly(CmeError):
    code = 32


class DeviceBusy(CmeError, TransientError):
    """515: vendors' "device busy / please wait, init in progress" (Wavecom, Quectel)."""

    code = 515


_CME_TYPES: tuple[type[CmeError], ...] = (
    OperationNotAllowed, OperationNotSupported, PhSimPinRequired, SimNotInserted,
    SimPinRequired, SimPukRequired, SimFailure, SimBusy, SimWrong, IncorrectPassword,
    SimPin2Required, SimPuk2Required, MemoryFull, NotFound, NoNetworkService, NetworkTimeout,
    EmergencyCallsOnly, DeviceBusy,
)
CME_BY_CODE: dict[int, type[CmeError]] = {t.code: t for t in _CME_TYPES if t.code is not None}

# Verbose texts (AT+CMEE=2) from TS 27.007 section 9.2.1, lower-cased.
CME_TEXTS: dict[str, int] = {
    "phone failure": 0,
    "no connection to phone": 1,
    "operation not allowed": 3,
    "operation not supported": 4,
    "ph-sim pin required": 5,
    "sim not inserted": 10,
    "sim pin required": 11,
    "sim puk required": 12,
    "sim failure": 13,
    "sim busy": 14,
    "sim wrong": 15,
    "incorrect password": 16,
    "sim pin2 required": 17,
    "sim puk2 required": 18,
    "memory full": 20,
    "invalid index": 21,
    "not found": 22,
    "memory failure": 23,
    "text string too long": 24,
    "no network service": 30,
    "network timeout": 31,
    "network not allowed - emergency calls only": 32,
    "unknown": 100,
}


def cme_error(command: str, value: str) -> CmeError:
    """The typed error for the value of a ``+CME ERROR:`` line (a number or verbose text)."""
    text = value.strip()
    code = int(text) if text.isdigit() else CME_TEXTS.get(text.lower())
    cls = CME_BY_CODE.get(code, CmeError) if code is not None else CmeError
    err = cls(command, code, text)
    err.code = code
    return err


def cms_error(command: str, value: str) -> CmsError:
    text = value.strip()
    return CmsError(command, int(text) if text.isdigit() else None, text)
