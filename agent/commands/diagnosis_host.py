"""The checks of the diagnosis (:mod:`agent.commands.diagnosis`) that look at the host: who
else holds the modem's port (``/proc/*/fd``), the link (a round trip to the broker, TLS
included, the agent's uplink, the certificate's days left, the clock's trust source) and the
agent (running, the database's quick integrity check read-only, free disk, outbox depth and
drops, the operator key, the permissions of the files it trusts). :func:`live` is the whole
diagnosis inside the daemon, for the signed ``diagnose`` command.

Everything here blocks on files; :func:`live` runs it off the loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import socket
import sqlite3
import ssl
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.commands.diagnosis import AgentView, Check, check, from_agent, not_checked, when
from agent.commands.diagnosis_modem import every_modem
from agent.core.config import Config
from agent.core.disk import free_bytes
from agent.core.signing import SigningError, key_id, load_public_key
from agent.core.trusted_time import Source, TrustedClock
from agent.telemetry.outbox import Outbox
from agent.telemetry.probe import mqtt_probe
from agent.telemetry.state import Snapshot
from agent.telemetry.tls import client_context, describe, explain

CERT_SOON = 30 * 86400.0  # a device certificate closer to its end than this is a warning
_MIB = 1 << 20
_ISSUE = "simkeeper provision csr here, sign-csr at the CA, install-cert here"
_RENEW = f"renew it from the fleet CA: {_ISSUE}"


# -- the modem port's holders -----------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Holders:
    """Processes with the port open, (pid, name); ``ends``: those holding the master of the pty
    the port is (its far end: a simulator, or a bridge such as socat), not competing for it;
    ``hidden``: processes whose open files this user may not look into."""

    found: tuple[tuple[int, str], ...]
    ends: tuple[tuple[int, str], ...]
    hidden: int


def port_holders(port: str) -> Holders:
    target = os.path.realpath(port)
    pty = target.removeprefix("/dev/pts/") if target.startswith("/dev/pts/") else None
    found, ends, hidden = [], [], 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fds = {fd: _link(entry / "fd" / fd) for fd in os.listdir(entry / "fd")}
        except PermissionError:
            hidden += 1
            continue
        except OSError:  # gone meanwhile
            continue
        holder = (int(entry.name), _name(entry))
        if pty is not None and any(path == "/dev/ptmx" and _pty_index(entry, fd) == pty
                                   for fd, path in fds.items()):
            ends.append(holder)
        elif target in fds.values():
            found.append(holder)
    return Holders(tuple(found), tuple(ends), hidden)


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:  # closed meanwhile
        return ""


def _name(entry: Path) -> str:
    try:
        return (entry / "comm").read_text().strip()
    except OSError:
        return "?"


def _pty_index(entry: Path, fd: str) -> str | None:
    """The pty a ``/dev/ptmx`` fd is the master of (``tty-index`` in its fdinfo)."""
    try:
        info = (entry / "fdinfo" / fd).read_text()
    except OSError:
        return None
    return next((line.split()[1] for line in info.splitlines()
                 if line.startswith("tty-index:")), None)


def holders_checks(ports: Iterable[str | None], agent_pid: int | None) -> dict[str | None, Check]:
    """The port holders check of each port (None: no port), by port."""
    return {port: holders_check(port, port_holders(port) if port else None, agent_pid)
            for port in ports}


def holders_check(port: str | None, holders: Holders | None, agent_pid: int | None) -> Check:
    if port is None or holders is None:
        return not_checked("modem", "port holders", "no port")
    others = [(pid, name) for pid, name in holders.found if pid != agent_pid]
    hidden = (f" ({holders.hidden} process(es) of other users not looked into: run as root"
              " to see them all)" if holders.hidden else "")
    if any(name == "ModemManager" for _, name in others):
        return check("modem", "port holders", "failure", f"ModemManager holds {port}, the"
                     " agent's port" + hidden, "the udev rule that hides the port from"
                     " ModemManager (ID_MM_PORT_IGNORE, 70-simkeeper.rules) is missing or not"
                     " applied: sudo udevadm control --reload && sudo udevadm trigger, then"
                     " sudo systemctl restart ModemManager")
    if others:
        names = ", ".join(f"{name} (pid {pid})" for pid, name in others)
        return check("modem", "port holders", "failure", f"{names} also hold(s) {port}" + hidden,
                     "stop it: two programs on one AT port corrupt each other's replies")
    mine = f"only the agent (pid {agent_pid}) holds {port}" if agent_pid is not None and any(
        pid == agent_pid for pid, _ in holders.found) else f"no other program holds {port}"
    far = "".join(f"; {name} (pid {pid}) is the pty's other end" for pid, name in holders.ends)
    return check("modem", "port holders", "ok", mine + far + hidden)


# -- the link ---------------------------------------------------------------------------------

async def round_trip(cfg: Config, timeout: float = 10.0) -> Check:
    """One MQTT session with the broker (agent.telemetry.probe), TLS as the uplink has it."""
    up = cfg.uplink
    where = f"{up.host}:{up.port}" + (" (TLS)" if up.tls else "")
    start = time.monotonic()
    try:
        await mqtt_probe(up, timeout=timeout)()
    except TimeoutError:
        return check("link", "broker", "failure", f"no answer from {where} within {timeout:g} s",
                     "check the data path (the network checks) and that no firewall blocks"
                     f" port {up.port}")
    except socket.gaierror as exc:
        return check("link", "broker", "failure", f"cannot resolve {up.host}: {exc.strerror}",
                     "check uplink.host and the DNS on the data path")
    except ConnectionRefusedError:
        return check("link", "broker", "failure", f"{where} refuses the connection: nothing"
                     " listens there", "check uplink.host and uplink.port, and that the broker"
                     " runs")
    except (OSError, ValueError) as exc:
        error: BaseException = exc
        if up.tls and explain(exc) is None:
            error = await _handshake_verdict(cfg, timeout) or exc
        meaning = explain(error)
        return check("link", "broker", "failure", f"{where}: {describe(error)}",
                     _tls_do(meaning) if meaning else "check the uplink's settings")
    ms = (time.monotonic() - start) * 1000
    return check("link", "broker", "ok", f"round trip to {where} in {ms:.0f} ms (MQTT CONNACK)")


async def _handshake_verdict(cfg: Config, timeout: float) -> ssl.SSLError | None:
    """Why the broker refused us, when TLS 1.3 lost it: there its refusal of the device's
    certificate is an alert after the handshake, which a connection reset can overtake; TLS 1.2
    carries it inside the handshake. The TLS error of one TLS 1.2 handshake, else None."""
    up = cfg.uplink
    try:
        context = client_context(up)
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(
                up.host, up.port, ssl=context, server_hostname=up.host)
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError, ValueError):
        return None
    writer.close()
    return None


def _tls_do(meaning: str) -> str:
    """What to do about a TLS failure, from its meaning (agent.telemetry.tls.explain)."""
    if "this device's certificate" in meaning:
        return f"give the device a certificate from the CA the broker trusts: {_ISSUE}"
    if "client certificate" in meaning:
        return "set uplink.cert and uplink.key (the device's certificate and key)"
    if "clock" in meaning:
        return "set the clock right (see the clock check)"
    return "check uplink.ca (the CA of the broker's certificate), uplink.host and uplink.port"


def link_checks(cfg: Config, view: AgentView | None, clock: Source | None) -> list[Check]:
    """The agent's uplink, the certificate and the clock (the broker round trip is apart)."""
    return [_uplink(view), certificate_check(cfg), _clock(clock)]


