"""Every case of ../shared/corpus/at_responses.jsonl in scope of the codec and the typed parsers.

Each case goes through :class:`drivers.at.AtCodec` (fed whole and one byte at a time, which
must give the same events), then through the parser for its command, and every key of its
``expected`` is compared: a case passes only when all its keys were checked (``METADATA`` keys
describe the fixture, not a parsed value). The corpus names values ModemManager's way (enum
names without prefix, integer LAC/CI with 0 for "absent", ``IPV4`` for ``IP``); the mappings to
our values are written out below, one table each.

Wire framing, as the corpus README says: a ``solicited_body`` is wrapped as
``\\r\\n<body>\\r\\n\\r\\nOK\\r\\n``; ``lines_concatenated`` cases get back the leading ``\\r\\n``
their framing dropped; URC lines (some given without line ends) are wrapped in ``\\r\\n``; an
echo buffer gets a final ``\\r\\n`` so its last line is complete.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from drivers import vendors
from drivers.at import AtCodec, Echo, Event, Final, Info, Urc, line_prefix
from drivers.channel import raise_for_final
from drivers.errors import (
    CME_BY_CODE,
    CmeError,
    CmsError,
    DeviceBusy,
    IncorrectPassword,
    ModemError,
    SimBusy,
    SimPinRequired,
    SimPukRequired,
    TransientError,
)
from drivers.parsers import ParseError
from drivers.parsers.device import parse_cclk, parse_cfun, parse_nwtime
from drivers.parsers.identity import (
    parse_ati,
    parse_manufacturer,
    parse_model,
    parse_quectel_revision,
    parse_revision,
    parse_serial,
    parse_telit_package,
)
from drivers.parsers.network import (
    parse_ceer,
    parse_cops,
    parse_cops_list,
    parse_registration,
)
from drivers.parsers.packet import (
    parse_cgact,
    parse_cgcontrdp,
    parse_cgdcont,
    parse_cgdcont_test,
    parse_cgev,
    parse_ugcntrd,
)
from drivers.parsers.signal import parse_cesq, parse_csq
from drivers.parsers.sim import (
    iccid_from_field,
    parse_cnum,
    parse_cpin,
    parse_crsm,
    parse_csim_pin_retries,
    parse_imsi,
    parse_qss,
    parse_upincnt,
    pin_state,
    pin_state_from_error,
)

CORPUS = Path(__file__).parents[2] / "shared" / "corpus" / "at_responses.jsonl"

OUT_OF_SCOPE: dict[str, str] = {
    # codec decisions
    "mm-framing-echo-313": "MM strips echo only up to CR LF; our codec takes only the command's "
                           "own text as its echo, whatever ends it",
    "mm-framing-echo-314": "idem, line ended by a bare LF",
    # ModemManager takes anything before the first CR LF for echo, with no command named. Our
    # codec takes only the command's own text for echo (a reply line missing its leading CR LF,
    # e.g. "+CSQ: 20,99", must not be dropped as echo and fire a false "echo came back"
    # reset): a line without its leading CR LF is parsed by its shape, a bare one is noise.
    "mm-framing-echo-316": "echo is only the command's own text; no command named here",
    "mm-framing-echo-317": "idem",
    "mm-framing-echo-318": "idem",
    "mm-framing-echo-319": "idem",
    "mm-framing-echo-320": "idem",
    # what a data-only gateway agent never reads
    "mm-framing-urc-464": "+CLCC voice call list: the agent handles no calls",
    "pygsm-cme-error-059": "asserts python-gsmmodem's CmsError.smsc (SMS centre address); "
                           "the agent sends no SMS",
    "capabilities": "+CLAC command lists (supportedCommands): vendors are identified by "
                    "+CGMI/+CGMM, never by probing commands",
    "bearer_status": "Huawei ^NDISSTAT data-path status: the data path belongs to "
                     "NetworkManager/ModemManager ([modem] data_path)",
    "mm-synthetic-transcript-483": "+CLCK PIN lock facility: the agent never manages PIN locks",
    # other vendors' dialects (not Quectel/SIMCom/u-blox/Telit/Sierra/Huawei) or legacy forms
    "mm-clock-429": "Cinterion +CTZU URC", "mm-clock-430": "Cinterion +CTZU URC",
    "mm-clock-465": "+CTZU=? capability probe: the agent reads the network time, "
                    "it does not configure time zone updates",
    "mm-clock-466": "+CTZU=? capability probe", "mm-clock-467": "+CTZU=? capability probe",
    "mm-clock-468": "+CTZU=? capability probe", "mm-clock-469": "+CTZU=? capability probe",
    "mm-sim-hotswap-414": "Cinterion ^SIND simstatus",
    "mm-power-477": "Ericsson MBM +CFUN 5/6 levels (MBM not a supported vendor)",
    "mm-power-478": "Ericsson MBM +CFUN 5/6 levels (MBM not a supported vendor)",
    "mm-cops-test-008": "operator names in the raw GSM 7-bit alphabet (MM decodes '@' as "
                        "0x00 -> U+00A1); we take names as IRA text",
    "mm-cops-test-009": "idem (GSM 7-bit '@')",
    "mm-cops-test-028": "UCS2 hex-encoded operator names: the agent never selects "
                        "AT+CSCS=\"UCS2\"",
    **{f"mm-signal-{n}": "Cinterion ^SMONI" for n in range(415, 429)},
    **{f"mm-signal-{n}": "Intel XMM +XCESQ" for n in range(453, 458)},
    **{f"mm-signal-{n}": "Huawei ^HCSQ: the Huawei profile reads +CSQ/+CESQ (27.007); MM's "
                         "vectors assert raw indices only" for n in range(392, 398)},
    **{f"mm-registration-{n}": "Huawei ^SYSINFO/^SYSINFOEX: registration is read through "
                               "27.007 +CxREG on every vendor" for n in range(370, 381)},
    **{f"mm-clock-{n}": "Huawei ^TIME (local clock, no zone): network time comes from "
                        "+CCLK or ^NWTIME" for n in range(387, 392)},
    **{f"mm-pdp-context-{n}": "Huawei ^DHCP: the data path belongs to NetworkManager"
       for n in range(364, 370)},
    # curator values that contradict the source's own parser vectors
    "mm-identity-098": "CDMA ESN: the curator copied the text verbatim (12de4fa6); MM's own "
                       "parser vectors (mm-imei-240..243, in scope) normalise to 8 upper hex",
    "mm-identity-174": "CDMA ESN verbatim with 0x (see mm-identity-098)",
    "mm-identity-147": "CDMA ESN verbatim with 0x (see mm-identity-098)",
}

# Keys that describe the fixture, not a value a parser returns.
METADATA = {
    "anonymised": "the fixture author replaced the value; it is compared as given",
    "expect_prefix": "says whether the input kept its +CPIN: prefix (the parser call differs)",
}

MM_REG_STATE = {
    "IDLE": "not-registered", "HOME": "home", "SEARCHING": "searching", "DENIED": "denied",
    "UNKNOWN": "unknown", "ROAMING": "roaming", "HOME_SMS_ONLY": "home",
    "ROAMING_SMS_ONLY": "roaming", "EMERGENCY_ONLY": "not-registered",
    "HOME_CSFB_NOT_PREFERRED": "home", "ROAMING_CSFB_NOT_PREFERRED": "roaming",
    "ATTACHED_RLOS": "not-registered",
}
MM_ACT = {"UNKNOWN": None, "GSM": "gsm", "EDGE": "gsm", "UMTS": "umts", "LTE": "lte",
          "5GNR": "nr5g"}
MM_NETWORK_STATUS = {"UNKNOWN": "unknown", "AVAILABLE": "available", "CURRENT": "current",
                     "FORBIDDEN": "forbidden"}
MM_POWER = {"ON": "on", "OFF": "off", "LOW": "low-power"}
MM_LOCK_STATE = {"SIM_PIN": "pin-required", "SIM_PUK": "puk-required", "SIM_PUK2": "ready",
                 "PH_NET_PIN": "pin-required", "UNKNOWN": "error"}
MM_QSS = {"SIM_REMOVED": "removed", "SIM_INSERTED": "inserted",
          "SIM_INSERTED_AND_UNLOCKED": "unlocked", "SIM_INSERTED_AND_READY": "ready"}
MM_PDP_TYPE = {"IPV4": "IP", "IPV6": "IPV6", "IPV4V6": "IPV4V6"}
# python-gsmmodem's exception names -> ours. InterruptedException is its wrapper for any
# +CME ERROR during a DTMF tone; ours is the type of that code.
PYGSM_EXCEPTION: dict[str, Callable[[ModemError, int], bool]] = {
    "IncorrectPinError": lambda e, _c: isinstance(e, IncorrectPassword),
    "PukRequiredError": lambda e, _c: isinstance(e, SimPukRequired),
    "InterruptedException": lambda e, c: type(e) is CME_BY_CODE[c],
    "CmeError": lambda e, _c: type(e) is CmeError,
    "CmsError": lambda e, _c: type(e) is CmsError,
}
PYGSM_MEANING = {"SIM PIN required": SimPinRequired, "SIM busy": SimBusy,
                 "device busy (vendor, not 27.007)": DeviceBusy}
# +CESQ raw level -> our converted field; a not-known level (99/255) must give None.
CESQ_LEVELS = {"rxlev": ("rssi_dbm", "rssi"), "rscp_level": ("rscp_dbm", "rscp"),
               "ecn0_level": ("ecno_db", "ecio"), "rsrq_level": ("rsrq_db", "rsrq"),
               "rsrp_level": ("rsrp_dbm", "rsrp")}


def _load() -> list[dict[str, Any]]:
    if not CORPUS.exists():
        return []
    return [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]


CASES = _load()


def _scope_reason(case: dict[str, Any]) -> str | None:
    if case["id"] in OUT_OF_SCOPE:
        return OUT_OF_SCOPE[case["id"]]
    if case["category"] in OUT_OF_SCOPE:
        return OUT_OF_SCOPE[case["category"]]
    if "supportedCommands" in case["expected"]:
        return OUT_OF_SCOPE["capabilities"]
    return None


IN_SCOPE = [c for c in CASES if _scope_reason(c) is None]


# -- feeding the codec ---------------------------------------------------------------------
def _command(case: dict[str, Any]) -> str | None:
    cmd = case["command"]
    if cmd is None:
        return None if case["kind"] == "urc" else "AT"
    return str(cmd).split(" (")[0].split(" / ")[0].strip()


def _wire(case: dict[str, Any]) -> bytes:
    raw: str = case["raw_response"]
    kind = case["kind"]
    if kind == "solicited_body":
        raw = f"\r\n{raw}\r\n\r\nOK\r\n"
    elif kind == "urc":
        raw = f"\r\n{raw}\r\n"
    elif case["framing"] == "lines_concatenated":
        raw = "\r\n" + raw
    elif case["category"] == "framing_echo":
        raw += "\r\n"
    return raw.encode()


def _expect(command: str | None) -> tuple[str, ...]:
    # An ATI block carries +GCAP: lines; unnamed prefixes are URCs to the codec unless the
    # sender says to expect them.
    return ("+GCAP",) if command and command.upper().startswith("ATI") else ()


def _events(data: bytes, command: str | None, chunk: int) -> list[Event]:
    codec = AtCodec()
    if command is not None:
        codec.send(command, expect=_expect(command))
    for i in range(0, len(data), chunk):
        codec.receive_data(data[i:i + chunk])
    return codec.events()


def feed(case: dict[str, Any]) -> list[Event]:
    data, command = _wire(case), _command(case)
    whole = _events(data, command, len(data) or 1)
    assert _events(data, command, 1) == whole, "one byte at a time gave other events"
    return whole


# -- checking ------------------------------------------------------------------------------
class Expect:
    """The expected values of one case; records which keys a check compared."""

    def __init__(self, expected: dict[str, Any]) -> None:
        self.values = expected
        self.checked: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str) -> Any:
        self.checked.add(key)
        return self.values[key]

    def eq(self, key: str, actual: Any, mapping: Callable[[Any], Any] | None = None) -> None:
        if key in self.values:
            want = self.get(key)
            want = mapping(want) if mapping else want
            assert actual == want, f"{key}: got {actual!r}, expected {want!r}"

    def unchecked(self) -> set[str]:
        return set(self.values) - self.checked - set(METADATA)


def _raises(exp: Expect, key: str, call: Callable[[], Any], failed: bool) -> Any:
    """Run ``call``; ``failed`` says whether the source expected a failure (then ours must
    raise a ParseError). ``key`` is the expected key that says so."""
    if key in exp:
        exp.get(key)
    if failed:
        with pytest.raises(ParseError):
            call()
        return None
    return call()


def _hex_int(code: str | None) -> int:
    return 0 if code is None else int(code, 16)  # MM's 0 stands for "absent"


def check_generic(exp: Expect, events: list[Event]) -> None:
    info = [e.text for e in events if isinstance(e, Info)]
    finals = [e for e in events if isinstance(e, Final)]
    final_text = finals[0].text if finals else None
    exp.eq("info_lines", info, lambda want: [w.rstrip("\r") for w in want])  # pygsm splits on LF
    exp.eq("final_result", final_text)
    exp.eq("response_lines", info + ([final_text] if final_text else []))


def check_framing(case: dict[str, Any], exp: Expect, events: list[Event]) -> None:
    finals = [e for e in events if isinstance(e, Final)]
    if "without_echo" in exp:
        rest = exp.get("without_echo")
        echo = case["raw_response"][: len(case["raw_response"]) - len(rest)].strip()
        assert [e.text for e in events if isinstance(e, Echo)] == ([echo] if echo else [])
        lines = [ln for ln in re.split(r"\r\n|\r|\n", rest) if ln.strip()]
        assert [e.text for e in events if isinstance(e, Info | Final)] == lines
    exp.eq("final_result_found", bool(finals))
    exp.eq("is_error", bool(finals) and not finals[0].ok)
    if case["kind"] == "urc":
        urc = next(e for e in events if isinstance(e, Urc))
        (key,) = exp.values
        exp.eq(key, urc.text.split(":", 1)[1].strip())


def check_error(exp: Expect, events: list[Event]) -> None:
    final = next(e for e in events if isinstance(e, Final))
    with pytest.raises(ModemError) as info:
        raise_for_final("AT", final)
    err = info.value
    code = getattr(err, "code", None)
    exp.eq("cme_error", code if isinstance(err, CmeError) else None)
    exp.eq("code", code)
    exp.eq("error_type", "CME" if isinstance(err, CmeError)
           else "CMS" if isinstance(err, CmsError) else None)
    if "meaning" in exp:
        assert isinstance(err, PYGSM_MEANING[exp.get("meaning")])
        assert isinstance(err, TransientError) == (code in (14, 515))
    if "exception" in exp:
        assert PYGSM_EXCEPTION[exp.get("exception")](err, int(code or 0))


def _error_message(exp: Expect, call: Callable[[], Any]) -> Any:
    """``error_message`` (MM's wording) non-null: ours must raise a ParseError."""
    return _raises(exp, "error_message", call, exp.values.get("error_message") is not None)


def check_identity(cmd: str, exp: Expect, lines: list[str]) -> None:
    verb = cmd.upper()
    if verb.startswith("ATI"):
        ati = parse_ati(lines)
        exp.eq("text_lines", list(ati.lines))
        for key in ("manufacturer", "model", "revision", "imei", "esn", "gcap", "imei_sv",
                    "fsn"):
            exp.eq(key, ati.fields.get(key))
        return
    if verb in ("AT+CGMI", "AT+GMI") and "manufacturer" in exp:
        exp.eq("manufacturer", parse_manufacturer(lines))
    elif verb in ("AT+CGMM", "AT+GMM") and "model" in exp:
        exp.eq("model", parse_model(lines))
    elif verb in ("AT+CGMR", "AT+GMR") and "revision" in exp:
        # python-gsmmodem joins a multi-line revision with LF, MM's curator with a blank: ours
        # is one line, joined with single blanks.
        exp.eq("revision", parse_revision(lines), lambda want: want.replace("\n", " "))
    elif verb in ("AT+CGSN", "AT+GSN"):
        failed = "success" in exp and not exp.values["success"]
        serial = _raises(exp, "success", lambda: parse_serial(lines), failed)
        for key in ("imei", "esn", "meid", "serial"):
            exp.eq(key, getattr(serial, key, None))
    elif verb == "AT+CIMI":
        exp.eq("imsi", parse_imsi(lines))
    elif verb == "AT#SWPKGV":
        exp.eq("software_package_version", parse_telit_package(lines))


def check_sim(cmd: str, case: dict[str, Any], exp: Expect, events: list[Event],
              lines: list[str]) -> None:
    verb = cmd.upper()
    if verb.startswith("AT+CSIM"):
        exp.eq("retries", _error_message(exp, lambda: parse_csim_pin_retries(lines)))
    elif verb == "AT+CPIN?" and ("lock" in exp or "cpin" in exp):
        final = next((e for e in events if isinstance(e, Final) and not e.ok), None)
        if case["kind"] == "value_fragment":
            state = pin_state(case["raw_response"])
        elif final is not None:
            with pytest.raises(CmeError) as info:
                raise_for_final(cmd, final)
            state = pin_state_from_error(info.value)
        else:
            state = parse_cpin(lines)
        if "lock" in exp:
            lock = exp.get("lock")
            assert state.state == MM_LOCK_STATE[lock]
            code = state.code.replace(" ", "_").replace("-", "_") if state.code else "UNKNOWN"
            assert code == lock
        exp.eq("cpin", state.code)
    elif verb == "AT+UPINCNT":
        retries = parse_upincnt(lines)
        for key, ours in (("pin_attempts", retries.pin), ("pin2_attempts", retries.pin2),
                          ("puk_attempts", retries.puk), ("puk2_attempts", retries.puk2)):
            exp.eq(key, ours)
    elif verb.startswith("AT+CRSM") and case["kind"] != "value_fragment":
        read = parse_crsm(lines)
        exp.eq("success", read.ok)
        exp.eq("sw1", read.sw1)
        exp.eq("sw2", read.sw2)
        exp.eq("hex", read.data)
    elif verb == "AT#QSS?":
        status = _error_message(exp, lambda: parse_qss(lines))
        exp.eq("qss_status", status, MM_QSS.get)
    elif verb == "AT+CNUM":
        exp.eq("numbers", list(parse_cnum(lines)))


def check_fragment(case: dict[str, Any], exp: Expect) -> None:
    raw = case["raw_response"]
    if case["category"] == "iccid":
        failed = bool(exp.values.get("error"))
        if "error" in exp:
            exp.get("error")
        iccid = None
        if failed:
            with pytest.raises(ParseError):
                iccid_from_field(raw)
        else:
            iccid = iccid_from_field(raw)
        exp.eq("iccid", iccid)
    elif case["category"] == "firmware":
        rev = _raises(exp, "valid", lambda: parse_quectel_revision(raw),
                      not exp.values["valid"])
        exp.eq("release", rev.release if rev else None)
        exp.eq("minor", rev.minor if rev else None)


def _registration(case: dict[str, Any], events: list[Event], lines: list[str]) -> Any:
    texts = [e.text for e in events if isinstance(e, Urc)] if case["kind"] == "urc" else lines
    line = next(t for t in texts
                if line_prefix(t.strip()) in ("+CREG", "+CGREG", "+CEREG", "+C5GREG"))
    return parse_registration(line)


def check_registration(case: dict[str, Any], exp: Expect, events: list[Event],
                       lines: list[str]) -> None:
    reg = _registration(case, events, lines)
    exp.eq("state", reg.state, MM_REG_STATE.__getitem__)
    exp.eq("stat", reg.stat)
    exp.eq("n", reg.n)
    exp.eq("lac", _hex_int(reg.area))
    exp.eq("ci", _hex_int(reg.cell_id))
    exp.eq("access_tech", reg.act, MM_ACT.__getitem__)
    exp.eq("is_cgreg", reg.domain == "ps")
    exp.eq("is_cereg", reg.domain == "eps")
    exp.eq("is_c5greg", reg.domain == "5gs")
    if "exception" in exp:  # pygsm's waitForNetworkCoverage gives up on denied and idle
        assert exp.get("exception") == "InvalidStateException"
        assert reg.state in ("denied", "not-registered")


def check_network(cmd: str, exp: Expect, lines: list[str]) -> None:
    verb = cmd.upper()
    if verb == "AT+CEER":
        report = _raises(exp, "error", lambda: parse_ceer(lines), exp.values["error"])
        exp.eq("reason", report.text if report else None)
    elif verb == "AT+COPS=?":
        nets = parse_cops_list(lines)
        exp.eq("networks", [(n.status, n.long_name, n.short_name, n.mcc_mnc, n.act)
                            for n in nets],
               lambda want: [(MM_NETWORK_STATUS[w["status"]], w["operator_long"],
                              w["operator_short"], w["operator_code"], MM_ACT[w["access_tech"]])
                             for w in want])
        exp.eq("charset", "GSM")  # names are taken as printed
        exp.eq("parse_error", False)
    elif verb.endswith("+COPS?"):
        if "networkName" in exp:
            try:
                name = parse_cops(lines).name
            except ParseError:
                name = None
            exp.eq("networkName", name)
            return
        op = parse_cops(lines)
        exp.eq("mode", op.mode)
        exp.eq("format", op.format)
        exp.eq("operator", op.oper)
        exp.eq("oper", op.oper)
        exp.eq("access_tech", op.act, MM_ACT.__getitem__)
        exp.eq("act", op.act_code)


def check_signal(cmd: str, exp: Expect, lines: list[str]) -> None:
    verb = cmd.upper()
    if verb == "AT+CSQ":
        sig = parse_csq(lines)
        # python-gsmmodem's signalStrength and the synthetic rssi are the raw <rssi> index
        exp.eq("signalStrength", sig.rssi_dbm,
               lambda want: None if want == -1 else -113 + 2 * want)
        exp.eq("rssi", sig.rssi_dbm, lambda want: None if want == 99 else -113 + 2 * want)
        exp.eq("ber", sig.ber, lambda want: None if want == 99 else want)
    elif verb == "AT+CESQ":
        sig = parse_cesq(lines)
        for level, (ours, converted) in CESQ_LEVELS.items():
            if exp.get(level) in (99, 255):
                assert getattr(sig, ours) is None, level
            else:
                assert getattr(sig, ours) == pytest.approx(exp.get(converted), abs=0.1)
        exp.eq("ber", sig.ber, lambda want: None if want == 99 else want)
        exp.eq("gsm_info", sig.rssi_dbm is not None)
        exp.eq("umts_info", sig.rscp_dbm is not None)
        exp.eq("lte_info", sig.rsrp_dbm is not None or sig.rsrq_db is not None)


def check_device(case: dict[str, Any], cmd: str, exp: Expect, lines: list[str]) -> None:
    verb = cmd.upper()
    if verb == "AT+CFUN?" and lines and ("fun" in exp or "power_state" in exp):
        vendor = case["vendor_model"] or ""
        profile = vendors.identify(vendor, "")
        radio = parse_cfun(lines, profile.cfun_states)
        exp.eq("fun", radio.fun)
        exp.eq("power_state", radio.state, MM_POWER.__getitem__)
    elif verb in ("AT+CCLK?", "AT^NWTIME?"):
        parser = parse_cclk if verb == "AT+CCLK?" else parse_nwtime
        failed = not exp.values["success"]
        time = _raises(exp, "success", lambda: parser(lines), failed)
        when = time.when if time else None
        exp.eq("iso8601", when, lambda want: want and datetime.fromisoformat(want))
        if time is not None:
            assert time.when.utcoffset() == datetime.fromisoformat(
                exp.values["iso8601"]).utcoffset()
            exp.eq("tz_offset_minutes", time.when.utcoffset().total_seconds() // 60)
            exp.eq("dst_offset_minutes", time.dst_minutes)


def check_packet(cmd: str, exp: Expect, lines: list[str]) -> None:
    verb = cmd.upper()
    if verb == "AT+CGDCONT=?":
        formats = parse_cgdcont_test(lines)
        # MM's parser drops PPP entries; ours keeps them
        exp.eq("formats", [(f.min_cid, f.max_cid, f.pdp_type) for f in formats
                           if f.pdp_type != "PPP"],
               lambda want: [(w["min_cid"], w["max_cid"], MM_PDP_TYPE[w["pdp_type"]])
                             for w in want])
        exp.eq("pdp_types", [f.pdp_type for f in formats])
        exp.eq("cid_range", [formats[0].min_cid, formats[0].max_cid])
    elif verb == "AT+CGDCONT?":
        exp.eq("contexts", [(c.cid, c.pdp_type, c.apn) for c in parse_cgdcont(lines)],
               lambda want: [(w["cid"], MM_PDP_TYPE[w["pdp_type"]], w["apn"]) for w in want])
    elif verb in ("AT+CGACT?", "AT!SCACT?"):
        states = parse_cgact(lines, "+CGACT" if verb == "AT+CGACT?" else "!SCACT")
        exp.eq("contexts", list(states.items()),
               lambda want: [(w["cid"], w["active"]) for w in want])
    elif verb.startswith("AT+CGCONTRDP"):
        params = parse_cgcontrdp(lines)
        for key, ours in (("cid", params.cid), ("bearer_id", params.bearer_id),
                          ("apn", params.apn), ("local_address", params.local_address),
                          ("subnet", params.subnet), ("gateway_address", params.gateway),
                          ("dns_primary_address", params.dns_primary),
                          ("dns_secondary_address", params.dns_secondary)):
            exp.eq(key, ours)
    elif verb == "AT+UGCNTRD":
        counters = {c.cid: c for c in parse_ugcntrd(lines)}
        mine = counters[exp.get("cid")]
        exp.eq("session_tx_bytes", mine.sent)
        exp.eq("session_rx_bytes", mine.received)
        exp.eq("total_tx_bytes", mine.total_sent)
        exp.eq("total_rx_bytes", mine.total_received)


def check_cgev(exp: Expect, events: list[Event]) -> None:
    urc = next(e for e in events if isinstance(e, Urc))
    event = parse_cgev(urc.text)
    exp.eq("event", event.event, lambda want: want.lower().replace("_", "-"))
    exp.eq("cid", event.cid, lambda want: want or None)  # MM's 0 stands for "absent"
    exp.eq("pdp_type", event.pdp_type)
    exp.eq("pdp_addr", event.address)
    exp.eq("parent_cid", event.parent_cid)
    exp.eq("event_type", event.event_type)


def check_case(case: dict[str, Any]) -> None:
    exp = Expect(case["expected"])
    cmd = _command(case) or ""
    if case["kind"] == "value_fragment":
        if case["category"] == "pin":
            check_sim(cmd, case, exp, [], [])
        else:
            check_fragment(case, exp)
    else:
        events = feed(case)
        lines = [e.text for e in events if isinstance(e, Info)]
        check_generic(exp, events)
        category = case["category"]
        if category.startswith("framing"):
            check_framing(case, exp, events)
        elif category == "cme_error":
            check_error(exp, events)
        elif category == "registration" or cmd.upper() in ("AT+CREG?", "AT+CGREG?"):
            if set(exp.values) - {"final_result", "info_lines"}:  # +ZPAS: framing only
                check_registration(case, exp, events, lines)
        elif category == "pdp_event_urc":
            check_cgev(exp, events)
        else:
            check_identity(cmd, exp, lines)
            check_sim(cmd, case, exp, events, lines)
            check_network(cmd, exp, lines)
            check_signal(cmd, exp, lines)
            check_device(case, cmd, exp, lines)
            check_packet(cmd, exp, lines)
    assert not exp.unchecked(), f"expected keys not compared: {sorted(exp.unchecked())}"


@pytest.mark.skipif(not CASES, reason=f"corpus not found at {CORPUS} (CI has it beside the "
                                      "checkout)")
@pytest.mark.parametrize("case", IN_SCOPE, ids=[c["id"] for c in IN_SCOPE])
def test_corpus_case(case: dict[str, Any]) -> None:
    check_case(case)


def test_corpus_counts(capsys: pytest.CaptureFixture[str]) -> None:
    if not CASES:
        pytest.skip(f"corpus not found at {CORPUS} (CI has it beside the checkout)")
    failed = []
    for case in IN_SCOPE:
        try:
            check_case(case)
        except (AssertionError, ModemError, StopIteration, KeyError):
            failed.append(case["id"])
    out = len(CASES) - len(IN_SCOPE)
    stale = set(OUT_OF_SCOPE) - {c["id"] for c in CASES} - {c["category"] for c in CASES}
    with capsys.disabled():
        print(f"\ncorpus: {len(CASES)} cases, {len(IN_SCOPE)} in scope, "
              f"{len(IN_SCOPE) - len(failed)} passed, {out} out of scope")
    assert not stale, f"OUT_OF_SCOPE names no case: {sorted(stale)}"
    assert not failed, f"in-scope cases failing: {failed}"
