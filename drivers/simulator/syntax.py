"""AT command-line syntax as a modem sees it (V.250): split a line into commands, fields.

Sans-IO and stateless: the engine gets ``Command`` values and raises the errors below.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Form(enum.Enum):
    EXEC = "exec"  # AT+CSQ
    READ = "read"  # AT+CREG?
    TEST = "test"  # AT+CREG=?
    SET = "set"  # AT+CREG=2


@dataclass(frozen=True)
class Command:
    name: str  # upper-case: "+CREG", "E", "I", "&F", "S0"
    form: Form
    raw_args: str = ""

    @property
    def args(self) -> list[str]:
        return split_args(self.raw_args)

    def text(self) -> str:
        suffix = {Form.EXEC: "", Form.READ: "?", Form.TEST: "=?", Form.SET: "="}[self.form]
        return f"{self.name}{suffix}{self.raw_args}"


class AtFailure(Exception):
    """A plain ``ERROR`` (unknown command, bad syntax)."""


class CmeFailure(AtFailure):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class CmsFailure(AtFailure):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


# 27.007 section 9.2 verbose texts (what AT+CMEE=2 prints).
CME_TEXT: dict[int, str] = {
    0: "phone failure",
    3: "operation not allowed",
    4: "operation not supported",
    10: "SIM not inserted",
    11: "SIM PIN required",
    12: "SIM PUK required",
    13: "SIM failure",
    14: "SIM busy",
    16: "incorrect password",
    21: "invalid index",
    22: "not found",
    30: "no network service",
    50: "Incorrect parameters",
    100: "unknown",
}
# 27.005 section 3.2.5.
CMS_TEXT: dict[int, str] = {
    302: "operation not allowed",
    303: "operation not supported",
    304: "invalid PDU mode parameter",
    310: "SIM not inserted",
    311: "SIM PIN required",
    314: "SIM busy",
    321: "invalid memory index",
    500: "unknown error",
}

_EXTENDED_START = "+^$%#*"


def split_line(line: str) -> list[Command]:
    """``AT+CMEE=2;+CREG?;E0V1`` -> commands. Raises AtFailure on a line that is not AT."""
    text = line.strip()
    if text[:2].upper() != "AT":
        raise AtFailure(text)
    rest = text[2:]
    commands: list[Command] = []
    while rest:
        if rest[0] == ";":
            rest = rest[1:]
            continue
        if rest[0] in _EXTENDED_START:
            body, rest = _take_extended(rest)
            commands.append(_extended(body))
        else:
            command, rest = _take_basic(rest)
            commands.append(command)
    return commands


def _take_extended(rest: str) -> tuple[str, str]:
    quoted = False
    for i, ch in enumerate(rest):
        if ch == '"':
            quoted = not quoted
        elif ch == ";" and not quoted:
            return rest[:i], rest[i + 1 :]
    return rest, ""


def _extended(body: str) -> Command:
    i = 1
    while i < len(body) and (body[i].isalnum() or body[i] in "_"):
        i += 1
    name, tail = body[:i].upper(), body[i:]
    if len(name) < 2:
        raise AtFailure(body)
    if tail == "":
        return Command(name, Form.EXEC)
    if tail == "?":
        return Command(name, Form.READ)
    if tail == "=?":
        return Command(name, Form.TEST)
    if tail.startswith("="):
        return Command(name, Form.SET, tail[1:])
    raise AtFailure(body)


def _take_basic(rest: str) -> tuple[Command, str]:
    head = rest[0].upper()
    i = 1
    if head == "&":
        if len(rest) < 2:
            raise AtFailure(rest)
        head, i = "&" + rest[1].upper(), 2
    elif head == "S":
        j = i
        while j < len(rest) and rest[j].isdigit():
            j += 1
        reg = "S" + rest[i:j]
        if rest[j : j + 1] == "?":
            return Command(reg, Form.READ), rest[j + 1 :]
        if rest[j : j + 1] == "=":
            k = j + 1
            while k < len(rest) and rest[k].isdigit():
                k += 1
            return Command(reg, Form.SET, rest[j + 1 : k]), rest[k:]
        raise AtFailure(rest)
    elif not head.isalpha():
        raise AtFailure(rest)
    j = i
    while j < len(rest) and rest[j].isdigit():
        j += 1
    return Command(head, Form.SET, rest[i:j]), rest[j:]


def split_args(raw: str) -> list[str]:
    """``1,"IP","a,b"`` -> ``["1", "IP", "a,b"]`` (quotes removed, spaces around trimmed)."""
    if raw.strip() == "":
        return []
    fields: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in raw:
        if ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            fields.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    fields.append("".join(current).strip())
    return fields


def int_arg(args: list[str], index: int, default: int | None = None) -> int:
    """The integer field ``index``; a missing field takes ``default``; a bad one is ERROR."""
    if index >= len(args) or args[index] == "":
        if default is None:
            raise AtFailure(f"missing field {index}")
        return default
    try:
        return int(args[index])
    except ValueError:
        raise AtFailure(args[index]) from None
