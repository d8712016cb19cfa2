"""Typed parsers on transcripts the corpus lacks, and property tests.

The corpus README lists gaps with no attributable capture: +QCSQ, +QGDCNT, +QINISTAT, RDY,
POWERED DOWN, ^ICCID, +ICCID and +CEREG with a reject cause. The transcripts below are built
from the vendors' AT manuals (Quectel EC25/EC21 AT Commands Manual: +QCSQ, +QGDCNT, +QINISTAT,
+QCCID, +QENG, RDY, POWERED DOWN; SIMCom SIM7600 Series AT Command Manual: +CICCID/+ICCID,
+CPSI; Huawei ME909s AT Command Interface Specification: ^ICCID; u-blox SARA-R4 AT Commands
Manual and 3GPP TS 27.007 10.1.22: +CEREG=3 reject cause fields) and are not device captures.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.at import AtCodec, Final, Info, Urc
from drivers.errors import ModemError
from drivers.parsers import ParseError, device, identity, network, packet, signal, sim
from drivers.vendors import GENERIC, QUECTEL, SIMCOM, SIMCOM_LPWA, UBLOX_LPWA, identify


def answer(command: str, wire: bytes) -> tuple[list[str], list[Urc], Final | None]:
    codec = AtCodec()
    codec.send(command)
    codec.receive_data(wire)
    events = codec.events()
    return ([e.text for e in events if isinstance(e, Info)],
            [e for e in events if isinstance(e, Urc)],
            next((e for e in events if isinstance(e, Final)), None))


# -- Quectel (EC25/EC21 AT Commands Manual) ------------------------------------------------
def test_qcsq_lte() -> None:
    lines, _, _ = answer("AT+QCSQ", b'\r\n+QCSQ: "LTE",-52,-81,195,-10\r\n\r\nOK\r\n')
    sig = signal.parse_qcsq(lines)
    assert (sig.rssi_dbm, sig.rsrp_dbm, sig.rsrq_db) == (-52, -81.0, -10.0)
    assert sig.sinr_db == pytest.approx(19.0)  # 195 / 5 - 20


def test_qcsq_noservice_and_gsm() -> None:
    assert signal.parse_qcsq(['+QCSQ: "NOSERVICE"']) == signal.Signal()
    assert signal.parse_qcsq(['+QCSQ: "GSM",-69']).rssi_dbm == -69


def test_qgdcnt() -> None:
    lines, _, _ = answer("AT+QGDCNT?", b"\r\n+QGDCNT: 3503,1785\r\n\r\nOK\r\n")
    assert packet.parse_qgdcnt(lines) == (packet.DataCounters(sent=3503, received=1785),)


def test_qinistat() -> None:
    lines, _, _ = answer("AT+QINISTAT", b"\r\n+QINISTAT: 7\r\n\r\nOK\r\n")
    assert sim.parse_qinistat(lines) == sim.SimInit(True, True, True)
    assert sim.parse_qinistat(["+QINISTAT: 1"]) == sim.SimInit(True, False, False)
    with pytest.raises(ParseError):
        sim.parse_qinistat(["+QINISTAT: 9"])


def test_qccid_with_padding() -> None:
    lines, _, _ = answer("AT+QCCID", b"\r\n+QCCID: 8986002512830601247F\r\n\r\nOK\r\n")
    assert sim.parse_iccid(lines) == "8986002512830601247"


def test_qeng_servingcell_lte() -> None:
    line = ('+QENG: "servingcell","NOCONN","LTE","FDD",460,00,1A2D001,1,100,1,5,5,6A5F,'
            "-80,-10,-50,150,15,43,-")
    sig = signal.parse_qeng_servingcell([line])
    assert (sig.rsrp_dbm, sig.rsrq_db, sig.rssi_dbm, sig.sinr_db) == (-80.0, -10.0, -50, 10.0)
    assert signal.parse_qeng_servingcell(['+QENG: "servingcell","SEARCH"']) == signal.Signal()


@pytest.mark.parametrize("banner", [b"RDY", b"POWERED DOWN"])
def test_banner_during_a_command_is_a_banner_urc(banner: bytes) -> None:
    lines, urcs, final = answer("AT+CSQ", b"\r\n" + banner + b"\r\n")
    assert lines == [] and final is None
    assert urcs == [Urc(banner.decode(), banner=True)]


# -- SIMCom (SIM7600 Series AT Command Manual) ---------------------------------------------
def test_ciccid_answers_iccid() -> None:
    lines, _, _ = answer("AT+CICCID", b"\r\n+ICCID: 89860318760240006455\r\n\r\nOK\r\n")
    assert sim.parse_iccid(lines) == "89860318760240006455"


def test_cpsi_sim7600_tenths() -> None:
    line = "+CPSI: LTE,Online,460-00,0x5A1E,187214780,257,EUTRAN-BAND3,1350,5,5,-94,-850,-545,15"
    sig = signal.parse_cpsi([line])
    assert (sig.rsrq_db, sig.rsrp_dbm, sig.rssi_dbm, sig.sinr_db) == (-9.4, -85.0, -54, 10)


def test_cpsi_sim7080_whole_units_and_no_service() -> None:
    line = ("+CPSI: LTE CAT-M1,Online,460-00,0x1816,189497461,446,EUTRAN-BAND3,1850,4,4,"
            "-9,-84,-61,16")
    sig = signal.parse_cpsi([line])
    assert (sig.rsrq_db, sig.rsrp_dbm, sig.rssi_dbm, sig.sinr_db) == (-9.0, -84.0, -61, 16.0)
    assert signal.parse_cpsi(["+CPSI: NO SERVICE,Online"]) == signal.Signal()


def test_simcom_revision_prefix() -> None:
    assert identity.parse_revision(["+CGMR: LE20B04SIM7600M22"]) == "LE20B04SIM7600M22"


# -- Huawei (ME909s AT Command Interface Specification) ------------------------------------
def test_huawei_iccid_in_ef_order() -> None:
    lines, _, _ = answer("AT^ICCID?", b"\r\n^ICCID: 98684006905725211116\r\n\r\nOK\r\n")
    assert sim.parse_iccid(lines) == "89860460097552121161"


# -- +CEREG with reject cause (TS 27.007 10.1.22, u-blox SARA-R4 manual) --------------------
def test_cereg_read_with_reject_cause() -> None:
    lines, urcs, _ = answer("AT+CEREG?", b'\r\n+CEREG: 3,3,"1A2B","01A2B3C4",7,0,8\r\n\r\nOK\r\n')
    assert urcs == []
    reg = network.parse_registration(lines[0])
    assert (reg.n, reg.state, reg.tac, reg.cell_id, reg.act) == (3, "denied", "1A2B",
                                                                 "01A2B3C4", "lte")
    assert (reg.cause_type, reg.reject_cause) == (0, 8)


def test_cereg_urc_with_reject_cause_and_empty_location() -> None:
    reg = network.parse_registration("+CEREG: 3,,,,0,7")
    assert (reg.n, reg.stat, reg.tac, reg.cause_type, reg.reject_cause) == (None, 3, None, 0, 7)


def test_ceer_sierra_form() -> None:
    report = network.parse_ceer(['+CEER: "EMM reject",19,"ESM failure"'])
    assert report == network.ErrorReport("ESM failure", "EMM reject", 19)
    assert network.parse_ceer(["+CEER: EPS_AND_NON_EPS_SERVICES_NOT_ALLOWED"]).cause == 8


# -- vendor dialects as data ---------------------------------------------------------------
@pytest.mark.parametrize(("cgmi", "cgmm", "profile"), [
    ("Quectel", "EC25", QUECTEL), ("Quectel", "BG96", QUECTEL),
    ("SIMCOM INCORPORATED", "SIMCOM_SIM7600E-H", SIMCOM),
    ("SIMCOM INCORPORATED", "SIMCOM_SIM7080G", SIMCOM_LPWA),
    ("u-blox", "SARA-R410M-02B", UBLOX_LPWA), ("ACME", "X1", GENERIC), (None, None, GENERIC),
])
def test_identify(cgmi: str | None, cgmm: str | None, profile: object) -> None:
    assert identify(cgmi, cgmm) is profile


def test_act_numbering_is_per_vendor() -> None:
    line = '+CEREG: 2,1,"1A2B","01A2B3C4",8'
    assert network.parse_registration(line, QUECTEL.act_names).act == "lte-m"  # BG9x eMTC
    assert network.parse_registration(line).act == "gsm"  # 27.007: EC-GSM-IoT
    assert network.parse_registration(line.replace(",8", ",7"), UBLOX_LPWA.act_names).act \
        == "lte-m"


def test_imei_luhn() -> None:
    assert identity.imei_valid("490154203237518")  # the GSMA's worked example
    assert not identity.imei_valid("490154203237519")
    assert not identity.imei_valid("49015420323751")


def test_iccid_padding_difference_is_no_swap() -> None:
    # the same card read by the vendor command and through EF_ICCID
    plain = sim.parse_iccid(["+CCID: 8944200053671052499F"])
    assert sim.iccid_from_crsm(['+CRSM: 144,0,"984402003576012594F9"']) == plain
    with pytest.raises(ParseError):
        sim.iccid_from_crsm(['+CRSM: 148,4,""'])


def test_cclk_unset_clock_is_not_in_the_future() -> None:
    assert device.parse_cclk(['+CCLK: "80/01/06,00:00:12+00"']).when.year == 1980


# -- property tests: arbitrary text raises only our own errors ------------------------------
LINE_PARSERS: list[Callable[[Sequence[str]], Any]] = [
    identity.parse_manufacturer, identity.parse_serial, identity.parse_ati,
    identity.parse_telit_package, sim.parse_cpin, sim.parse_iccid, sim.parse_crsm,
    sim.iccid_from_crsm, sim.parse_imsi, sim.parse_csim_pin_retries, sim.parse_upincnt,
    sim.parse_qss, sim.parse_cnum, sim.parse_qinistat, network.parse_ceer, network.parse_cops,
    network.parse_cops_list, signal.parse_csq, signal.parse_cesq, signal.parse_qeng_servingcell,
    signal.parse_qcsq, signal.parse_cpsi, device.parse_cfun, device.parse_cclk,
    device.parse_nwtime, packet.parse_cgdcont, packet.parse_cgdcont_test, packet.parse_cgact,
    packet.parse_cgpaddr, packet.parse_cgcontrdp, packet.parse_qgdcnt, packet.parse_ugcntrd,
    packet.parse_gdatavol, packet.parse_dsflowqry,
]
PREFIXES = ["+CPIN: ", "+CCID: ", "+CRSM: ", "+CSIM: ", "+UPINCNT: ", "#QSS: ", "+CNUM: ",
            "+QINISTAT: ", "+CEER: ", "+COPS: ", "+CSQ: ", "+CESQ: ", '+QENG: "servingcell",',
            "+QCSQ: ", "+CPSI: ", "+CFUN: ", "+CCLK: ", "^NWTIME: ", "+CGDCONT: ", "+CGACT: ",
            "+CGPADDR: ", "+CGCONTRDP: ", "+QGDCNT: ", "+UGCNTRD: ", "#GDATAVOL: ",
            "^DSFLOWQRY: ", "+CREG: ", "+CEREG: ", "+CGEV: ", ""]
FIELD_TEXT = st.text(alphabet=st.sampled_from(list('0123456789ABCDEFx",.:()- +-/\\ F')),
                     max_size=40)
LINES = st.lists(
    st.one_of(st.text(max_size=60),
              st.builds(lambda p, t: p + t, st.sampled_from(PREFIXES), FIELD_TEXT)),
    max_size=4)


def _only_our_errors(call: Callable[[], Any]) -> None:
    with contextlib.suppress(ModemError):
        call()


@given(LINES)
def test_line_parsers_raise_only_modem_errors(lines: list[str]) -> None:
    for parse in LINE_PARSERS:
        _only_our_errors(lambda parse=parse: parse(lines))  # type: ignore[misc]


@given(st.one_of(st.text(max_size=60),
                 st.builds(lambda p, t: p + t, st.sampled_from(PREFIXES), FIELD_TEXT)))
def test_single_line_parsers_raise_only_modem_errors(line: str) -> None:
    for parse in (network.parse_registration, packet.parse_cgev, sim.pin_state,
                  sim.iccid_from_field, identity.parse_quectel_revision):
        _only_our_errors(lambda parse=parse: parse(line))  # type: ignore[misc]


@given(st.text(alphabet="0123456789", min_size=19, max_size=20))
def test_iccid_round_trips_through_ef_order(digits: str) -> None:
    iccid = "89" + digits[2:]
    padded = iccid + "F" * (20 - len(iccid))
    swapped = "".join(padded[i + 1] + padded[i] for i in range(0, 20, 2))
    assert sim.iccid_from_field(swapped) == sim.iccid_from_field(iccid) == iccid.rstrip("F")
