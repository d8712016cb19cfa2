"""Terminal conformance: is this modem on the operator's signed list for where it is?

The list is a TOML or JSON file signed with the operator's Ed25519 key: the signature is
detached (a ``.sig`` file beside it), base64url without padding, over the file's exact bytes.
:func:`load_signed` refuses an unsigned, mis-signed, malformed or older list with
:class:`ConformanceError`; the caller keeps the last good one. TOML shape (JSON: the same keys)::

    version = 7                         # a list older than the one in use is refused
    policy = "enforce"                  # or "warn"
    foreign_approval_countries = ["JP"] # default ["JP"] (terms §14.2)

    [[terminal]]
    manufacturer = "Quectel"
    model = "EC25"
    tac_prefixes = ["86145803"]
    min_firmware = "EC25JFAR06A06M4G"
    regions = ["JP"]
    foreign_terminal_approval = false   # the carrier approved this foreign terminal

    [terminal.certifications.JP]        # Japan's technical conformity marks
    radio_act = "003-180231"
    telecom_business_act = "D180155003"

:func:`check` judges a modem identity and the serving network's MCC against the list;
:class:`MalfunctionDetector` turns modem hangs and spontaneous resets into a malfunction report.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from agent.core import signing
from drivers.modem import Identity
from drivers.parsers import ParseError
from drivers.parsers.identity import imei_valid, parse_quectel_revision
from drivers.vendors import identify

Policy = Literal["enforce", "warn"]
Format = Literal["toml", "json"]
MAX_BYTES = 1 << 20

# Serving-network MCC -> ISO 3166 country (a small table: where gateways are deployed).
MCC_COUNTRY: Mapping[str, str] = {
    "440": "JP", "441": "JP", "450": "KR", "460": "CN", "466": "TW", "454": "HK",
    "520": "TH", "525": "SG", "502": "MY", "510": "ID", "515": "PH", "452": "VN",
    "404": "IN", "405": "IN", "505": "AU", "530": "NZ",
    **{str(m): "US" for m in range(310, 317)}, "302": "CA", "334": "MX", "724": "BR",
    "234": "GB", "235": "GB", "262": "DE", "208": "FR", "222": "IT", "214": "ES",
    "204": "NL", "228": "CH", "240": "SE", "244": "FI", "242": "NO", "238": "DK",
    "232": "AT", "260": "PL",
}
# Marks a certification must carry per country; elsewhere any non-empty mark counts.
REQUIRED_MARKS: Mapping[str, tuple[str, ...]] = {"JP": ("radio_act", "telecom_business_act")}


class ConformanceError(Exception):
    """The list was refused; the message says why. Keep using the last good list."""


@dataclass(frozen=True, slots=True)
class Terminal:
    manufacturer: str
    model: str
    tac_prefixes: tuple[str, ...]
    min_firmware: str | None = None
    certifications: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    regions: tuple[str, ...] = ()
    foreign_terminal_approval: bool = False

    def matches(self, manufacturer: str | None, model: str | None) -> bool:
        """Letters and digits only, any case; the model may carry the vendor's name in front
        (``SIMCOM_SIM7600G-H``)."""
        maker, want = _squeeze(self.manufacturer), _squeeze(self.model)
        got = _squeeze(model or "")
        return maker in _squeeze(manufacturer or "") and got in (want, maker + want)


@dataclass(frozen=True, slots=True)
class ConformanceList:
    version: int
    policy: Policy
    terminals: tuple[Terminal, ...]
    foreign_approval_countries: tuple[str, ...] = ("JP",)


@dataclass(frozen=True, slots=True)
class Failure:
    check: Literal["imei", "model", "tac", "firmware", "region", "certification", "malfunction"]
    reason: str


@dataclass(frozen=True, slots=True)
class Verdict:
    """``conforming`` when nothing failed; ``unchecked`` names checks that need what is not
    known yet (the serving country before registration)."""

    failures: tuple[Failure, ...]
    policy: Policy
    country: str | None = None
    terminal: Terminal | None = None
    unchecked: tuple[str, ...] = ()

    @property
    def conforming(self) -> bool:
        return not self.failures

    @property
    def radio_allowed(self) -> bool:
        """Policy ``enforce`` keeps the radio off until the terminal conforms."""
        return self.conforming or self.policy == "warn"

    def to_json(self) -> dict[str, Any]:
        return {
            "conforming": self.conforming, "policy": self.policy, "country": self.country,
            "failures": [{"check": f.check, "reason": f.reason} for f in self.failures],
            "unchecked": list(self.unchecked),
            "terminal": None if self.terminal is None
            else f"{self.terminal.manufacturer} {self.terminal.model}",
        }


def _squeeze(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.casefold())


# -- the signed list ------------------------------------------------------------------------


def verify(data: bytes, signature: str | bytes, public_key_pem: bytes) -> None:
    """Raise :class:`ConformanceError` unless ``signature`` (base64url, no padding) is the
    operator key's Ed25519 signature of ``data`` (agent.core.signing does the work)."""
    text = signature.decode("ascii", "replace") if isinstance(signature, bytes) else signature
    text = text.strip()
    if not text:
        raise ConformanceError("the list is not signed")
    try:
        raw = signing.decode_signature(text)
    except signing.SigningError as exc:
        raise ConformanceError(str(exc)) from None
    try:
        key = signing.load_public_key(public_key_pem)
    except signing.SigningError as exc:
        raise ConformanceError(f"operator key is {exc}") from None
    if not signing.verify(key, raw, data):
        raise ConformanceError("signature does not match the list and the operator key")