def _uplink(view: AgentView | None) -> Check:
    if view is None:
        return not_checked("link", "uplink", "the agent is not running")
    up = view.uplink
    if up is None:
        return check("link", "uplink", "warning", "the agent has no uplink yet")
    if up["state"] == "connected":
        return check("link", "uplink", "ok", f"connected over {up.get('protocol') or 'MQTT'},"
                     f" readings sent since the start: {up['readings_sent']}")
    why = up.get("stop_reason") or up.get("last_error") or "no error yet"
    return check("link", "uplink", "failure", f"{up['state']}: {why}", "see the broker check")


def certificate_check(cfg: Config) -> Check:
    from cryptography import x509  # here: the daemon loads it only for a diagnosis (9 MB RSS)

    up = cfg.uplink
    if not up.tls or up.cert is None:
        return check("link", "certificate", "ok", "none: the uplink uses no TLS" if not up.tls
                     else "none: TLS without a device certificate (uplink.cert not set)")
    try:
        cert = x509.load_pem_x509_certificate(up.cert.read_bytes())
    except OSError as exc:
        return check("link", "certificate", "failure", f"cannot read {up.cert}:"
                     f" {exc.strerror}", "check the file and that the agent's user may read it")
    except ValueError:
        return check("link", "certificate", "failure", f"{up.cert} is not a PEM certificate",
                     _RENEW)
    now = dt.datetime.now(dt.UTC)
    end = cert.not_valid_after_utc
    left = (end - now).total_seconds()
    saw = f"{up.cert.name} valid until {when(end.timestamp())}"
    if cert.not_valid_before_utc > now:
        return check("link", "certificate", "failure", f"{up.cert.name} is not valid before"
                     f" {when(cert.not_valid_before_utc.timestamp())}", "is the clock right?")
    if left <= 0:
        return check("link", "certificate", "failure", f"{saw}: expired", _RENEW)
    days = f"{int(left // 86400)} days left"
    if left < CERT_SOON:
        return check("link", "certificate", "warning", f"{saw}: {days}", _RENEW)
    return check("link", "certificate", "ok", f"{saw}: {days}")


