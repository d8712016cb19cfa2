from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sim.manifest import (
    ManifestError,
    SimEntry,
    load_manifest,
    normalise_iccid,
    parse_csv,
    parse_deadline,
    parse_toml,
)
from drivers.parsers import luhn_valid

GOOD = "8981100005819510018"  # valid Luhn digit
BAD_LUHN = "8981100005819510019"
OTHER = "8981100005819510026"
DEADLINE = datetime(2025, 3, 31, 14, 59, 59, tzinfo=UTC).timestamp()


def test_csv_manifest() -> None:
    manifest = parse_csv(
        "\ufeffICCID, Deadline ,apn,plan_bytes\n"
        "# factory batch 7\n"
        f"{GOOD}F,2025-03-31T23:59:59+09:00,soracom.io,1073741824\n"
        "\n"
        f'"{OTHER}",1743433199,,\n'
    )
    assert manifest.errors == () and manifest.warnings == ()
    assert manifest.entries == {
        GOOD: SimEntry(GOOD, DEADLINE, "soracom.io", 1 << 30, 3),
        OTHER: SimEntry(OTHER, DEADLINE, None, None, 5),
    }


def test_csv_bad_rows_are_reported_by_line_and_skipped() -> None:
    manifest = parse_csv(
        "iccid,deadline,apn,plan_bytes\n"
        f"{GOOD},2025-03-31T23:59:59,soracom.io,1\n"  # no offset
        "12345,2025-03-31T23:59:59Z,,\n"
        f"{OTHER},2025-03-31T23:59:59Z,bad apn!,\n"
        f"{OTHER},2025-03-31T23:59:59Z,,-5\n"
        f"{OTHER},2025-03-31T23:59:59Z\n"
        f"{OTHER},,,\n"
        f"{OTHER},1e9999,,\n"
    )
    assert manifest.entries == {}
    assert [(p.line, p.message.split(":")[0]) for p in manifest.errors] == [
        (2, "deadline"), (3, "iccid"), (4, "apn"), (5, "plan_bytes"), (6, "2 fields, the header"
                                                                        " has 4"),
        (7, "deadline"), (8, "deadline"),
    ]
    assert str(manifest.errors[0]).startswith("line 2: deadline: needs a UTC offset")


def test_duplicate_iccid_is_refused_on_every_line() -> None:
    manifest = parse_csv(
        "iccid,deadline\n"
        f"{GOOD},1743433199\n"
        f"{OTHER},1743433199\n"
        f"{GOOD}F,1750000000\n"
    )
    assert list(manifest.entries) == [OTHER]
    assert [p.line for p in manifest.errors] == [2, 4]
    assert "listed more than once (line 2, line 4)" in manifest.errors[0].message


def test_luhn_mismatch_is_a_warning_only() -> None:
    manifest = parse_csv(f"iccid,deadline\n{BAD_LUHN},1743433199\n")
    assert BAD_LUHN in manifest.entries
    assert "Luhn" in str(manifest.warnings[0]) and manifest.warnings[0].line == 2


@pytest.mark.parametrize("text", [
    "", "# only a comment\n", "iccid,deadline,colour\n", "apn,plan_bytes\n",
    "iccid,iccid,deadline\n", 'iccid,deadline\n"unterminated,1\n',
])
def test_csv_unusable_file_applies_nothing(text: str) -> None:
    with pytest.raises(ManifestError):
        parse_csv(text)


def test_toml_manifest_with_line_numbers() -> None:
    manifest = parse_toml(
        "[[sim]]\n"
        f'iccid = "{GOOD}"\n'
        "deadline = 2025-03-31T23:59:59+09:00\n"
        'apn = "soracom.io"\n'
        "plan_bytes = 1073741824\n"
        "\n"
        "[[sim]]\n"
        f'iccid = "{OTHER}"\n'
        "deadline = 2025-03-31T23:59:59\n"
        "\n"
        "[[sim]]\n"
        f'iccid = "{OTHER}1"\n'
        "deadline = 1743433199\n"
        "plan_bytes = true\n"
        "\n"
        " [[ sim ]]\n"
        'iccid = "8981100005819510034"\n'
        'deadline = "2025-03-31T14:59:59Z"\n'
        'colour = "red"\n'
    )
    assert manifest.entries == {GOOD: SimEntry(GOOD, DEADLINE, "soracom.io", 1 << 30, 1)}
    assert [(p.line, p.message.split(":")[0]) for p in manifest.errors] == [
        (7, "deadline"), (11, "plan_bytes"), (16, "unknown keys ['colour']; expected ['iccid', "
                                                  "'deadline', 'apn', 'plan_bytes']")]


def test_toml_inline_array_reports_entries() -> None:
    manifest = parse_toml(f'sim = [{{iccid = "{GOOD}", deadline = 1743433199}}, 5]\n')
    assert list(manifest.entries) == [GOOD]
    assert str(manifest.errors[0]) == "entry 2: not a table"


@pytest.mark.parametrize("text", ["[[sim]\n", "other = 1\n", "sim = 3\n"])
def test_toml_unusable_file_applies_nothing(text: str) -> None:
    with pytest.raises(ManifestError):
        parse_toml(text)


def test_load_manifest_by_suffix(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text(f"iccid,deadline\n{GOOD},1743433199\n")
    (tmp_path / "m.toml").write_text(f'[[sim]]\niccid = "{GOOD}"\ndeadline = 1743433199\n')
    (tmp_path / "m.xlsx").write_bytes(b"PK")
    (tmp_path / "bad.csv").write_bytes(b"\xff\xfe\x00")
    assert list(load_manifest(tmp_path / "m.csv").entries) == [GOOD]
    assert list(load_manifest(tmp_path / "m.toml").entries) == [GOOD]
    for name in ("m.xlsx", "bad.csv", "missing.csv"):
        with pytest.raises(ManifestError, match=name):
            load_manifest(tmp_path / name)


def test_iccid_normalisation() -> None:
    assert normalise_iccid(f" {GOOD.lower()}ff ") == (GOOD, None)
    assert normalise_iccid("1" * 18)[1] is not None  # not an E.118 telecom ICCID
    for bad in ("89811", "8981100005819510018X", "8" * 23, 8981100005819510018):
        with pytest.raises(ValueError, match="18-22 digits"):
            normalise_iccid(bad)


def test_deadline_forms() -> None:
    assert parse_deadline("2025-03-31T14:59:59Z") == DEADLINE
    assert parse_deadline(" 1743433199 ") == DEADLINE
    assert parse_deadline(datetime(2025, 3, 31, 14, 59, 59, tzinfo=UTC)) == DEADLINE
    for bad in ("2025-03-31", "tomorrow", True, 0, "99999999999", float("nan")):
        with pytest.raises(ValueError, match="deadline"):
            parse_deadline(bad)


@given(st.text(alphabet="0123456789", min_size=17, max_size=21))
def test_valid_iccids_round_trip_with_a_luhn_digit(body: str) -> None:
    iccid = "89" + body[2:]
    iccid += next(d for d in "0123456789" if luhn_valid(iccid + d))
    if not 18 <= len(iccid) <= 22:
        return
    manifest = parse_csv(f"iccid,deadline\n{iccid}F,1743433199\n")
    assert list(manifest.entries) == [iccid] and manifest.warnings == ()


@given(st.text(max_size=300))
def test_arbitrary_text_only_raises_manifest_error(text: str) -> None:
    for parse in (parse_csv, parse_toml):
        try:
            manifest = parse(text)
        except ManifestError:
            continue
        assert all(len(e.iccid) >= 18 for e in manifest.entries.values())