def _str(value: Any, where: str, pattern: str = r".{1,200}") -> str:
    if not isinstance(value, str) or not re.fullmatch(pattern, value):
        raise ConformanceError(f"{where}: expected a string matching {pattern}, got {value!r}")
    return value


def _strs(value: Any, where: str, pattern: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > 1000:
        raise ConformanceError(f"{where}: expected a list, got {value!r}")
    return tuple(_str(item, f"{where}[{i}]", pattern) for i, item in enumerate(value))


def _table(value: Any, where: str, keys: set[str] | str) -> dict[str, Any]:
    """A table whose keys are in ``keys``, or match it when it is a pattern."""
    if not isinstance(value, dict):
        raise ConformanceError(f"{where}: expected a table, got {value!r}")
    unknown = sorted(k for k in value if (k not in keys if isinstance(keys, set)
                                          else not re.fullmatch(keys, k)))
    if unknown:
        raise ConformanceError(f"{where}: unknown keys {unknown}")
    return value


_COUNTRY = r"[A-Z]{2}"
_TERMINAL_KEYS = {"manufacturer", "model", "tac_prefixes", "min_firmware", "certifications",
                  "regions", "foreign_terminal_approval"}


def _terminal(value: Any, where: str) -> Terminal:
    raw = _table(value, where, _TERMINAL_KEYS)
    tacs = _strs(raw.get("tac_prefixes"), f"{where}.tac_prefixes", r"[0-9]{1,8}")
    if not tacs:
        raise ConformanceError(f"{where}.tac_prefixes: at least one TAC prefix is needed")
    certs = _table(raw.get("certifications", {}), f"{where}.certifications", _COUNTRY)
    approval = raw.get("foreign_terminal_approval", False)
    if not isinstance(approval, bool):
        raise ConformanceError(f"{where}.foreign_terminal_approval: expected true or false")
    firmware = raw.get("min_firmware")
    return Terminal(
        manufacturer=_str(raw.get("manufacturer"), f"{where}.manufacturer"),
        model=_str(raw.get("model"), f"{where}.model"),
        tac_prefixes=tacs,
        min_firmware=None if firmware is None else _str(firmware, f"{where}.min_firmware"),
        certifications={
            country: {k: _str(v, f"{where}.certifications.{country}.{k}", r"[ -~]{1,100}")
                      for k, v in _table(marks, f"{where}.certifications.{country}",
                                         set(REQUIRED_MARKS.get(country, ())) or r"[a-z_]{1,40}",
                                         ).items()}
            for country, marks in certs.items()},
        regions=_strs(raw.get("regions", []), f"{where}.regions", _COUNTRY),
        foreign_terminal_approval=approval,
    )


def parse_list(data: bytes, fmt: Format) -> ConformanceList:
    """A conformance list's bytes (not verified: see :func:`load_signed`)."""
    if len(data) > MAX_BYTES:
        raise ConformanceError(f"list is {len(data)} bytes, more than {MAX_BYTES}")
    try:
        text = data.decode("utf-8")
        doc: Any = tomllib.loads(text) if fmt == "toml" else json.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, ValueError) as exc:
        raise ConformanceError(f"list is not valid {fmt.upper()}: {exc}") from None
    raw = _table(doc, "list", {"version", "policy", "foreign_approval_countries", "terminal"})
    version, policy = raw.get("version"), raw.get("policy", "enforce")
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ConformanceError(f"list.version: expected a whole number >= 0, got {version!r}")
    if policy not in get_args(Policy):
        raise ConformanceError(f"list.policy: expected 'enforce' or 'warn', got {policy!r}")
    terminals = raw.get("terminal", [])
    if not isinstance(terminals, list) or len(terminals) > 1000:
        raise ConformanceError("list.terminal: expected a list of at most 1000 terminals")
    return ConformanceList(
        version=version, policy=policy,
        terminals=tuple(_terminal(t, f"terminal[{i}]") for i, t in enumerate(terminals)),
        foreign_approval_countries=_strs(
            raw.get("foreign_approval_countries", ["JP"]), "list.foreign_approval_countries",
            _COUNTRY),
    )


