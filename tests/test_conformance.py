from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from agent.sim.conformance import (
    ConformanceError,
    ConformanceList,
    MalfunctionDetector,
    country_of,
    firmware_at_least,
    load_signed,
    parse_list,
)
from agent.sim.conformance import check as judge
from drivers.modem import Identity

LIST = b"""
version = 3
policy = "enforce"

[[terminal]]
manufacturer = "Quectel"
model = "EC25"
tac_prefixes = ["86145803"]
min_firmware = "EC25JFAR06A06M4G"
regions = ["JP"]

[terminal.certifications.JP]
radio_act = "003-180231"
telecom_business_act = "D180155003"

[[terminal]]
manufacturer = "SIMCom"
model = "SIM7600G-H"
tac_prefixes = ["352099"]
min_firmware = "LE20B04SIM7600G22"
foreign_terminal_approval = true

[terminal.certifications.US]
fcc = "2AJYU-8PYA001"
"""

EC25 = Identity("Quectel", "EC25", "EC25JFAR06A07M4G", "861458031234568")
SIM7600 = Identity("SIMCOM INCORPORATED", "SIMCOM_SIM7600G-H", "LE20B04SIM7600G22",
                   "352099001761481")


def _sign(key: Ed25519PrivateKey, data: bytes) -> str:
    return base64.urlsafe_b64encode(key.sign(data)).rstrip(b"=").decode()


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture
def lst() -> ConformanceList:
    return parse_list(LIST, "toml")


def test_signed_list_is_accepted(key: Ed25519PrivateKey) -> None:
    got = load_signed(LIST, _sign(key, LIST) + "\n", _pem(key), "toml")
    assert got.version == 3 and got.policy == "enforce" and len(got.terminals) == 2
    assert got.terminals[0].certifications["JP"]["radio_act"] == "003-180231"
    assert got.foreign_approval_countries == ("JP",)


def test_json_list_is_accepted(key: Ed25519PrivateKey) -> None:
    data = json.dumps({"version": 1, "policy": "warn", "terminal": [
        {"manufacturer": "u-blox", "model": "SARA-R410M", "tac_prefixes": ["35"]}]}).encode()
    got = load_signed(data, _sign(key, data).encode(), _pem(key), "json")
    assert got.policy == "warn" and got.terminals[0].model == "SARA-R410M"


def test_refusals(key: Ed25519PrivateKey) -> None:
    sig, pem = _sign(key, LIST), _pem(key)
    other = Ed25519PrivateKey.generate()
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    cases = {
        "not signed": (LIST, "", pem),
        "does not match": (LIST.replace(b"version = 3", b"version = 4"), sig, pem),
        "does not match ": (LIST, _sign(other, LIST), pem),
        "not base64url": (LIST, sig[:-2] + "+/", pem),
        "without padding": (LIST, sig + "==", pem),
        "Ed25519 needs 64": (LIST, sig[:40], pem),
        "not an Ed25519 key": (LIST, sig, ec_pem),
        "not a PEM public key": (LIST, sig, b"garbage"),
    }
    for reason, (data, signature, public) in cases.items():
        with pytest.raises(ConformanceError, match=reason.strip()):
            load_signed(data, signature, public, "toml")


def test_older_list_is_refused(key: Ed25519PrivateKey, lst: ConformanceList) -> None:
    newer = replace(lst, version=9)
    with pytest.raises(ConformanceError, match="older than 9"):
        load_signed(LIST, _sign(key, LIST), _pem(key), "toml", current=newer)


@pytest.mark.parametrize(("data", "reason"), [
    (b"version = ", "not valid TOML"),
    (b"\xff", "not valid TOML"),
    (b"policy = 'enforce'", "version"),
    (b"version = 1\npolicy = 'maybe'", "policy"),
    (b"version = 1\ncolour = 1", "unknown keys"),
    (b"version = 1\n[[terminal]]\nmanufacturer = 'A'\nmodel = 'B'\ntac_prefixes = []",
     "at least one TAC"),
    (b"version = 1\n[[terminal]]\nmanufacturer = 'A'\nmodel = 'B'\ntac_prefixes = ['12x']",
     "tac_prefixes"),
    (b"version = 1\n[[terminal]]\nmanufacturer = 'A'\nmodel = 'B'\ntac_prefixes = ['1']\n"
     b"[terminal.certifications.JP]\nradio_law = '1'", "unknown keys"),
    (b"version = 1\n[[terminal]]\nmanufacturer = 'A'\nmodel = 'B'\ntac_prefixes = ['1']\n"
     b"foreign_terminal_approval = 'yes'", "foreign_terminal_approval"),
])
def test_malformed_lists(data: bytes, reason: str) -> None:
    with pytest.raises(ConformanceError, match=reason):
        parse_list(data, "toml")


def test_oversized_list_is_refused() -> None:
    with pytest.raises(ConformanceError, match="more than"):
        parse_list(b" " * (2 << 20), "json")


def test_conforming_japanese_terminal(lst: ConformanceList) -> None:
    verdict = judge(EC25, lst, "44010")
    assert verdict.conforming and verdict.radio_allowed
    assert verdict.country == "JP" and verdict.terminal is lst.terminals[0]
    assert verdict.to_json()["failures"] == []


def _checks(identity: Identity, lst: ConformanceList, mcc: str | None = "44010") -> list[str]:
    return [f.check for f in judge(identity, lst, mcc).failures]