def _clock(source: Source | None) -> Check:
    fix = "let NTP synchronise the clock (timedatectl status), or get the modem registered"
    if source == "ntp":
        return check("link", "clock", "ok", "trusted: the system clock is NTP-synchronised")
    if source == "network":
        return check("link", "clock", "ok", "trusted: the network's time (+CCLK); the system"
                     " clock is not NTP-synchronised")
    if source == "floor":
        return check("link", "clock", "warning", "only the last trusted time carried forward:"
                     " no NTP, no network time yet", fix)
    return check("link", "clock", "warning", "not trusted: no NTP, no network time; deadlines"
                 " count as near and certificates may look invalid", fix)


# -- the agent --------------------------------------------------------------------------------

def agent_checks(cfg: Config, view: AgentView | None, not_running: str | None,
                 outbox: dict[str, Any] | None, config_path: Path | None) -> list[Check]:
    """``outbox``: ``status --json``'s ``outbox`` (None without a database)."""
    return [_running(view, not_running), _store(cfg.store.path), _disk(cfg),
            _outbox(outbox), operator_key_check(cfg), _permissions(cfg, config_path)]


def _running(view: AgentView | None, why: str | None) -> Check:
    if view is None:
        return check("agent", "running", "warning", f"not running: {why}", "start it: sudo"
                     " systemctl start simkeeper (journalctl -u simkeeper says why it stopped)")
    restarted = [f"{name} ({task['restarts']} restarts, last: {task['last_error']})"
                 for name, task in view.tasks.items() if task["restarts"]]
    waiting = [name for name, task in view.tasks.items() if not task["running"]]
    saw = f"running (pid {view.pid})" + (f"; restarted: {'; '.join(restarted)}"
                                          if restarted else "")
    if waiting:
        return check("agent", "running", "warning", f"{saw}; waiting to restart:"
                     f" {', '.join(waiting)}", "journalctl -u simkeeper says why")
    return check("agent", "running", "warning" if restarted else "ok", saw,
                 "journalctl -u simkeeper says why" if restarted else None)


def _store(path: Path) -> Check:
    if not path.exists():
        return check("agent", "store", "warning", f"no database at {path} yet: the agent has"
                     " never run with this config")
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = [row[0] for row in db.execute("PRAGMA quick_check")]
        finally:
            db.close()
    except sqlite3.Error as exc:
        return check("agent", "store", "failure", f"cannot read {path}: {exc}",
                     "check that the agent's user owns it, and the disk")
    if found != ["ok"]:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        return check("agent", "store", "failure", f"{path} fails its integrity check:"
                     f" {found[0]}{more}", "stop the agent, move the file aside (keep it) and"
                     " start the agent: it makes a new one (what waited in it is lost)")
    return check("agent", "store", "ok", f"{path}: quick integrity check passed")


def _disk(cfg: Config) -> Check:
    directory = cfg.store.path.parent
    try:
        free = free_bytes(directory)
    except OSError as exc:
        return not_checked("agent", "disk", f"{directory}: {exc.strerror}")
    need = cfg.outbox.min_free_bytes
    saw = f"{free // _MIB} MiB free on {directory}"
    if free < need:
        return check("agent", "disk", "failure", f"{saw}, under the {need // _MIB} MiB the"
                     " outbox leaves free: readings are dropped", "free space on that disk")
    if free < need + cfg.outbox.max_bytes:
        return check("agent", "disk", "warning", f"{saw}: a full outbox"
                     f" ({cfg.outbox.max_bytes // _MIB} MiB) would not fit", "free space on"
                     " that disk, or lower [outbox] max_bytes")
    return check("agent", "disk", "ok", saw)