def load_signed(data: bytes, signature: str | bytes, public_key_pem: bytes, fmt: Format, *,
                current: ConformanceList | None = None) -> ConformanceList:
    """Verify, then parse; a list older than ``current`` (a replayed one) is refused too."""
    verify(data, signature, public_key_pem)
    new = parse_list(data, fmt)
    if current is not None and new.version < current.version:
        raise ConformanceError(f"list version {new.version} is older than {current.version}")
    return new


# -- the checks -----------------------------------------------------------------------------


def country_of(mcc_mnc: str | None) -> str | None:
    """ISO country of a serving network's ``MCC``/``MCCMNC`` (``+COPS`` numeric); None when
    unknown."""
    return MCC_COUNTRY.get((mcc_mnc or "")[:3])


def _tokens(text: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t.casefold() for t in re.findall(r"[0-9]+|[A-Za-z]+", text)]


def firmware_at_least(revision: str, minimum: str, vendor: str) -> bool | None:
    """Whether ``revision`` is ``minimum`` or newer; None when they cannot be compared (other
    firmware families). Quectel: ``R<release>A<minor>`` (``EC25EFAR06A06M4G``); others:
    numbers compared as numbers, letters as the same family."""
    if vendor == "quectel":
        try:
            have, need = parse_quectel_revision(revision), parse_quectel_revision(minimum)
        except ParseError:
            return None
        return (have.release, have.minor) >= (need.release, need.minor)
    for got, want in zip(_tokens(revision), _tokens(minimum), strict=False):
        if got == want:
            continue
        if isinstance(got, int) and isinstance(want, int):
            return got > want
        return None
    return len(_tokens(revision)) >= len(_tokens(minimum))


def _certified(terminal: Terminal, country: str, lst: ConformanceList) -> Failure | None:
    marks = terminal.certifications.get(country, {})
    need = REQUIRED_MARKS.get(country, ())
    missing = [m for m in need if not marks.get(m)]
    if marks and not missing:
        return None
    if country in lst.foreign_approval_countries and terminal.foreign_terminal_approval and (
            set(terminal.certifications) - {country}):
        return None
    what = f"{', '.join(missing)} for {country}" if marks else f"no certification for {country}"
    if country in lst.foreign_approval_countries:
        what += " and no foreign-terminal approval"
    return Failure("certification", what)


