"""Why the network refused the SIM, and how long to wait before asking again.

Classification follows ``shared/corpus/reject_causes.md`` §5:

- ``permanent``: the SIM, the device or the subscription is barred or suspended (EMM/GMM #3,
  #6, #7, #8; ESM #8 operator-determined barring, #33 not subscribed; ``+CME ERROR`` 103, 106,
  107, 108, 133, 177). Retrying will not help: the lifecycle suspends the SIM (source
  ``network``) and the agent only probes at :attr:`Backoff.probe` intervals.
- ``temporary``: congestion, network failure, stale identity, unknown causes. Retry with
  :class:`Backoff`.
- ``not-sim``: the SIM is fine, the place or the configuration is not: PLMN or area not
  allowed (#11-#15), wrong APN or credentials (ESM #27-#29). Retry with :class:`Backoff`; fix
  the APN or move.

``layer`` says what a permanent reject stops: ``mobility`` (attach refused: the radio is
useless) or ``session`` (the bearer refused: data is).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Literal

from agent.core.backoff import Backoff as JitterBackoff
from drivers.parsers.network import ErrorReport, Registration

Kind = Literal["permanent", "temporary", "not-sim"]
Layer = Literal["mobility", "session"]
Origin = Literal["emm", "esm", "cme"]


@dataclass(frozen=True, slots=True)
class Reject:
    """A classified refusal; ``code`` is the raw number as ``origin`` numbers it."""

    kind: Kind
    layer: Layer
    reason: str
    origin: Origin
    code: int


# EMM (TS 24.301 Annex A) / MM-GMM (TS 24.008) causes share their numbers.
_MOBILITY: dict[int, tuple[Kind, str]] = {
    2: ("temporary", "IMSI unknown in HSS/HLR: SIM not provisioned yet"),
    3: ("permanent", "illegal UE: SIM barred, cloned or deactivated"),
    5: ("temporary", "IMEI not accepted"),
    6: ("permanent", "illegal ME: device (IMEI) barred"),
    7: ("permanent", "EPS/GPRS services not allowed: data suspended or not subscribed"),
    8: ("permanent", "EPS and non-EPS services not allowed: subscription barred or suspended"),
    9: ("temporary", "UE identity cannot be derived by the network"),
    10: ("temporary", "implicitly detached"),
    11: ("not-sim", "PLMN not allowed (no roaming agreement or barred PLMN)"),
    12: ("not-sim", "tracking/location area not allowed"),
    13: ("not-sim", "roaming not allowed in this area"),
    14: ("not-sim", "EPS/GPRS services not allowed in this PLMN"),
    15: ("not-sim", "no suitable cells in this area"),
    17: ("temporary", "network failure"),
    18: ("not-sim", "CS domain not available"),
    19: ("temporary", "ESM failure: see the session cause"),
    22: ("temporary", "congestion"),
    25: ("not-sim", "not authorized for this CSG"),
    35: ("not-sim", "requested service option not authorized in this PLMN"),
}

# ESM (TS 24.301 Annex B) / SM (TS 24.008 Annex I) causes.
_SESSION: dict[int, tuple[Kind, str]] = {
    8: ("permanent", "operator determined barring: service suspended or unpaid"),
    26: ("temporary", "insufficient resources"),
    27: ("not-sim", "missing or unknown APN"),
    28: ("not-sim", "unknown PDN type or address"),
    29: ("not-sim", "user authentication failed: APN credentials rejected"),
    30: ("temporary", "request rejected by the serving or PDN gateway"),
    31: ("temporary", "request rejected, unspecified"),
    32: ("not-sim", "service option not supported"),
    33: ("permanent", "requested service option not subscribed: data not subscribed or barred"),
    34: ("temporary", "service option temporarily out of order"),
    50: ("not-sim", "PDN type IPv4 only allowed"),
    51: ("not-sim", "PDN type IPv6 only allowed"),
    65: ("temporary", "maximum number of bearers reached"),
    66: ("not-sim", "APN not supported in this RAT and PLMN"),
}

# +CME ERROR codes (TS 27.007 §9.2) that are not 100 + a cause.
_CME: dict[int, tuple[Kind, Layer, str]] = {
    14: ("temporary", "mobility", "SIM busy"),
    30: ("temporary", "mobility", "no network service"),
    31: ("temporary", "mobility", "network timeout"),
    32: ("temporary", "mobility", "network not allowed, emergency calls only"),
    148: ("temporary", "session", "unspecified GPRS error"),
    149: ("not-sim", "session", "PDP authentication failure"),
    177: ("permanent", "session", "operator determined barring"),
    515: ("temporary", "mobility", "device busy"),
}


def classify_mobility(cause: int) -> Reject:
    """An EMM/GMM/MM reject cause (``+CEREG``/``+CGREG``/``+CREG`` reject fields, ``+CEER``)."""
    kind, reason = _MOBILITY.get(cause, ("temporary", f"unlisted mobility cause #{cause}"))
    return Reject(kind, "mobility", reason, "emm", cause)


def classify_session(cause: int) -> Reject:
    """An ESM/SM cause (bearer or PDP context activation)."""
    kind, reason = _SESSION.get(cause, ("temporary", f"unlisted session cause #{cause}"))
    return Reject(kind, "session", reason, "esm", cause)


def classify_cme(code: int) -> Reject | None:
    """A ``+CME ERROR`` code; None when it is not a network refusal (PIN, SIM absent or faulty,
    generic errors such as 100 ``unknown``: the SIM-state logic owns those)."""
    if code in _CME:
        kind, layer, reason = _CME[code]
        return Reject(kind, layer, reason, "cme", code)
    if 101 <= code <= 125:  # 27.007 §9.2.2: 100 + EMM/GMM cause
        return replace(classify_mobility(code - 100), origin="cme", code=code)
    if 126 <= code <= 134:  # 100 + ESM/SM cause
        return replace(classify_session(code - 100), origin="cme", code=code)
    if 101 <= code <= 190:
        return Reject("temporary", "session", f"network refused (+CME ERROR {code})", "cme", code)
    return None


def classify_registration(reg: Registration) -> Reject | None:
    """A registration record denied (``stat`` 3) with a 3GPP cause; None when it is not denied
    or carries no 3GPP cause (then ask ``AT+CEER``)."""
    if reg.state != "denied" or reg.reject_cause is None or reg.cause_type not in (None, 0):
        return None
    return classify_mobility(reg.reject_cause)


def classify_ceer(report: ErrorReport) -> Reject | None:
    """An ``AT+CEER`` report with a cause; an ``SM``/``ESM`` category means a session cause."""
    if report.cause is None:
        return None
    category = (report.category or "").upper()
    if category.startswith(("SM", "ESM")):
        return classify_session(report.cause)
    return classify_mobility(report.cause)


class Backoff(JitterBackoff):
    """Delays between attempts after ``temporary``/``not-sim`` rejects: the uplink's full-jitter
    backoff above ``min_delay`` (never two attempts closer than that: no retry storm), capped at
    ``cap``; closer to a deadline the ceiling shrinks to a quarter of the time left, never below
    ``urgent_cap``. ``probe`` is the rare check of a SIM suspended by a ``permanent`` reject."""

    def __init__(self, base: float = 15.0, cap: float = 1800.0, *, min_delay: float = 10.0,
                 urgent_cap: float = 60.0, probe: float = 6 * 3600.0,
                 rng: random.Random | None = None, attempts: int = 0) -> None:
        if not 0 < min_delay <= urgent_cap <= cap or base <= 0:
            raise ValueError("need 0 < min_delay <= urgent_cap <= cap and base > 0")
        self.rng = rng or random.Random()
        # A base above the cap (the configuration allows it) means: always the cap.
        super().__init__(min(base, cap), cap, self.rng.random, min_delay=min_delay)
        self.urgent_cap = urgent_cap
        self.probe = probe
        self.attempts = attempts

    def _limit(self, time_left: float | None) -> float:
        return math.inf if time_left is None else max(self.urgent_cap, time_left / 4)

    def next_delay(self, time_left: float | None = None) -> float:
        """Seconds to wait before the next attempt; counts the attempt. ``time_left``: seconds
        to the deadline (:meth:`agent.core.trusted_time.TrustedClock.time_left`), None when none."""
        return super().next_delay(self._limit(time_left))

    def probe_delay(self, time_left: float | None = None) -> float:
        """Seconds until the next probe of a permanently rejected SIM (±10 % jitter)."""
        return min(self.probe, self._limit(time_left)) * self.rng.uniform(0.9, 1.1)
