"""provision batch and verify-log: bad rows by line, idempotent re-runs, recovery after a
crash between bundle and record, and a birth log whose edits and deletions are found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_provision import ICCID_A, ICCID_B, Factory, factory, gen_dir, luhn

__all__ = ["factory"]

IMEIS = [luhn(f"3569380356438{i}") for i in range(10)]
ICCIDS = [luhn(f"89811000058195100{i}") for i in range(3, 10)]


def _csv(tmp: Path, *rows: str) -> Path:
    path = tmp / "line.csv"
    path.write_text("\n".join(["device_id,imei,iccid", *rows]) + "\n")
    return path


def _batch(factory: Factory, capsys: pytest.CaptureFixture[str], csv: Path,
           *extra: str | Path) -> tuple[int, str, str]:
    return factory.cli(capsys, "batch", "--csv", csv, "--ca", factory.ca, "--station-key",
                       factory.station_key, "--out", csv.parent / "out", "--operator-key",
                       factory.operator_pub, "--broker", "mqtt.example.com", *extra)


def _log(csv: Path) -> Path:
    return csv.parent / "out/factory-log.jsonl"


def _verify_log(factory: Factory, capsys: pytest.CaptureFixture[str], log: Path,
                *extra: str) -> tuple[int, str, str]:
    return factory.cli(capsys, "verify-log", "--station-pub", factory.station_pub, log, *extra)


GOOD = [f"gw-{i:04d},{IMEIS[i]},{ICCIDS[i]}" for i in range(3)]


def test_batch_bad_rows_by_line_and_idempotent(factory: Factory, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    csv = _csv(tmp_path,
               GOOD[0],
               "# a comment",
               f"bad id,{IMEIS[5]},{ICCIDS[5]}",   # line 4
               f"gw-0100,123,{ICCIDS[6]}",         # line 5
               GOOD[1],
               "gw-0101,only-two",                 # line 7
               f"gw-0102,{IMEIS[1]},{ICCIDS[4]}",  # line 8: IMEI of line 6
               "",
               GOOD[2])
    rc, out, err = _batch(factory, capsys, csv)
    assert rc == 1
    assert "made 1, skipped 0" not in out and out.startswith("made 2,")
    lines = {line.split(":")[1] for line in err.splitlines()}
    assert lines == {"line 4", "line 5", "line 6", "line 7", "line 8"}, err
    assert f"imei {IMEIS[1]} is on lines 6, 8" in err
    out_dir = tmp_path / "out"
    assert sorted(p.name for p in out_dir.iterdir() if p.is_dir()) == ["gw-0000", "gw-0002"]
    for name in ("gw-0000", "gw-0002"):
        assert factory.cli(capsys, "verify", out_dir / name)[0] == 0
    log = _log(csv).read_bytes()
    records = [json.loads(line) for line in log.splitlines()]
    assert [r["device_id"] for r in records] == ["gw-0000", "gw-0002"]
    meta = json.loads((gen_dir(out_dir / "gw-0000") / "bundle.json").read_text())
    assert records[0]["cert_sha256"] == meta["cert_sha256"]
    assert (records[0]["imei"], records[0]["iccid"]) == (IMEIS[0], ICCIDS[0])

    # Fix the duplicate; re-run: the finished devices are skipped, nothing is re-made.
    csv.write_text(csv.read_text().replace(f"gw-0102,{IMEIS[1]}", f"gw-0102,{IMEIS[7]}"))
    before = {p: gen_dir(out_dir / p) for p in ("gw-0000", "gw-0002")}
    rc, out, err = _batch(factory, capsys, csv)
    assert rc == 1 and out.startswith("made 2, skipped 2 ")  # lines 6 and 8 now
    assert {p: gen_dir(out_dir / p) for p in before} == before
    assert _log(csv).read_bytes().startswith(log)
    rc, out, _ = _batch(factory, capsys, csv)
    assert out.startswith("made 0, skipped 4 ")
    assert _verify_log(factory, capsys, _log(csv))[0] == 0


def test_batch_recovers_a_record_lost_in_a_crash(factory: Factory, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    csv = _csv(tmp_path, *GOOD)
    assert _batch(factory, capsys, csv)[0] == 0
    log = _log(csv)
    full = log.read_bytes()
    log.write_bytes(b"".join(full.splitlines(keepends=True)[:2]))  # the last append never hit disk
    rc, out, _ = _batch(factory, capsys, csv)
    assert rc == 0
    assert out.startswith("made 0, skipped 2 (done before), reconfigured 0, recovered 1")
    last = json.loads(log.read_bytes().splitlines()[-1])
    assert last["cert_sha256"] == json.loads(full.splitlines()[-1])["cert_sha256"]
    assert _verify_log(factory, capsys, log)[0] == 0


def test_batch_rerun_with_other_settings_says_so_and_can_reconfigure(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 11, item 9: a re-run with another broker says what differs per device; with
    --reconfigure each gets the new settings, its identity (key, certificate) and record kept."""
    csv = _csv(tmp_path, *GOOD[:2])
    assert _batch(factory, capsys, csv)[0] == 0
    out_dir = tmp_path / "out"
    cert = (gen_dir(out_dir / "gw-0000") / "device.pem").read_bytes()
    log = _log(csv).read_bytes()
    rc, out, err = _batch(factory, capsys, csv, "--broker", "broker.example.net:8883")
    assert rc == 0 and out.startswith("made 0, skipped 2 (done before), reconfigured 0")
    assert ('line 2: gw-0000: done before with other settings (host = "mqtt.example.com" in'
            ' config.toml, not host = "broker.example.net"); it keeps them: --reconfigure') in err
    rc, out, err = _batch(factory, capsys, csv, "--broker", "broker.example.net:8883",
                          "--reconfigure")
    assert rc == 0 and out.startswith("made 0, skipped 0 (done before), reconfigured 2"), err
    config = (gen_dir(out_dir / "gw-0000") / "config.toml").read_text()
    assert 'host = "broker.example.net"' in config and "port = 8883" in config
    assert (gen_dir(out_dir / "gw-0000") / "device.pem").read_bytes() == cert
    assert _log(csv).read_bytes() == log  # the same identities: no new birth
    assert factory.cli(capsys, "verify", out_dir / "gw-0000")[0] == 0
    rc, out, err = _batch(factory, capsys, csv, "--broker", "broker.example.net:8883")
    assert out.startswith("made 0, skipped 2 (done before), reconfigured 0") and not err


