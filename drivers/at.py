"""Sans-IO AT codec (V.25ter / 3GPP TS 27.007 framing): bytes in, events out.

The codec never touches a port. The channel tells it which command it sends
(:meth:`AtCodec.send`), feeds it whatever bytes arrive (:meth:`AtCodec.receive_data`) and pulls
events (:meth:`AtCodec.next_event`):

- :class:`Echo`: the modem repeating the command (echo on, as modems power up): a line that
  equals the command as written (ignoring case and surrounding blanks), before any answer;
- :class:`Info`: an information line answering the command in flight;
- :class:`Final`: the result that ends the command (``OK``, ``ERROR``, ``+CME ERROR``, ...);
- :class:`Urc`: an unsolicited result code; ``banner`` is set for reboot banners (``RDY``);
- :class:`Prompt`: the ``> `` prompt of ``AT+CMGS`` and friends;
- :class:`Discarded`: bytes dropped because a line outgrew ``max_line``;
- :class:`Noise`: a line dropped as line noise (see below).

Whether a ``+CREG:`` line answers the command or is unsolicited is decided by the command in
flight and the shape of the line: ``+CREG: 2,1,"CE00","01CEAD8F"`` answers ``AT+CREG?``
(leading ``<n>``), ``+CREG: 1,"17E0","00359D48",7`` during the same command is a URC, and any
``+CREG:`` during ``AT+CSQ`` is a URC.

Echo is never guessed from position. With echo off, a modem in verbose mode (``V1``) starts
every reply with a line break, so the first line of a reply that arrives *without* one is
either framing the modem got wrong or line noise. It is classified by its shape, as any line:
a final result, a solicited ``+CSQ: 20,99`` (an :class:`Info`) or a URC. Only a bare line
without a prefix (which is what noise looks like, and what no known modem sends unframed) is
dropped as :class:`Noise`: taking it for echo once made a false "echo came back on" reset out
of every noisy reply.

Tolerated: missing blank lines, bare CR or LF, CR CR LF, NUL and control bytes, invalid UTF-8,
``+CME ERROR:58`` without a space, data arriving one byte at a time.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass

__all__ = [
    "AtCodec", "Discarded", "Echo", "Event", "Final", "Info", "Noise", "Prompt", "Urc",
    "registration_is_solicited", "response_prefixes", "split_fields", "unquote",
]


@dataclass(frozen=True, slots=True)
class Echo:
    text: str


@dataclass(frozen=True, slots=True)
class Info:
    text: str


@dataclass(frozen=True, slots=True)
class Final:
    """``kind``: ok, connect, error, cme, cms, call, modem-error, not-supported.
    ``value``: the code or text after ``+CME ERROR:`` / ``+CMS ERROR:`` / ``CONNECT``."""

    text: str
    kind: str
    value: str = ""

    @property
    def ok(self) -> bool:
        return self.kind in ("ok", "connect")


@dataclass(frozen=True, slots=True)
class Urc:
    text: str
    banner: bool = False

    @property
    def prefix(self) -> str:
        return line_prefix(self.text)


@dataclass(frozen=True, slots=True)
class Prompt:
    pass


@dataclass(frozen=True, slots=True)
class Discarded:
    nbytes: int


@dataclass(frozen=True, slots=True)
class Noise:
    """A line that is neither echo nor answer: a bare line with no line break before it, the
    first thing after a command was sent."""

    text: str


Event = Echo | Info | Final | Urc | Prompt | Discarded | Noise

_SIMPLE_FINALS = {
    "OK": "ok",
    "ERROR": "error",
    "NO CARRIER": "call",
    "BUSY": "call",
    "NO ANSWER": "call",
    "NO DIALTONE": "call",
    "ABORTED": "error",
    "COMMAND NOT SUPPORT": "not-supported",  # Huawei's answer to unknown commands
}
_CMX_ERROR = re.compile(r"\+CM([ES]) ERROR:(.+)$")
_MODEM_ERROR = re.compile(r"MODEM ERROR: *(\d+)$")
_CONNECT = re.compile(r"CONNECT(?: (.*))?$")
# Banners a modem prints when it has just (re)started: whatever was in flight is lost.
BANNERS = frozenset({
    "RDY", "POWERED DOWN", "NORMAL POWER DOWN", "^SYSSTART", "+SYSSTART", "*ATREADY: 1",
})
# Bare (prefix-less) lines that are always unsolicited, even inside a reply.
_BARE_URCS = BANNERS | {"RING", "SMS Ready", "Call Ready", "SMS DONE", "PB DONE"}
_PREFIX = re.compile(r"^([+^$#%*!][A-Za-z0-9_]+):")
_REGISTRATION = frozenset({"+CREG", "+CGREG", "+CEREG", "+C5GREG"})
# Commands whose answer carries another prefix than their name (as seen in the field).
_ALIASES = {
    "+CICCID": ("+ICCID",),
    "+CCID": ("+ICCID", "+CCID"),
    "+ZPAS": ("+BEARTYPE", "+ZPAS"),
    "+CGSN": ("+CGSN",),
    "+QCSQ": ("+QCSQ",),
}
_TERMINATOR = re.compile(rb"[\r\n]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def line_prefix(line: str) -> str:
    """``+CREG`` for ``+CREG: 1,2``; empty for a line without a prefix."""
    m = _PREFIX.match(line)
    return m.group(1).upper() if m else ""


def response_prefixes(command: str) -> tuple[str, ...]:
    """The prefixes an answer to ``command`` may carry: ``AT+CSQ`` -> ``("+CSQ",)``."""
    body = command.strip()
    if body[:2].upper() == "AT":
        body = body[2:]
    m = re.match(r"([+^$#%*!][A-Za-z0-9_]+)", body)
    if not m:
        return ("+GCAP",) if body.upper().startswith("I") else ()
    name = m.group(1).upper()
    return _ALIASES.get(name, (name,))


def split_fields(text: str) -> list[str]:
    """Split the value part of an AT line on commas outside quotes and parentheses.

    Fields keep their quotes (``'"CE00"'``) so callers can tell quoted from bare values;
    :func:`unquote` strips them."""
    fields: list[str] = []
    cur: list[str] = []
    quoted = False
    depth = 0
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch == "(":
            depth += 1
        elif not quoted and ch == ")":
            depth = max(0, depth - 1)
        elif ch == "," and not quoted and depth == 0:
            fields.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    fields.append("".join(cur).strip())
    return fields


def unquote(field: str) -> str:
    f = field.strip()
    if len(f) >= 2 and f[0] == '"' and f[-1] == '"':
        return f[1:-1]
    return f


def registration_is_solicited(raw_fields: list[str]) -> bool:
    """Whether ``+CxREG`` fields (quotes kept) are a read answer ``<n>,<stat>,...`` or a URC
    ``<stat>,...``. The first quoted field is the LAC/TAC (27.007 prints it as a string): at
    index 2 after ``<n>,<stat>``, at 1 in a URC. Unquoted: two fields are ``<n>,<stat>``, one
    or three a URC, and otherwise a short numeric second field is a ``<stat>`` (a LAC has four
    hex digits), e.g. ``2,1,84CD,00D30173`` against ``1,0001,0010,0``."""
    first_quoted = next((i for i, f in enumerate(raw_fields) if f.startswith('"')), None)
    if first_quoted in (1, 2):
        return first_quoted == 2
    if len(raw_fields) in (1, 3):
        return False
    n, stat = raw_fields[0], raw_fields[1]
    return n.isdigit() and stat.isdigit() and (len(raw_fields) == 2 or len(stat) <= 2)


def final_result(line: str) -> Final | None:
    """The final result a line stands for, or None."""
    bare = line.strip()
    kind = _SIMPLE_FINALS.get(bare)
    if kind is not None:
        return Final(bare, kind)
    m = _CMX_ERROR.match(line.lstrip())
    if m:
        return Final(bare, "cme" if m.group(1) == "E" else "cms", m.group(2).strip())
    m = _MODEM_ERROR.match(bare)
    if m:
        return Final(bare, "modem-error", m.group(1))
    m = _CONNECT.match(bare)
    if m:
        return Final(bare, "connect", (m.group(1) or "").strip())
    return None


class AtCodec:
    """Frames the byte stream of one AT port into events."""

    def __init__(self, max_line: int = 4096) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self._events: deque[Event] = deque()
        self._command: str | None = None
        self._prefixes: tuple[str, ...] = ()
        self._prompt = False
        self._fresh = False  # no line break has come since the command was sent
        self._answered = False  # an info line arrived for the command in flight

    @property
    def in_flight(self) -> str | None:
        return self._command

    def send(self, command: str, *, expect: tuple[str, ...] = (), prompt: bool = False) -> bytes:
        """Register ``command`` as in flight and return the bytes to write.

        ``expect`` adds answer prefixes to those derived from the command name;
        ``prompt`` says the command waits for ``> `` (SMS text entry)."""
        self._command = command
        self._prefixes = response_prefixes(command) + tuple(p.upper() for p in expect)
        self._prompt = prompt
        self._fresh = True
        self._answered = False
        return command.encode("ascii", "replace") + b"\r"

    def abort(self) -> None:
        """Forget the command in flight (after a timeout); later lines are URCs."""
        self._command = None
        self._fresh = False

    def receive_data(self, data: bytes) -> None:
        if b"\x00" in data:
            data = data.replace(b"\x00", b"")
        start = 0
        for m in _TERMINATOR.finditer(data):
            self._buf += data[start:m.start()]
            start = m.end()
            self._end_line()
        self._buf += data[start:]
        if len(self._buf) > self.max_line:
            self._discard()
        elif (self._prompt and self._command is not None and self._buf.strip() == b">"):
            self._buf.clear()
            self._fresh = False
            self._events.append(Prompt())

    def _discard(self) -> None:
        self._events.append(Discarded(len(self._buf)))
        self._buf.clear()
        self._fresh = False

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        out = list(self._events)
        self._events.clear()
        return out

    def _end_line(self) -> None:
        if not self._buf:
            self._fresh = False
            return
        if len(self._buf) > self.max_line:
            self._discard()
            return
        raw = bytes(self._buf)
        self._buf.clear()
        text = _CONTROL.sub("", raw.decode("utf-8", "replace").replace("\ufffd", ""))
        fresh = self._fresh
        self._fresh = False
        if not text.strip():
            return
        self._classify(text, fresh)

    def _classify(self, line: str, fresh: bool) -> None:
        command = self._command
        final = final_result(line)
        if command is None:
            self._events.append(final if final is not None else self._urc(line))
            return
        if final is not None:
            self._command = None
            self._events.append(final)
            return
        bare = line.strip()
        if not self._answered and bare.upper() == command.strip().upper():
            self._events.append(Echo(line))
            return
        prefix = line_prefix(bare)
        if bare in _BARE_URCS or (prefix and not self._solicited(prefix, bare, command)):
            self._events.append(self._urc(line))
            return
        if fresh and not prefix:
            self._events.append(Noise(line))
            return
        self._answered = True
        self._events.append(Info(line))

    def _solicited(self, prefix: str, line: str, command: str) -> bool:
        if prefix not in self._prefixes:
            return False
        if prefix in _REGISTRATION:
            tail = command.rstrip()[-1:]
            return tail == "?" and (command.rstrip().endswith("=?") or
                                    registration_is_solicited(split_fields(line.split(":", 1)[1])))
        return True

    @staticmethod
    def _urc(line: str) -> Urc:
        bare = line.strip()
        return Urc(bare, banner=bare in BANNERS)
