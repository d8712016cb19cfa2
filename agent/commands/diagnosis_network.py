"""The network checks of the diagnosis (:mod:`agent.commands.diagnosis`): registration (a reject
cause explained, agent.sim.reject_advice), access technology, signal in words, the APN against
the manifest and the data context."""

from __future__ import annotations

from typing import Any

from agent.commands.diagnosis import Check, ModemFacts, Status, check, not_checked
from agent.core.config import Config
from agent.sim.manifest import SimEntry
from agent.sim.reject_advice import advice
from agent.sim.rejects import Reject, classify_mobility
from drivers.parsers.network import is_registered

_ACT = {"gsm": "2G (GSM)", "umts": "3G (UMTS)", "lte": "4G (LTE)", "lte-m": "LTE-M",
        "nb-iot": "NB-IoT", "nr5g": "5G (NR)"}
# Signal bands: Teltonika Networks wiki, "Mobile Signal Strength Recommendations" (the table
# modem vendors' guides repeat): RSRP for LTE and its IoT variants, RSSI for 2G/3G (and for LTE
# when the modem reports no RSRP). A band holds values >= its floor.
_RSRP = ((-80, "excellent"), (-90, "good"), (-100, "fair"))
_RSSI = ((-70, "excellent"), (-85, "good"), (-100, "fair"))
_REG: dict[str, tuple[str, str]] = {
    "searching": ("searching: no network found", "check that the antenna is connected and the "
                  "gateway is in coverage of a network the SIM may use (try another place)"),
    "not-registered": ("not registered and not searching", "if it stays so, the modem's network"
                       " selection is off: AT+COPS=0 selects automatically"),
    "unknown": ("the modem did not say", "read it again: simkeeper modem info"),
}


def refusal(reject: Reject, name: str) -> tuple[str, str]:
    """``EMM cause 7 (what it means)`` and what to do (agent.sim.reject_advice)."""
    meaning, do = advice(reject)
    return f"{name} {reject.code} ({meaning})", do


def signal_words(signal: dict[str, Any], act: str | None) -> tuple[str, Status]:
    """``good (RSRP -85 dBm, ...)``, and whether it is weak enough to warn about."""
    rsrp, rssi = signal["rsrp_dbm"], signal["rssi_dbm"]
    if rsrp is not None and act not in ("gsm", "umts"):
        value, bands = rsrp, _RSRP
    elif rssi is not None:
        value, bands = rssi, _RSSI
    else:
        return "unknown: the modem reports none", "warning"
    word = next((w for floor, w in bands if value >= floor), "poor")
    parts = [f"{k} {signal[f]:g} {u}" for k, f, u in (
        ("RSRP", "rsrp_dbm", "dBm"), ("RSRQ", "rsrq_db", "dB"), ("SINR", "sinr_db", "dB"),
        ("RSSI", "rssi_dbm", "dBm")) if signal[f] is not None]
    return f"{word} ({', '.join(parts)})", "warning" if word == "poor" else "ok"


def network_checks(cfg: Config, f: ModemFacts, entry: SimEntry | None) -> list[Check]:
    names = ("registration", "technology", "signal", "APN", "data")
    if f.info is None:
        return [not_checked("network", n, "no modem answers") for n in names]
    reg, signal, radio = f.info["registration"], f.info["signal"], f.info["radio"]
    words, weak = signal_words(signal, reg["act"])
    signal_check = check("network", "signal", weak, words, "move or re-aim the antenna, or fit "
                         "a better one; check its cable" if weak != "ok" else None)
    if radio in ("off", "low-power"):
        signal_check = not_checked("network", "signal", f"the radio is {radio}")
    if f.info["sim"]["state"] != "ready":
        why = "the SIM is not ready"
        return [not_checked("network", "registration", why),
                not_checked("network", "technology", why), signal_check,
                not_checked("network", "APN", why), not_checked("network", "data", why)]
    registered = is_registered(reg["state"])
    op = f.info["operator"]
    where = op["name"] or op["mcc_mnc"] or "an unnamed network"
    technology = (check("network", "technology", "ok", f"{_ACT.get(reg['act'] or '', 'unknown')}"
                        f" on {where}" + (f" ({op['mcc_mnc']})" if op["mcc_mnc"] else ""))
                  if registered else not_checked("network", "technology", "not registered"))
    return [_registration(f, where), technology, signal_check, *_data(cfg, f, entry)]