def test_batch_conflicts_with_the_log(factory: Factory, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    csv = _csv(tmp_path, *GOOD)
    assert _batch(factory, capsys, csv)[0] == 0
    csv = _csv(tmp_path, f"gw-0000,{IMEIS[8]},{ICCIDS[0]}", f"gw-0009,{IMEIS[1]},{ICCIDS[6]}")
    rc, out, err = _batch(factory, capsys, csv)
    assert rc == 1 and out.startswith("made 0, skipped 0")
    assert f"line 2: gw-0000: born at log line 1 with imei {IMEIS[0]}" in err
    assert f"line 3: gw-0009: imei {IMEIS[1]} was born as gw-0001 (log line 2)" in err


def test_batch_bundles_manifest_rows_and_refuses_missing_sim(
        factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _csv(tmp_path, f"gw-a,{IMEIS[0]},{ICCID_A}", f"gw-b,{IMEIS[1]},{ICCID_B}",
               f"gw-c,{IMEIS[2]},{ICCIDS[0]}")
    rc, out, err = _batch(factory, capsys, csv, "--manifest", factory.manifest)
    assert rc == 1 and out.startswith("made 2,")
    assert f"line 4: gw-c: ICCID {ICCIDS[0]} has no valid row in the manifest" in err
    rows = (gen_dir(tmp_path / "out/gw-b") / "manifest.csv").read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith(f"{ICCID_B},2099-04-30T00:00:00Z")


def test_batch_whole_file_errors(factory: Factory, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "line.csv"
    path.write_text("device,imei\nx,y\n")
    rc, _, err = _batch(factory, capsys, path)
    assert rc == 1 and "header must name the columns" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# -- verify-log -----------------------------------------------------------------------------


@pytest.fixture
def log(factory: Factory, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    csv = _csv(tmp_path, *GOOD, f"gw-0003,{IMEIS[3]},{ICCIDS[3]}")
    assert _batch(factory, capsys, csv)[0] == 0
    return _log(csv)


def _lines(log: Path) -> list[bytes]:
    return log.read_bytes().splitlines(keepends=True)


def test_verify_log_ok_and_head(factory: Factory, log: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = _verify_log(factory, capsys, log)
    assert rc == 0 and "4 records" in out
    head = out.split()[-1]
    assert _verify_log(factory, capsys, log, "--head", head)[0] == 0
    log.write_bytes(b"".join(_lines(log)[:3]))  # cut off the end: only the head tells
    assert _verify_log(factory, capsys, log)[0] == 0
    rc, out, _ = _verify_log(factory, capsys, log, "--head", head)
    assert rc == 1 and "line 3: the last line's hash is not the expected head" in out


def test_verify_log_edited_line(factory: Factory, log: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    lines = _lines(log)
    lines[1] = lines[1].replace(IMEIS[1].encode(), IMEIS[9].encode())
    log.write_bytes(b"".join(lines))
    rc, out, _ = _verify_log(factory, capsys, log)
    assert rc == 1
    assert out.splitlines() == [f"{log}:line 2: signature does not verify (the line was edited)"]


def test_verify_log_deleted_line(factory: Factory, log: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    lines = _lines(log)
    del lines[1]
    log.write_bytes(b"".join(lines))
    rc, out, _ = _verify_log(factory, capsys, log)
    assert rc == 1 and len(out.splitlines()) == 1
    assert out.startswith(f"{log}:line 2: chain broken: prev is not the hash of line 1")


def test_verify_log_reordered_and_torn(factory: Factory, log: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    lines = _lines(log)
    log.write_bytes(b"".join([lines[0], lines[2], lines[1], lines[3]]))
    rc, out, _ = _verify_log(factory, capsys, log)
    assert rc == 1 and "line 2: chain broken" in out
    log.write_bytes(b"".join(lines) + lines[0][:20])
    rc, out, _ = _verify_log(factory, capsys, log)
    assert rc == 1 and "line 5: incomplete" in out


def test_verify_log_other_station(factory: Factory, log: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert factory.cli(capsys, "station-key", "--out", tmp_path / "s2")[0] == 0
    rc, out, _ = factory.cli(capsys, "verify-log", "--station-pub", tmp_path / "s2/station.pub",
                             log)
    assert rc == 1 and "line 1: signed by station" in out


def test_batch_does_not_extend_a_broken_log(factory: Factory, log: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    lines = _lines(log)
    del lines[1]
    log.write_bytes(b"".join(lines))
    csv = _csv(log.parent.parent, f"gw-0005,{IMEIS[5]},{ICCIDS[5]}")
    rc, _, err = _batch(factory, capsys, csv)
    assert rc == 1 and "line 2: chain broken" in err and "fix it first" in err
    assert not (log.parent / "gw-0005").exists()
