"""What the command processor remembers in the store: the journal of command ids and the
operator keys installed by ``rotate-key``.

The journal row of an id is written before its handler runs (``running``) and completed with
the result after, so an id is executed at most once even across a crash: a repeat of an id
whose row was left ``running`` by an earlier process is answered "failed: interrupted", never
run again. A row is kept until ``keep_until`` (the envelope's expiry plus the skew plus a
margin); by then a repeat is refused as expired anyway. Pruning compares with the trusted
clock's lower bound, which never runs ahead of the real time.

Operator keys: the keys from config (pinned at provisioning) are in force until a ``rotate-key``
installs a new one; from then on the newest installed key alone is in force and every older
key is retired (a command it signs is refused as "unknown key").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agent.core.signing import SigningError, key_id, load_public_key
from agent.core.store import Store

if TYPE_CHECKING:
    from agent.commands.envelope import Envelope


@dataclass(frozen=True, slots=True)
class Entry:
    digest: str
    status: str  # running, ok, rejected, failed
    result: dict[str, Any] | None


class Journal:
    def __init__(self, store: Store) -> None:
        self._store = store

    def lookup(self, cid: str) -> Entry | None:
        rows = self._store.query(
            "SELECT digest, status, result FROM command_journal WHERE id = ?", (cid,))
        if not rows:
            return None
        digest, status, result = rows[0]
        return Entry(digest, status, json.loads(result) if result else None)

    def begin(self, db: sqlite3.Connection, env: Envelope, keep_until: float,
              now: float) -> None:
        """Record ``env`` as running (inside the caller's transaction), pruning rows whose
        ``keep_until`` is past ``now`` (the trusted clock's lower bound)."""
        db.execute("DELETE FROM command_journal WHERE keep_until < ?", (now,))
        db.execute(
            "INSERT INTO command_journal (id, digest, name, received_at, keep_until, status)"
            " VALUES (?, ?, ?, ?, ?, 'running')",
            (env.id, env.digest, env.name, now, keep_until),
        )

    def finish(self, cid: str, result: dict[str, Any]) -> None:
        """Complete the row (commits on the calling thread: the store's writer thread)."""
        with self._store.transaction() as db:
            db.execute("UPDATE command_journal SET status = ?, result = ? WHERE id = ?",
                       (result["status"], json.dumps(result, ensure_ascii=False), cid))

    def size(self) -> int:
        return int(self._store.query("SELECT count(*) FROM command_journal")[0][0])


@dataclass(frozen=True, slots=True)
class OperatorKey:
    kid: str
    key: bytes  # the raw Ed25519 public key (agent.core.signing.load_public_key)


class OperatorKeyError(ValueError):
    """A configured or installed operator key that is not an Ed25519 public key PEM."""


def _load(pem: bytes, where: str) -> OperatorKey:
    try:
        key = load_public_key(pem)
    except SigningError as exc:
        raise OperatorKeyError(f"{where} is {exc}") from None
    return OperatorKey(key_id(key), key)


class KeyRing:
    """The operator keys in force and the retired ones. ``configured``: PEM public keys from
    ``[commands] operator_key`` (a bad one raises :class:`OperatorKeyError`: refuse to
    start)."""

    def __init__(self, store: Store, configured: Sequence[bytes]) -> None:
        self._store = store
        self._configured = [_load(pem, "operator key") for pem in configured]
        self._installed: list[OperatorKey] = []
        self.reload()

    def reload(self) -> None:
        rows = self._store.query("SELECT pem FROM operator_key ORDER BY seq")
        self._installed = [_load(pem.encode(), "installed operator key") for (pem,) in rows]

    @property
    def current(self) -> list[OperatorKey]:
        return self._installed[-1:] if self._installed else list(self._configured)

    @property
    def retired(self) -> list[OperatorKey]:
        return [*self._configured, *self._installed[:-1]] if self._installed else []

    def install(self, db: sqlite3.Connection, pem: str, cid: str, now: float) -> OperatorKey:
        """Make ``pem`` the one key in force (inside the caller's transaction; call
        :meth:`reload` once it has committed)."""
        new = _load(pem.encode(), "public_key")
        db.execute("INSERT INTO operator_key (key_id, pem, installed_at, command_id)"
                   " VALUES (?, ?, ?, ?)", (new.kid, pem, now, cid))
        return new