def test_each_check_can_fail(lst: ConformanceList) -> None:
    assert _checks(replace(EC25, imei="861458031234567"), lst) == ["imei"]
    assert _checks(replace(EC25, imei=None), lst) == ["imei"]
    assert _checks(replace(EC25, imei="490154203237518"), lst) == ["tac"]
    assert _checks(replace(EC25, revision="EC25JFAR06A05M4G"), lst) == ["firmware"]
    assert _checks(replace(EC25, revision="garbage"), lst) == ["firmware"]
    assert _checks(replace(EC25, model="EG91"), lst) == ["model"]
    assert _checks(EC25, lst, "26201") == ["region", "certification"]


def test_japan_needs_both_marks(lst: ConformanceList) -> None:
    half = replace(lst.terminals[0], certifications={"JP": {"radio_act": "003-180231"}})
    verdict = judge(EC25, replace(lst, terminals=(half,)), "44020")
    assert [(f.check, f.reason) for f in verdict.failures] == [
        ("certification", "telecom_business_act for JP and no foreign-terminal approval")]
    assert not verdict.radio_allowed


def test_foreign_terminal_needs_approval_in_japan(lst: ConformanceList) -> None:
    assert judge(SIM7600, lst, "44010").conforming  # US-certified, approved by the carrier
    assert judge(SIM7600, lst, "310260").conforming
    unapproved = replace(lst.terminals[1], foreign_terminal_approval=False)
    verdict = judge(SIM7600, replace(lst, terminals=(unapproved,)), "44010")
    assert [f.check for f in verdict.failures] == ["certification"]
    assert "foreign-terminal approval" in verdict.failures[0].reason
    assert not judge(SIM7600, lst, "26201").conforming  # no DE certification at all


def test_unknown_country_leaves_certification_unchecked(lst: ConformanceList) -> None:
    verdict = judge(EC25, lst, None)
    assert verdict.conforming and verdict.unchecked == ("region", "certification")


def test_warn_policy_reports_but_allows_the_radio(lst: ConformanceList) -> None:
    verdict = judge(replace(EC25, imei="861458031234567"), replace(lst, policy="warn"), "44010")
    assert not verdict.conforming and verdict.radio_allowed


def test_best_entry_wins_among_several_for_a_model(lst: ConformanceList) -> None:
    old_line = replace(lst.terminals[0], min_firmware="EC25JFAR07A01M4G")
    both = replace(lst, terminals=(old_line, lst.terminals[0]))
    assert judge(EC25, both, "44010").conforming


@pytest.mark.parametrize(("revision", "minimum", "vendor", "expected"), [
    ("EC25JFAR06A06M4G", "EC25JFAR06A06M4G", "quectel", True),
    ("EC25EFAR06A07M4G", "EC25JFAR06A06M4G", "quectel", True),
    ("EC25JFAR05A09M4G", "EC25JFAR06A01M4G", "quectel", False),
    ("EC25JFAR10A01M4G", "EC25JFAR09A12M4G", "quectel", True),
    ("M95FAR02A08", "EC25JFAR06A06M4G", "quectel", False),
    ("bogus", "EC25JFAR06A06M4G", "quectel", None),
    ("25.30.226", "25.30.224", "telit", True),
    ("25.30.2", "25.30.10", "telit", False),
    ("L0.0.00.00.05.08", "L0.0.00.00.05.06", "u-blox", True),
    ("LE20B04SIM7600G22", "LE20B03SIM7600G22", "simcom", True),
    ("LE20B04SIM7600G22", "LE20B04SIM7600M22", "simcom", None),
    ("1.2", "1.2.0", "generic", False),
])
def test_firmware_compare(revision: str, minimum: str, vendor: str,
                          expected: bool | None) -> None:
    assert firmware_at_least(revision, minimum, vendor) is expected


def test_mcc_to_country() -> None:
    assert country_of("44010") == country_of("441") == "JP"
    assert country_of("310410") == "US"
    assert country_of("999") is None and country_of(None) is None


def test_malfunction_detector() -> None:
    detector = MalfunctionDetector(threshold=3, window=600)
    assert not detector.record(0) and not detector.record(300)
    assert detector.verdict() is None
    assert not detector.record(700)  # the reset at 0 fell out of the window
    assert detector.record(800)
    verdict = detector.verdict()
    assert verdict is not None and verdict.radio_allowed  # reported: the radio stays on
    assert verdict.failures[0].check == "malfunction"
    assert detector.count(800) == 3 and detector.count(1000) == 2
    assert detector.record(1e6)  # latched until an order clears it
    detector.clear()
    assert not detector.tripped and not detector.record(1e6 + 1)
    with pytest.raises(ValueError):
        MalfunctionDetector(threshold=0)


@given(st.lists(st.floats(0, 1e5), max_size=40))
def test_malfunction_trips_exactly_when_a_window_holds_threshold(times: list[float]) -> None:
    times = sorted(times)
    detector = MalfunctionDetector(threshold=4, window=100)
    for t in times:
        detector.record(t)
    expected = any(times[i + 3] - times[i] < 100 for i in range(len(times) - 3))
    assert detector.tripped is expected


def test_cryptography_is_loaded_only_to_verify() -> None:
    code = ("import sys, agent.sim.conformance, agent.sim.lifecycle, agent.sim.manifest;"
            " assert 'cryptography' not in sys.modules, 'loaded at import'")
    subprocess.run([sys.executable, "-c", code], check=True)
