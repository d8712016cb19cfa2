"""The modem and SIM checks of the diagnosis (:mod:`agent.commands.diagnosis`), and the list
of every check of a modem, its SIM and the network (:func:`checks`; of every modem:
:func:`every_modem`)."""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

from agent.commands.diagnosis import (
    Check,
    ModemFacts,
    Status,
    check,
    duration,
    not_checked,
    when,
)
from agent.commands.diagnosis_network import network_checks, refusal
from agent.core.config import Config
from agent.sim.manifest import ManifestError, SimEntry, load_manifest
from agent.sim.rejects import Reject, classify_cme, classify_mobility, classify_session

SOON = 7 * 86400.0  # an activation deadline closer than this is a warning (the first alarm)


def every_modem(cfg: Config, facts: list[ModemFacts],
                holders: Mapping[str | None, Check]) -> list[Check]:
    """Each modem's checks (:func:`checks`), in the order of ``facts`` (slot order), with its
    port's holders check (``holders``, by port). With several modems each check carries its
    ``slot``; with one they are as they always were."""
    several = len(facts) > 1
    return [{**c, "slot": f.slot} if several else c
            for f in facts for c in checks(cfg, f, [holders[f.port]])]


def checks(cfg: Config, facts: ModemFacts, holders: list[Check]) -> list[Check]:
    """The modem, SIM and network checks (``holders``: the port holders check, made apart as
    it looks at the host, :func:`agent.commands.diagnosis_host.holders_check`)."""
    entry, manifest_check = _manifest(cfg, facts)
    return [_present(facts), *holders, *_identity(cfg, facts), *_sim(facts), manifest_check,
            *_lifecycle(facts, entry), *network_checks(cfg, facts, entry)]


# -- modem ------------------------------------------------------------------------------------

_AUTO_DO = ("check that the modem is plugged in and powered (lsusb); a modem the udev rules do "
            "not know needs SIMKEEPER_PORT=at on its AT port (packaging/README.md)")
_SESSION: dict[str, tuple[Status, str, str | None]] = {
    "opening": ("failure", "the agent cannot open {port} yet", _AUTO_DO),
    "hung": ("failure", "the modem on {port} stopped answering; the agent is recovering it",
             "if it stays so, power-cycle the modem and check its power supply"),
    "resetting": ("warning", "the modem on {port} is restarting", None),
    "lost": ("failure", "{port} is gone", "check the USB cable and the modem's power; the agent "
             "opens it again when it is back"),
    "stopped": ("failure", "the agent stopped using {port}", None),
}


def _present(f: ModemFacts) -> Check:
    if f.port is None:
        return check("modem", "present", "failure", 'no modem port found ([modem] port = "auto"'
                     " and no known AT port is plugged in)", _AUTO_DO)
    if f.mode == "probe":
        if f.info is not None:
            return check("modem", "present", "ok", f"answers on {f.port} (read by the doctor)")
        return check("modem", "present", "failure", str(f.error),
                     "see the port holders check" if "busy" in str(f.error) else
                     "power-cycle the modem and check its power supply and cable; a modem has "
                     "several ports: [modem] port must be its AT port")
    session = f.session or {}
    state = session.get("state", "opening")
    if state == "ready":
        polled = session.get("polled_at")
        age = f", polled {duration(time.time() - polled)} ago" if polled else ""
        return check("modem", "present", "ok", f"ready on {f.port} (the agent's{age})")
    status, saw, do = _SESSION.get(state, _SESSION["opening"])
    detail = f" ({session['detail']})" if session.get("detail") else ""
    return check("modem", "present", status, saw.format(port=f.port) + detail, do)


def _identity(cfg: Config, f: ModemFacts) -> list[Check]:
    info = f.info
    if info is None:
        return [not_checked("modem", "identity", "no modem answers"),
                not_checked("modem", "conformance", "no modem answers")]
    what = " ".join(filter(None, (info["manufacturer"], info["model"]))) or "unknown model"
    saw = f"{what}, firmware {info['revision'] or 'unknown'}, IMEI {info['imei'] or 'unknown'}"
    identity = check("modem", "identity", "ok" if info["imei"] else "warning", saw,
                     None if info["imei"] else "the modem did not give its IMEI (AT+CGSN)")
    return [identity, _conformance(f.lifecycle, cfg.conformance.list is not None)]