def _registration(f: ModemFacts, where: str) -> Check:
    assert f.info is not None
    reg, radio = f.info["registration"], f.info["radio"]
    state = reg["state"]
    if is_registered(state):
        return check("network", "registration", "ok", f"registered ({state}) on {where}")
    enforced = (f.lifecycle or {}).get("enforced") or {}
    if radio in ("off", "low-power"):
        if enforced.get("radio"):
            return check("network", "registration", "warning", f"the radio is held off by the"
                         f" agent: {enforced.get('why')}", "see the suspension and conformance"
                         " checks")
        return check("network", "registration", "failure", f"not registered: the radio is"
                     f" {radio} (AT+CFUN)", "the agent turns it on when it runs; if it stays off,"
                     " see the suspension and conformance checks")
    if state == "denied":
        cause = reg["reject_cause"]
        if cause is None:
            return check("network", "registration", "failure", "denied by the network, no cause"
                         " given", "ask the carrier whether the SIM is active and allowed on"
                         " this network")
        layer = {"gsm": "GMM", "umts": "GMM", "nr5g": "5GMM"}.get(reg["act"] or "", "EMM")
        saw, do = refusal(classify_mobility(cause), f"{layer} cause")
        return check("network", "registration", "failure", f"denied, {saw}", do)
    saw, do = _REG.get(state, _REG["unknown"])
    return check("network", "registration", "warning" if state == "unknown" else "failure",
                 saw, do)


_DATA_PATH = {
    "networkmanager": "NetworkManager brings the data connection up (nmcli connection show)",
    "agent": "the agent brings it up when it runs",
    "external": "whatever owns the data path ([modem] data_path = \"external\") brings it up",
}


def _data(cfg: Config, f: ModemFacts, entry: SimEntry | None) -> list[Check]:
    assert f.info is not None
    cid = cfg.lifecycle.cid
    apn, source = ((entry.apn, "the manifest") if entry is not None and entry.apn
                   else (cfg.lifecycle.apn, "[lifecycle] apn"))
    if not is_registered(f.info["registration"]["state"]):
        return [not_checked("network", n, "not registered") for n in ("APN", "data")]
    if f.mode == "agent":
        return _data_by_agent(f.lifecycle or {}, apn, source)
    ctx = next((c for c in f.contexts or () if c.cid == cid), None)
    if f.contexts is None or ctx is None:
        why = "the PDP contexts could not be read" if f.contexts is None else \
            f"no PDP context {cid} is defined"
        return [check("network", "APN", "warning", why, "the agent sets it at activation"),
                not_checked("network", "data", why)]
    if (ctx.apn or "").casefold() == apn.casefold():
        apn_check = check("network", "APN", "ok", f"context {cid}: {ctx.apn}, as {source} says")
    else:
        apn_check = check("network", "APN", "warning", f"context {cid} has APN {ctx.apn!r},"
                          f" {source} says {apn!r}", "the agent sets it at its next activation;"
                          f" if it stays so, check {source}")
    if ctx.active and ctx.addresses:
        data = check("network", "data", "ok", f"context {cid} up, address"
                     f" {', '.join(ctx.addresses)}")
    elif ctx.active:
        data = check("network", "data", "failure", f"context {cid} is up without an address",
                     "reset the modem: fleet send ID reset-modem, or power-cycle it")
    else:
        data = check("network", "data", "warning", f"context {cid} is down",
                     _DATA_PATH[cfg.modem.data_path])
    return [apn_check, data]


def _data_by_agent(lc: dict[str, Any], apn: str, source: str) -> list[Check]:
    state = lc.get("state")
    susp = lc.get("suspension") or {}
    error = (lc.get("activation") or {}).get("last_error")
    if state == "active" and susp.get("scope") not in ("data", "radio"):
        return [check("network", "APN", "ok", f"{apn} (from {source}), set by the agent"),
                check("network", "data", "ok", "up: the agent's activation proved a round trip")]
    apn_check = check("network", "APN", "ok", f"{apn} (from {source}); the agent sets it at"
                      " activation")
    if susp.get("scope") in ("data", "radio"):
        return [apn_check, check("network", "data", "warning", f"down on purpose: suspended"
                                 f" ({susp['scope']})", "see the suspension check")]
    last = f"; last attempt failed: {error}" if error else ""
    return [apn_check, check("network", "data", "failure" if error else "warning",
                             f"not up yet (lifecycle {state or 'unknown'}){last}",
                             "see the checks above; the agent retries with back-off")]