def _judge(identity: Identity, terminal: Terminal, country: str | None,
           lst: ConformanceList) -> tuple[list[Failure], list[str]]:
    failures: list[Failure] = []
    if terminal.min_firmware is not None:
        vendor = identify(identity.manufacturer, identity.model).name
        ok = firmware_at_least(identity.revision or "", terminal.min_firmware, vendor)
        if not ok:
            failures.append(Failure("firmware", (
                f"firmware {identity.revision!r} is older than {terminal.min_firmware}"
                if ok is False else
                f"firmware {identity.revision!r} is not comparable with {terminal.min_firmware}")))
    if country is None:
        return failures, ["region", "certification"]
    if terminal.regions and country not in terminal.regions:
        failures.append(Failure("region", f"not supported in {country}"
                                          f" (regions {', '.join(terminal.regions)})"))
    cert = _certified(terminal, country, lst)
    if cert is not None:
        failures.append(cert)
    return failures, []


def check(identity: Identity, lst: ConformanceList, mcc_mnc: str | None) -> Verdict:
    """Judge a modem against ``lst`` in the country of the serving network ``mcc_mnc``
    (None before registration: region and certification stay unchecked)."""
    country = country_of(mcc_mnc)
    imei = identity.imei or ""
    imei_ok = imei_valid(imei)
    head: list[Failure] = []
    if not imei_ok:
        head.append(Failure("imei", f"IMEI {identity.imei!r} is not 15 digits with a valid"
                                    " Luhn check digit"))
    candidates = [t for t in lst.terminals if t.matches(identity.manufacturer, identity.model)]
    if not candidates:
        head.append(Failure("model", f"{identity.manufacturer} {identity.model} is not on"
                                     f" conformance list v{lst.version}"))
        return Verdict(tuple(head), lst.policy, country)
    by_tac = [t for t in candidates if imei_ok and imei.startswith(t.tac_prefixes)]
    if imei_ok and not by_tac:
        head.append(Failure("tac", f"TAC {imei[:8]!r} is not listed for"
                                   f" {identity.manufacturer} {identity.model}"))
    verdicts = []
    for terminal in by_tac or candidates[:1]:
        failures, unchecked = _judge(identity, terminal, country, lst)
        verdicts.append(Verdict((*head, *failures), lst.policy, country, terminal,
                                tuple(unchecked)))
    return min(verdicts, key=lambda v: len(v.failures))


class MalfunctionDetector:
    """``threshold`` modem hangs or spontaneous resets within ``window`` seconds make a
    malfunction (terms §14.3), reported until :meth:`clear` (the operator's order). Fed
    monotonic timestamps, one per hang episode (not per timed-out command) or reset the agent
    did not ask for."""

    def __init__(self, threshold: int = 5, window: float = 3600.0) -> None:
        if threshold < 1 or window <= 0:
            raise ValueError("threshold must be >= 1 and window > 0")
        self.threshold = threshold
        self.window = window
        self._seen: deque[float] = deque()
        self.tripped = False

    def record(self, ts: float) -> bool:
        """One hang or spontaneous reset at ``ts``; True once the detector has tripped."""
        self._seen.append(ts)
        if self.count(ts) >= self.threshold:
            self.tripped = True
        return self.tripped

    def count(self, now: float) -> int:
        """Signals within the window that ends at ``now``."""
        while self._seen and self._seen[0] <= now - self.window:
            self._seen.popleft()
        return len(self._seen)

    def verdict(self) -> Verdict | None:
        """The malfunction as a verdict (its failure names it; policy ``warn``: it is reported,
        the radio stays on), None while not tripped."""
        if not self.tripped:
            return None
        return Verdict((Failure("malfunction", f"{self.threshold} modem hangs or spontaneous"
                                               f" resets within {self.window:.0f} s"),), "warn")

    def clear(self) -> None:
        self._seen.clear()
        self.tripped = False