def _conformance(lc: dict[str, Any] | None, configured: bool) -> Check:
    terminal = (lc or {}).get("terminal") or {}
    verdict = (lc or {}).get("conformance")
    listed = f"list v{terminal['list_version']}" if terminal.get("list_version") else "no list"
    malfunction = terminal.get("malfunction")
    if terminal.get("list_error"):
        return check("modem", "conformance", "warning",
                     f"the conformance list was refused ({terminal['list_error']}); {listed} "
                     "in use", "install a list signed by the operator key ([conformance] list)")
    if verdict is None and not (configured or terminal.get("list_version")):
        return check("modem", "conformance", "warning", "not judged: no conformance list",
                     "install the operator's signed conformance list ([conformance] list)")
    if verdict is None:
        return check("modem", "conformance", "warning", "not judged yet: the agent judges the"
                     " terminal once it has read the modem")
    if not verdict["conforming"]:
        reasons = "; ".join(x["reason"] for x in verdict["failures"])
        off = verdict["policy"] == "enforce"
        return check("modem", "conformance", "failure" if off else "warning",
                     f"does NOT conform ({listed}, policy {verdict['policy']}): {reasons}"
                     + ("; the radio stays off" if off else ""),
                     "fit a terminal on the list, or have the operator update the list")
    unchecked = (f"; not checked yet: {', '.join(verdict['unchecked'])}"
                 if verdict["unchecked"] else "")
    if malfunction:
        return check("modem", "conformance", "warning",
                     f"conforms, but a malfunction is reported: {malfunction.get('reason')}",
                     "check power and cabling; the operator clears it (clear-malfunction)")
    return check("modem", "conformance", "ok", f"conforms as {verdict['terminal']} ({listed},"
                 f" policy {verdict['policy']}){unchecked}")


# -- SIM --------------------------------------------------------------------------------------

_CARD: dict[str, tuple[str, str, str]] = {  # state: (check, what was seen, what to do)
    "absent": ("inserted", "no SIM card in the modem", "power the gateway off, insert the SIM "
               "(seated, contacts down) and power it on again"),
    "error": ("inserted", "the SIM cannot be read (SIM failure)", "reseat the SIM; if it stays "
              "so, try another SIM: the card or the slot is faulty"),
    "pin-required": ("PIN", "the SIM is locked with a PIN", "remove the PIN lock (in a phone, or "
                     'AT+CLCK="SC",0,"<PIN>"): the agent never enters a PIN'),
    "puk-required": ("PIN", "the SIM is blocked (PUK required after wrong PINs)", "get the PUK "
                     "from the carrier; do not guess it (10 wrong PUKs destroy the SIM)"),
}


def _sim(f: ModemFacts) -> list[Check]:
    if f.info is None:
        return [not_checked("sim", n, "no modem answers") for n in ("inserted", "PIN", "ICCID")]
    sim = f.info["sim"]
    state = sim["state"]
    out: dict[str, Check] = {"inserted": check("sim", "inserted", "ok", "a SIM is in the modem"),
                             "PIN": check("sim", "PIN", "ok", "unlocked (no PIN to enter)")}
    if state in _CARD:
        name, saw, do = _CARD[state]
        out[name] = check("sim", name, "failure", saw, do)
        if name == "inserted":
            out["PIN"] = not_checked("sim", "PIN", saw)
    iccid = sim["iccid"]
    out["ICCID"] = (check("sim", "ICCID", "ok", iccid) if iccid else
                    not_checked("sim", "ICCID", _CARD[state][1]) if state in ("absent", "error")
                    else check("sim", "ICCID", "warning", "the modem did not give the ICCID"))
    return list(out.values())


def _manifest(cfg: Config, f: ModemFacts) -> tuple[SimEntry | None, Check]:
    iccid = f.info["sim"]["iccid"] if f.info else None
    path = cfg.lifecycle.manifest
    if iccid is None:
        return None, not_checked("sim", "manifest", "no ICCID")
    if path is None:
        return None, check("sim", "manifest", "ok", "no factory manifest configured"
                           " ([lifecycle] manifest): deadlines come by order")
    try:
        entry = load_manifest(path).entries.get(iccid)
    except ManifestError as exc:
        return None, check("sim", "manifest", "failure", f"the manifest cannot be read: {exc}",
                           "fix the file [lifecycle] manifest names")
    if entry is None:
        return None, check("sim", "manifest", "warning", f"ICCID {iccid} is not in {path}",
                           "a swapped SIM? add it to the manifest, or send"
                           " set-activation-deadline")
    apn = f", APN {entry.apn}" if entry.apn else ""
    return entry, check("sim", "manifest", "ok", f"listed in {path.name}: deadline"
                        f" {when(entry.deadline)}{apn}")


