"""``provision batch``: a production-line run from a CSV of devices.

The CSV has a header and one device per row (``#`` lines and blank lines skipped)::

    device_id,imei,iccid
    gw-0001,356938035643809,8981100005819510010

Each device gets an installable tree ``OUT/<device_id>/etc/simkeeper/`` (written atomically,
:mod:`provisioning.install`) and then its birth record in the factory log. A run can be
repeated: a device with both its tree and its record is skipped; one whose tree was written
but whose record was not (a crash between the two) gets its record from the tree. A bad row is
reported with its line and skipped; the others go on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.core.csvtable import TableError, read_table
from agent.sim.manifest import normalise_iccid
from drivers.parsers.identity import imei_valid
from provisioning import birthlog, keys
from provisioning.bundle import CA as CA_FILE
from provisioning.bundle import CERT, CONFIG, KEY, META, Identity, Settings, build, check_device_id
from provisioning.ca import CA, DEVICE_DAYS
from provisioning.device import provision
from provisioning.files import ProvisionError, read
from provisioning.install import current, etc_dir, install

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

COLUMNS = ("device_id", "imei", "iccid")


@dataclass(frozen=True, slots=True)
class Row:
    line: int
    device_id: str
    imei: str
    iccid: str


@dataclass
class Outcome:
    made: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already finished
    recovered: list[str] = field(default_factory=list)  # tree found, record added
    reconfigured: list[str] = field(default_factory=list)  # done before, settings renewed
    problems: list[str] = field(default_factory=list)  # "line N: why"
    warnings: list[str] = field(default_factory=list)


def _row(line: int, cells: dict[str, str], out: Outcome) -> Row:
    device_id = check_device_id(cells["device_id"])
    imei = cells["imei"]
    if not imei_valid(imei):
        raise ProvisionError(f"imei: not 15 digits with a valid Luhn check digit: {imei!r}")
    try:
        iccid, warning = normalise_iccid(cells["iccid"])
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None
    if warning:
        out.warnings.append(f"line {line}: warning: {warning}")
    return Row(line, device_id, imei, iccid)


def _duplicates(rows: list[Row], out: Outcome) -> list[Row]:
    bad: set[int] = set()
    for column in COLUMNS:
        seen: dict[str, list[int]] = {}
        for row in rows:
            seen.setdefault(getattr(row, column), []).append(row.line)
        for value, lines in seen.items():
            if len(lines) > 1:
                bad.update(lines)
                out.problems.extend(f"line {n}: {column} {value} is on lines"
                                    f" {', '.join(map(str, lines))}" for n in lines)
    return [row for row in rows if row.line not in bad]


def read_rows(path: Path, out: Outcome) -> list[Row]:
    """The good rows; each bad one is a problem in ``out``. A file that is not such a CSV at
    all raises :class:`ProvisionError`."""
    try:
        text = read(path, "CSV").decode("utf-8")
    except UnicodeDecodeError:
        raise ProvisionError(f"CSV {path}: not UTF-8 text") from None
    def check_header(header: list[str]) -> str | None:
        if sorted(header) != sorted(COLUMNS):
            return f"the header must name the columns {', '.join(COLUMNS)}, each once"
        return None

    try:
        table = read_table(text, check_header, f"no header row ({','.join(COLUMNS)})")
    except TableError as exc:
        raise ProvisionError(f"CSV {path}: {exc}") from None
    rows: list[Row] = []
    for line, fields in table:
        if isinstance(fields, str):
            out.problems.append(f"line {line}: {fields}")
            continue
        try:
            rows.append(_row(line, fields, out))
        except ProvisionError as exc:
            out.problems.append(f"line {line}: {exc}")
    return _duplicates(rows, out)


def _settings_lines(config_toml: bytes) -> list[str]:
    return [line for line in config_toml.decode().splitlines() if not line.startswith("#")]


def _meta(tree: Path) -> dict[str, Any] | None:
    gen = current(etc_dir(tree))
    if gen is None:
        return None
    try:
        meta: dict[str, Any] = json.loads((gen / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta


def _same(row: Row, found: dict[str, Any]) -> str | None:
    for column in ("imei", "iccid"):
        if found.get(column) != getattr(row, column):
            return f"{column} {found.get(column)}, not {getattr(row, column)}"
    return None


@dataclass
class Batch:
    ca: CA
    settings: Settings
    station: Ed25519PrivateKey
    out_dir: Path
    log: Path
    days: int = DEVICE_DAYS
    gid: int | None = None  # each tree's bundle group (provisioning.owner); None: root only
    reconfigure: bool = False  # a device done before with other settings gets this run's

    def run(self, csv_path: Path) -> Outcome:
        out = Outcome()
        rows = read_rows(csv_path, out)
        state = birthlog.verify(self.log, self.station.public_key())
        if state.problems:
            raise ProvisionError(f"factory log {self.log}: {state.problems[0]}; fix it first")
        born = {(k, str(r.get(k))): (n, r) for n, r in enumerate(state.records, 1)
                for k in COLUMNS}
        for row in rows:
            try:
                cert_sha256 = self._one(row, born, out)
            except ProvisionError as exc:
                out.problems.append(f"line {row.line}: {row.device_id}: {exc}")
                continue
            if cert_sha256 is None:
                continue
            # Not a row's problem: a log that cannot be written stops the run.
            record = birthlog.append(self.log, self.station, device_id=row.device_id,
                                     imei=row.imei, iccid=row.iccid, cert_sha256=cert_sha256)
            for k in COLUMNS:
                born[(k, str(record[k]))] = (record["seq"], record)
        return out

    def _one(self, row: Row, born: dict[tuple[str, str], tuple[int, dict[str, Any]]],
             out: Outcome) -> str | None:
        """Skip, make or recover the row's device; the fingerprint to log, if any."""
        tree = self.out_dir / row.device_id
        meta = _meta(tree)
        logged = born.get(("device_id", row.device_id))
        for column in ("imei", "iccid"):
            other = born.get((column, getattr(row, column)))
            if other and other[1].get("device_id") != row.device_id:
                raise ProvisionError(f"{column} {getattr(row, column)} was born as"
                                     f" {other[1].get('device_id')} (log line {other[0]})")
        if logged is not None:
            number, record = logged
            if (differs := _same(row, record)) is not None:
                raise ProvisionError(f"born at log line {number} with {differs}")
            if meta is None or meta.get("cert_sha256") != record.get("cert_sha256"):
                raise ProvisionError(f"born at log line {number} but {tree} does not hold that"
                                     " certificate; not making a second identity")
            if (change := self._change(tree, meta)) is not None:
                if not self.reconfigure:
                    out.warnings.append(
                        f"line {row.line}: {row.device_id}: done before with other settings"
                        f" ({change}); it keeps them: --reconfigure gives it this run's,"
                        " with the same identity")
                else:
                    identity = self._identity(tree, meta)
                    install(etc_dir(tree), lambda where: build(identity, self.settings, where),
                            force=True, gid=self.gid)
                    out.reconfigured.append(row.device_id)
                    return None
            out.skipped.append(row.device_id)
            return None
        if meta is not None:
            if (differs := _same(row, meta)) is not None or "cert_sha256" not in meta:
                raise ProvisionError(f"{tree} holds another identity ({differs or 'no metadata'})")
            out.recovered.append(row.device_id)
        else:
            provision(row.device_id, self.ca, self.settings, root=tree, imei=row.imei,
                      iccid=row.iccid, days=self.days, gid=self.gid)
            meta = _meta(tree) or {}
            out.made.append(row.device_id)
        return str(meta.get("cert_sha256"))

    @staticmethod
    def _identity(tree: Path, meta: dict[str, Any]) -> Identity:
        """The identity installed in ``tree`` (key, certificate, CA, IMEI, ICCID)."""
        gen = current(etc_dir(tree))
        assert gen is not None  # meta came from it
        return Identity(str(meta.get("device_id")), (gen / KEY).read_bytes(),
                        keys.load_cert(gen / CERT), (gen / CA_FILE).read_bytes(),
                        meta.get("imei"), meta.get("iccid"))

    def _change(self, tree: Path, meta: dict[str, Any]) -> str | None:
        """The first of this run's settings that the device's bundle does not have, or None."""
        gen = current(etc_dir(tree))
        assert gen is not None
        wanted = build(self._identity(tree, meta), self.settings, self.settings.etc / gen.name)
        for name, file in sorted(wanted.items()):
            if name == META:
                continue
            try:
                have = (gen / name).read_bytes()
            except OSError:
                return f"no {name}"
            if name == CONFIG:
                old, new = (_settings_lines(have), _settings_lines(file.data))
                if old != new:
                    a, b = next((x, y) for x, y in zip([*old, ""], [*new, ""], strict=False)
                                if x != y)
                    return f"{a or 'nothing'} in {CONFIG}, not {b or 'nothing'}"
            elif have != file.data:
                return f"another {name}"
        return None