def _outbox(outbox: dict[str, Any] | None) -> Check:
    if outbox is None:
        return not_checked("agent", "outbox", "no database")
    saw = f"{outbox['count']} readings waiting ({outbox['bytes']} B)"
    drops = {reason: d["count"] for reason, d in outbox["drops"].items() if d["count"]}
    if drops:
        why = ", ".join(f"{n} by {reason}" for reason, n in sorted(drops.items()))
        return check("agent", "outbox", "warning", f"{saw}; dropped since the database was"
                     f" made: {why}", "the link was down longer, or readings came faster, than"
                     " the outbox holds: raise [outbox] max_bytes / max_age, or send less")
    return check("agent", "outbox", "ok", f"{saw}, none dropped")


def operator_key_check(cfg: Config) -> Check:
    path = cfg.commands.operator_key
    if path is None:
        return check("agent", "operator key", "warning", "none ([commands] operator_key):"
                     " every signed command is refused", "pin the operator's public key"
                     " (simkeeper provision device --operator-key)")
    try:
        kid = key_id(load_public_key(path.read_bytes()))
    except OSError as exc:
        return check("agent", "operator key", "failure", f"cannot read {path}: {exc.strerror}",
                     "check the file and that the agent's user may read it")
    except SigningError as exc:
        return check("agent", "operator key", "failure", f"{path}: {exc}",
                     "install the operator's Ed25519 public key (PEM)")
    return check("agent", "operator key", "ok", f"{path} (key {kid})")


def _permissions(cfg: Config, config_path: Path | None) -> Check:
    """Secrets not readable, and files the agent trusts not writable, by every user."""
    up = cfg.uplink
    secrets = [p for p in (up.key, up.password_file) if p is not None]
    trusted = [p for p in (config_path, cfg.commands.operator_key, up.ca, up.cert,
                           cfg.conformance.list, cfg.lifecycle.manifest, cfg.store.path.parent)
               if p is not None]
    wrong = _modes(secrets, stat.S_IROTH, "readable") + _modes(trusted, stat.S_IWOTH, "writable")
    unseen = [str(p) for p in (*secrets, *trusted) if not _stat(p)[1]]
    if wrong:
        return check("agent", "permissions", "failure", "; ".join(wrong),
                     "chmod o-rwx on each (provision device installs them root:simkeeper)")
    note = f"; could not look at {', '.join(unseen)} as this user" if unseen else ""
    return check("agent", "permissions", "ok", f"{len(secrets)} secret(s) private, {len(trusted)}"
                 f" trusted file(s) not writable by every user{note}")


def _stat(path: Path) -> tuple[int, bool]:
    try:
        return path.stat().st_mode, True
    except FileNotFoundError:
        return 0, True  # missing: the check that uses it says so
    except OSError:
        return 0, False


def _modes(paths: Iterable[Path], bit: int, what: str) -> list[str]:
    return [f"{p} is {what} by every user" for p in paths if _stat(p)[0] & bit]


# -- inside the daemon ------------------------------------------------------------------------

class Live(Protocol):
    """What :func:`live` needs of the daemon's parts (agent.daemon.Parts)."""

    outbox: Outbox
    clock: TrustedClock

    def snapshot(self) -> Snapshot: ...


async def live(cfg: Config, parts: Live, config_path: Path | None) -> list[Check]:
    """The diagnosis from the daemon's live parts: each modem session's last poll and its
    keeper's summary (no port is touched). The command arrived, so the broker answers."""
    snap = parts.snapshot()
    view = AgentView(os.getpid(), snap.modems, snap.sims, snap.uplink, snap.tasks)
    facts = from_agent(view, cfg)
    source = parts.clock.now().source
    count, size = parts.outbox.depth()

    def look() -> list[Check]:
        drops = {r: {"count": c, "bytes": b} for r, (c, b) in parts.outbox.drops().items()}
        held = holders_checks((f.port for f in facts), view.pid)
        return [*every_modem(cfg, facts, held),
                check("link", "broker", "ok", "round trip proven: this command came through it"),
                *link_checks(cfg, view, source),
                *agent_checks(cfg, view, None, {"count": count, "bytes": size, "drops": drops},
                              config_path)]

    return await asyncio.to_thread(look)