def _lifecycle(f: ModemFacts, entry: SimEntry | None) -> list[Check]:
    lc = f.lifecycle
    if f.info is None or not f.info["sim"]["iccid"]:
        return [not_checked("sim", n, "no ICCID") for n in ("deadline", "suspension")]
    if lc is None:
        if entry is None:
            return [not_checked("sim", n, "the agent has not seen this SIM")
                    for n in ("deadline", "suspension")]
        left = entry.deadline - time.time()
        return [_deadline_check(entry.deadline, left, "by the system clock; the agent has not "
                                "seen this SIM"),
                not_checked("sim", "suspension", "the agent has not seen this SIM")]
    return [_deadline(lc), _suspension(lc)]


def _deadline(lc: dict[str, Any]) -> Check:
    state = lc["state"]
    if lc["activated_at"] is not None and state != "terminated":
        return check("sim", "deadline", "ok", f"activated on {when(lc['activated_at'])}: no"
                     " deadline binds it any more")
    if state == "expired":
        return check("sim", "deadline", "failure", f"the activation deadline passed"
                     f" ({when(lc['deadline'])}): the SIM can no longer be activated",
                     "ask the carrier: a SIM past its deadline needs their action")
    if state == "terminated":
        return check("sim", "deadline", "failure", "the SIM was decommissioned (terminated)",
                     "return the SIM; re-provision the gateway for a new one")
    if lc["deadline"] is None:
        return check("sim", "deadline", "warning", "no activation deadline known",
                     "send one: fleet send ID set-activation-deadline --arg deadline=...")
    trusted = lc.get("trusted_time")
    return _deadline_check(lc["deadline"], lc["time_left"],
                           f"trusted time: {trusted}" if trusted else
                           "no trusted time: the agent acts as if it were near")


def _deadline_check(deadline: float, left: float | None, how: str) -> Check:
    saw = f"activation deadline {when(deadline)}, not activated yet"
    if left is not None and left <= 0:
        return check("sim", "deadline", "warning", f"{saw} ({how})",
                     "get the SIM registered now: see the network checks")
    if left is None or left < SOON:
        return check("sim", "deadline", "warning", f"{saw}: {duration(left or 0)} left ({how})",
                     "get the SIM registered before then: see the network checks")
    return check("sim", "deadline", "ok", f"{saw}: {duration(left)} left ({how})")


_CARRIER = "check the SIM's status with the carrier"
_CAUSE = {"emm": "EMM cause", "esm": "ESM cause", "cme": "+CME ERROR"}


def _reject_of(reason: str) -> Reject | None:
    """The refusal a network suspension's reason names (``emm #7: ...``, as agent.sim.lifecycle
    writes it)."""
    found = re.match(r"(emm|esm|cme) #(\d+):", reason)
    if found is None:
        return None
    code = int(found[2])
    classify = {"emm": classify_mobility, "esm": classify_session, "cme": classify_cme}
    return classify[found[1]](code)


def _suspension(lc: dict[str, Any]) -> Check:
    susp = lc["suspension"]
    if susp is None:
        return check("sim", "suspension", "ok", f"not suspended (lifecycle {lc['state']})")
    until = f" until {when(susp['until'])}" if susp.get("until") else ""
    why = f": {susp['reason']}" if susp.get("reason") else ""
    if susp["source"] == "network":
        reject = _reject_of(susp.get("reason") or "")
        saw, do = (refusal(reject, _CAUSE[reject.origin]) if reject else
                   (susp.get("reason") or "no cause recorded", _CARRIER))
        return check("sim", "suspension", "failure", f"suspended by the network"
                     f" ({susp['scope']}{until}): {saw}", do)
    return check("sim", "suspension", "warning", f"suspended by the operator's order"
                 f" ({susp['scope']}{until}){why}", "resume it when it should work again: "
                 "fleet send ID resume")
