"""What a network refusal means, and what to do about it, in words a field technician acts on.

The causes are those of ``shared/corpus/reject_causes.md``: §1 (EMM causes, TS 24.301 Annex A,
and the MM/GMM causes of TS 24.008 that share their numbers), §2 (ESM/SM session causes) and
the ``+CME ERROR`` codes of §3 that stand for a network refusal (100 + a cause, and the ones
:func:`agent.sim.rejects.classify_cme` lists on their own). :mod:`agent.sim.rejects` classifies
a refusal (permanent, temporary, not the SIM's fault); :func:`advice` says it in plain words
(``simkeeper doctor``, the ``diagnose`` command).
"""

from __future__ import annotations

from agent.sim.rejects import Kind, Reject

Advice = tuple[str, str]  # (what the network said, what to do)

_CARRIER = "check the SIM's status with the carrier"
_WAIT = "wait: the agent retries with back-off; do not power-cycle the modem again and again"

# §1: EMM (LTE) / MM-GMM (2G/3G) causes.
MOBILITY: dict[int, Advice] = {
    2: ("the network does not know this SIM (IMSI unknown): not activated yet, or deleted",
        "check with the carrier that the SIM is activated"),
    3: ("the network refuses this SIM (illegal UE): barred, cloned or deactivated",
        _CARRIER + "; the modem stays refused until it is power-cycled"),
    5: ("the network refused the modem's IMEI", "check the modem's IMEI with the carrier"),
    6: ("the network refuses this modem (illegal ME): its IMEI is barred or not allowed",
        "ask the carrier whether this modem (IMEI) is allowed on the network"),
    7: ("the network refuses data service to this SIM: suspended or not provisioned for data",
        _CARRIER),
    8: ("the network refuses every service to this SIM: the subscription is barred or suspended",
        _CARRIER),
    9: ("the network could not identify the modem (a stale identity); it usually recovers",
        "wait: the modem registers again by itself"),
    10: ("the network dropped the modem's registration (implicitly detached): not a SIM problem",
         "wait: the modem registers again by itself"),
    11: ("this network is not allowed for the SIM (no roaming agreement, or barred)",
         "let the modem choose another network (AT+COPS=0); it remembers this one as forbidden"),
    12: ("this area is not allowed for the SIM (a regional restriction)",
         "move the gateway, or ask the carrier where the SIM may be used"),
    13: ("roaming is not allowed in this area", "ask the carrier about roaming here"),
    14: ("data is not allowed for this SIM on this network",
         "let the modem choose another network, or ask the carrier to allow data on this one"),
    15: ("no cell here suits the SIM (an area restriction, often when roaming)",
         "check which networks the SIM may use here; move the antenna or the gateway"),
    17: ("the network's core failed (transient)", _WAIT),
    18: ("the network has no circuit-switched domain here (no SMS over SGs); data may still work",
         "nothing for data; SMS commands may not arrive"),
    19: ("the data session asked for at attach failed: an APN or subscription problem",
         "check the APN with the carrier (the session cause says more: AT+CEER)"),
    22: ("the network is congested", _WAIT),
    25: ("the SIM is not allowed on this closed subscriber group cell",
         "move to a public cell, or ask the carrier"),
    35: ("the service asked for is not allowed for the SIM on this network",
         "ask the carrier which services the SIM has on this network"),
}

# §2: ESM (LTE) / SM (2G/3G) causes, refusing a data session.
SESSION: dict[int, Advice] = {
    8: ("the operator has barred the SIM's data service (suspended or unpaid)",
        "check the SIM's status and billing with the carrier"),
    26: ("the network lacks resources for a data session (transient)", _WAIT),
    27: ("the APN is missing or unknown to the network",
         "set the APN the carrier gave ([lifecycle] apn, or the manifest's apn column)"),
    28: ("the address type asked for (IPv4/IPv6) does not match the subscription",
         "ask the carrier which PDN type the SIM has"),
    29: ("the network rejected the APN's user name or password",
         "check the APN credentials with the carrier"),
    30: ("the network's gateway refused the data session", _WAIT),
    31: ("the network refused the data session without saying why", _WAIT),
    32: ("the network does not support the service asked for",
         "check the APN and its PDN type with the carrier"),
    33: ("the SIM is not subscribed to this APN or service: a data product suspended or not in "
         "the plan", "check the SIM's plan and APN with the carrier"),
    34: ("the service asked for is out of order for a while", _WAIT),
    50: ("the network allows only IPv4 on this APN", "use the PDN type IP (IPv4 only)"),
    51: ("the network allows only IPv6 on this APN", "use the PDN type IPV6"),
    65: ("the modem has as many data sessions as the network allows",
         "reset the modem (stale contexts go with it): fleet send ID reset-modem"),
    66: ("the APN is not supported on this radio technology and network (e.g. an LTE-M APN used "
         "on LTE)", "use the APN the carrier gave for this radio technology"),
}

# §3: +CME ERROR codes classified as network refusals that are not 100 + a cause.
CME: dict[int, Advice] = {
    14: ("the SIM is busy (just after power-up or unlock)", "wait a few seconds"),
    30: ("no network service: the modem is not registered", "see the registration check"),
    31: ("the network did not answer in time", _WAIT),
    32: ("emergency calls only: the network refused the registration",
         "see the registration check for the cause"),
    148: ("the data session failed, no reason given", _WAIT),
    149: ("the network rejected the APN's user name or password",
          "check the APN credentials with the carrier"),
    177: ("the operator has barred the SIM's data service (suspended or unpaid)",
          "check the SIM's status and billing with the carrier"),
    515: ("the modem is busy", "wait a few seconds"),
}

_BY_KIND: dict[Kind, str] = {
    "permanent": _CARRIER,
    "temporary": _WAIT,
    "not-sim": "check the APN and the networks the SIM may use here with the carrier",
}


def advice(reject: Reject) -> Advice:
    """(meaning, what to do) for a classified refusal; a cause no table lists is said as
    :mod:`agent.sim.rejects` names it, with what its class calls for."""
    code = reject.code
    if reject.origin == "cme":
        if code in CME:
            return CME[code]
        if 101 <= code <= 134:  # 27.007 §9.2.2: 100 + the cause
            code -= 100
        else:
            return reject.reason, _BY_KIND[reject.kind]
    table = MOBILITY if reject.layer == "mobility" else SESSION
    return table.get(code) or (reject.reason, _BY_KIND[reject.kind])
