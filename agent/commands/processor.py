"""Signed commands: from the payload of ``cmd`` (or an SMS) to the ``cmd/result`` answer.

:meth:`CommandProcessor.handle` takes untrusted bytes and always returns
``{"id", "status": "ok"|"rejected"|"failed", "detail"}`` (``id`` null when the payload has none
that can be read); it never raises for what it was given. The checks, in order, each a refusal
whose detail starts with its reason:

1. malformed: size, nesting, UTF-8, strict JSON, the exact envelope (agent.commands.envelope);
2. unsigned; bad signature; unknown key (signed by a retired key, or no key configured);
3. other device;
4. the journal: a repeat of an executed envelope gets its stored result; the same id with
   another envelope is "replayed";
5. expired / not yet valid, against trusted time with ``skew`` seconds of grace. Without trusted
   time only expiry can be proven (against the clock's lower bound): the command runs and its
   detail says that its time was not checked;
6. unknown command (or one not accepted on this channel, e.g. by SMS); bad arguments.

Only then is the id journaled and its handler run; nothing refused has any effect. A handler is
a callable (sync or async) taking the validated args and returning the detail (a string, a
JSON object, or None for "done"); its exception becomes status "failed" with a one-line detail.
``rotate-key`` is built in (agent.commands.journal.KeyRing).

The journal is written on the store's writer thread (``await store.run``), never on the loop;
the result is journaled after every write the handler queued (a lifecycle record, a note), and
an "ok" whose writes failed is answered "failed": done in memory, but it would not survive a
restart.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Protocol

from agent.commands.args import SCHEMAS, ArgError, validate
from agent.commands.envelope import MAX_BYTES, Envelope, Refused, parse_envelope
from agent.commands.journal import Journal, KeyRing
from agent.core.signing import key_id, load_public_key, verify
from agent.core.store import Store, StoreError
from agent.core.trusted_time import TrustedNow

log = logging.getLogger(__name__)

Detail = str | Mapping[str, Any] | None
Handler = Callable[[dict[str, Any]], Awaitable[Detail] | Detail]
Result = dict[str, Any]
BUILTIN = frozenset({"rotate-key"})
#: The id of the command whose handler is running (None outside one): events a handler emits
#: name the order that caused them (``by``).
running_command: ContextVar[str | None] = ContextVar("running_command", default=None)
_MAX_DETAIL = 500


class ClockLike(Protocol):
    def now(self) -> TrustedNow: ...


def result(cid: str | None, status: str, detail: Any) -> Result:
    return {"id": cid, "status": status, "detail": detail}


def one_line(text: str, limit: int = _MAX_DETAIL) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class CommandProcessor:
    """One device's command processor. ``operator_keys``: the PEM public keys pinned at
    provisioning (empty: every command is refused as "unknown key"). ``journal_keep``: how long
    past ``expires_at + skew`` an id is remembered; more than the trusted clock's persist
    interval, so a reboot that sets the time floor back cannot revive a pruned id."""

    def __init__(
        self,
        store: Store,
        device_id: str,
        operator_keys: Sequence[bytes],
        clock: ClockLike,
        handlers: Mapping[str, Handler],
        *,
        skew: float = 120.0,
        journal_keep: float = 86400.0,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        unknown = sorted(set(handlers) - set(SCHEMAS))
        if unknown:
            raise ValueError(f"handlers for unknown commands: {', '.join(unknown)}")
        self.device_id = device_id
        self.keys = KeyRing(store, operator_keys)
        self.journal = Journal(store)
        self._store = store
        self._clock = clock
        self._handlers = dict(handlers)
        self._skew = skew
        self._keep = journal_keep
        self._max_bytes = max_bytes
        self._inflight: dict[str, tuple[str, asyncio.Future[Result]]] = {}  # id: digest, answer
        self.executed = 0  # handlers run (tests and benches read it)

    @property
    def names(self) -> frozenset[str]:
        """The commands this processor runs."""
        return frozenset(self._handlers) | BUILTIN

    async def handle(self, payload: bytes, *, names: Collection[str] | None = None,
                     via: str = "MQTT") -> Result:
        """The answer to one payload; ``names`` restricts the commands accepted (``via`` names
        the channel in the refusal)."""
        try:
            env, args, note = self._admit(payload, names, via)
        except Refused as refused:
            return result(refused.cid, "rejected", refused.detail)
        except _Answer as answer:
            return await asyncio.shield(answer.result)
        except Exception as exc:  # a bug must not take the agent down; log it, answer
            log.exception("command refused by an internal error")
            return result(None, "failed", one_line(f"internal error: {exc!r}"))
        return await self._execute(env, args, note)

    # -- admission: every check, no effect ----------------------------------------------------

    def _admit(self, payload: bytes, names: Collection[str] | None,
               via: str) -> tuple[Envelope, dict[str, Any], str]:
        env = parse_envelope(payload, max_bytes=self._max_bytes)
        self._authenticate(env)
        if env.device_id != self.device_id:
            raise Refused("other device", f"addressed to {env.device_id}", env.id)
        self._seen(env)
        note = self._check_time(env)
        if env.name not in self.names:
            raise Refused("unknown command", repr(env.name[:64]), env.id)
        if names is not None and env.name not in names:
            raise Refused("unknown command", f"{env.name} is not accepted by {via}", env.id)
        try:
            args = validate(env.name, env.args)
        except ArgError as exc:
            raise Refused("bad arguments", str(exc), env.id) from None
        if env.name == "rotate-key" and any(
                k.kid == _kid(args["public_key"]) for k in self.keys.current):
            raise Refused("bad arguments", "that key is already the operator key", env.id)
        return env, args, note

    def _authenticate(self, env: Envelope) -> None:
        current = self.keys.current
        if any(verify(k.key, env.sig, env.signed) for k in current):
            return
        for old in self.keys.retired:
            if verify(old.key, env.sig, env.signed):
                raise Refused("unknown key", f"signed by retired operator key {old.kid}", env.id)
        if not current:
            raise Refused("unknown key", "no operator key is configured on this device", env.id)
        raise Refused("bad signature", "does not verify with the operator key", env.id)

    def _seen(self, env: Envelope) -> None:
        inflight = self._inflight.get(env.id)  # journaled, or being journaled: not yet readable
        entry = self.journal.lookup(env.id) if inflight is None else None
        digest = inflight[0] if inflight is not None else entry.digest if entry else None
        if digest is None:
            return
        if digest != env.digest:
            raise Refused("replayed", f"id {env.id} was already used by another command", env.id)
        if inflight is not None:
            raise _Answer(inflight[1])
        assert entry is not None
        stored = entry.result or result(
            env.id, "failed", "interrupted: the agent stopped while running it; not run again")
        raise _Answer(_done(stored))

    def _check_time(self, env: Envelope) -> str:
        now = self._clock.now()
        if now.ts is None:
            if now.lower_bound > env.expires_at + self._skew:
                raise Refused("expired", f"at {_iso(env.expires_at)}, and the time is at least"
                              f" {_iso(now.lower_bound)} (no trusted time)", env.id)
            return (f"no trusted time: only checked that it had not expired before"
                    f" {_iso(now.lower_bound)}")
        if now.ts > env.expires_at + self._skew:
            raise Refused("expired", f"at {_iso(env.expires_at)}, now {_iso(now.ts)}", env.id)
        if env.issued_at > now.ts + self._skew:
            raise Refused("not yet valid", f"issued at {_iso(env.issued_at)}, now"
                          f" {_iso(now.ts)}", env.id)
        return ""

    # -- execution: journal first, then the handler --------------------------------------------

    async def _execute(self, env: Envelope, args: dict[str, Any], note: str) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._inflight[env.id] = (env.digest, future)
        answer = result(env.id, "failed", "interrupted: the agent stopped while running it")
        try:
            answer = await self._journaled(env, args, note)
        finally:
            del self._inflight[env.id]
            future.set_result(answer)
        return answer

    async def _journaled(self, env: Envelope, args: dict[str, Any], note: str) -> Result:
        """Journal, run, journal the result: every store write on the store's writer thread."""
        now = self._clock.now().lower_bound
        keep_until = env.expires_at + self._skew + self._keep
        try:
            detail = await self._store.run(self._begin, env, args, keep_until, now)
        except StoreError as exc:
            return result(env.id, "failed", one_line(f"not run: journal unavailable ({exc})"))
        mark = self._store.write_mark()
        try:
            if env.name == "rotate-key":
                self.keys.reload()
            else:
                self.executed += 1
                token = running_command.set(env.id)
                try:
                    detail = await self._run(self._handlers[env.name], args)
                finally:
                    running_command.reset(token)
            answer = result(env.id, "ok", _with_note(detail, note))
        except Exception as exc:
            answer = result(env.id, "failed", one_line(f"{type(exc).__name__}: {exc}"))
        outcome = [answer]

        def finish() -> None:  # after every write the handler queued
            if answer["status"] == "ok" and (lost := self._store.failures_since(mark)):
                outcome[0] = result(env.id, "failed", one_line(
                    "done, but not saved (it would not survive a restart): " + "; ".join(lost)))
            self.journal.finish(env.id, outcome[0])

        try:
            await self._store.run(finish)
        except StoreError as exc:
            log.error("command %s: result not journaled: %s", env.id, exc)
        return outcome[0]

    def _begin(self, env: Envelope, args: dict[str, Any], keep_until: float,
               now: float) -> Detail:
        """On the store's writer thread: the journal row, and a new key, in one transaction."""
        with self._store.transaction() as db:
            self.journal.begin(db, env, keep_until, now)
            if env.name == "rotate-key":
                return self._rotate(db, env.id, args["public_key"], now)
        return None

    @staticmethod
    async def _run(handler: Handler, args: dict[str, Any]) -> Detail:
        outcome = handler(args)
        if inspect.isawaitable(outcome):
            return await outcome
        return outcome

    def _rotate(self, db: Any, cid: str, pem: str, now: float) -> str:
        old = ", ".join(k.kid for k in self.keys.current) or "none"
        new = self.keys.install(db, pem, cid, now)
        return f"operator key {new.kid} installed; retired {old}"


class _Answer(Exception):
    """Control flow: the answer is already known (a repeat)."""

    def __init__(self, answer: asyncio.Future[Result]) -> None:
        self.result = answer


def _done(value: Result) -> asyncio.Future[Result]:
    future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def _kid(pem: str) -> str:
    return key_id(load_public_key(pem.encode()))


def _with_note(detail: Detail, note: str) -> Any:
    if detail is None:
        detail = "done"
    if isinstance(detail, str):
        text = one_line(detail)
        return f"{text} ({note})" if note else text
    out = dict(detail)
    if note:
        out["time_note"] = note
    return out
