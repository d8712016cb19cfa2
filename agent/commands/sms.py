"""Commands by SMS: the modem's messages in, the command processor's results out.

:class:`SmsCommandReader` puts the modem in text mode (``AT+CMGF=1``) with new-message
indications (``AT+CNMI=2,1``), reads what was stored while nobody listened, then for each
``+CMTI: "<mem>",<index>``: ``AT+CMGR=<index>``, ``AT+CMGD=<index>`` (deleted before it is
acted on: the processor's journal, not the SIM's store, makes a command run at most once; a
message that is not a command is deleted too, or the store fills and commands stop arriving),
then the assembled envelope goes to the processor with only :data:`SMS_NAMES` accepted.
Every message read is an ``sms-received`` event (sender; the text of one that is not a command).

``reply(sender, result)`` answers (sync or async); the daemon passes :class:`ModemSmsReply`
when the data path is down, or a callable that publishes ``cmd/result`` otherwise. Refusals of
unauthenticated texts (malformed, unsigned, bad signature, unknown key) get no answer: an SMS
costs money, and a stranger must not make the gateway spend it. The simulator has no
``AT+CMGS``, so :class:`ModemSmsReply` is tested against a recording channel only.

Text mode caveat: a message whose text is itself a final result code (``OK``) ends the
``+CMGR`` answer early on any AT parser; such a text is not a command anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import re
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from agent.commands.sms_envelope import SMS_NAMES, SmsAssembler, SmsEnvelopeError, reply_text
from agent.core.tasks import wait_event
from drivers.at import Urc, split_fields, unquote
from drivers.errors import ModemError

log = logging.getLogger(__name__)

Reply = Callable[[str, dict[str, Any]], Awaitable[None] | None]
Emit = Callable[..., Any]  # agent.telemetry.events.Events.emit: (kind, **fields)
_SILENT = ("malformed", "unsigned", "bad signature", "unknown key")
_NUMBER = re.compile(r"\+?[0-9]{3,20}")


def _no_event(kind: str, /, **fields: Any) -> None:
    """The default :data:`Emit`: events go nowhere."""


class SmsChannel(Protocol):
    """What the reader needs of the modem's channel (AtChannel, the session's wrapper)."""

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = ()) -> list[str]: ...
    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]: ...


class SendingChannel(Protocol):
    """What an SMS answer needs: a command with data after the ``>`` prompt (AtChannel)."""

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = (), data: bytes | None = None) -> list[str]: ...


class Processor(Protocol):
    async def handle(self, payload: bytes, *, names: Collection[str] | None = None,
                     via: str = "MQTT") -> dict[str, Any]: ...


def _index(text: str) -> int | None:
    """The index of a ``+CMTI``/``+CMGL`` line; None when it has none."""
    fields = split_fields(text.split(":", 1)[1]) if ":" in text else []
    for raw in fields:
        value = unquote(raw)
        if value.isdigit():
            return int(value)
    return None


class SmsCommandReader:
    def __init__(self, channel: SmsChannel, processor: Processor, reply: Reply, *,
                 assembler: SmsAssembler | None = None, emit: Emit = _no_event) -> None:
        self._channel = channel
        self._emit = emit
        self._processor = processor
        self._reply = reply
        self._assembler = assembler or SmsAssembler()
        self._queue: asyncio.Queue[int] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._unlisten: Callable[[], None] | None = None
        self.results: list[dict[str, Any]] = []  # the last results (tests, status)
        self.ignored = 0  # texts that were not commands

    async def start(self) -> None:
        """Text mode, indications on, the stored messages queued; then +CMTI as they come."""
        await self._channel.command("AT+CMGF=1")
        await self._channel.command("AT+CNMI=2,1,0,0,0")
        self._unlisten = self._channel.add_urc_listener(self._on_urc)
        try:
            listing = await self._channel.command('AT+CMGL="ALL"', timeout=30.0)
        except ModemError as exc:
            log.warning("stored SMS not listed: %s", exc)
            listing = []
        for line in listing:
            index = _index(line) if line.startswith("+CMGL:") else None
            if index is not None:
                self._queue.put_nowait(index)
        self._task = asyncio.create_task(self._work(), name="sms-commands")

    async def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def idle(self) -> None:
        """Until every index seen so far has been handled (tests)."""
        await self._queue.join()

    def _on_urc(self, urc: Urc) -> None:
        if urc.prefix == "+CMTI":
            index = _index(urc.text)
            if index is not None:
                self._queue.put_nowait(index)

    async def _work(self) -> None:
        while True:
            index = await self._queue.get()
            try:
                await self._take(index)
            except ModemError as exc:
                log.warning("SMS %d not read: %s", index, exc)
            except Exception:
                log.exception("SMS %d: unexpected failure", index)
            finally:
                self._queue.task_done()

    async def _take(self, index: int) -> None:
        lines = await self._channel.command(f"AT+CMGR={index}")
        await self._channel.command(f"AT+CMGD={index}")
        header = next((i for i, line in enumerate(lines) if line.startswith("+CMGR:")), None)
        if header is None:
            return
        fields = split_fields(lines[header].split(":", 1)[1])
        sender = unquote(fields[1]) if len(fields) > 1 else ""
        await self.process(sender, "\n".join(lines[header + 1:]))

    async def process(self, sender: str, text: str) -> None:
        """One message's text from ``sender``."""
        command = SmsAssembler.is_command(text)
        try:
            self._emit("sms-received", text=None if command else text[:160], sender=sender,
                       command=command)
        except Exception:  # an event lost never costs a command
            log.exception("SMS from %s: sms-received not emitted", sender)
        if not command:
            self.ignored += 1
            log.info("SMS from %s is not a command; deleted", sender)
            return
        try:
            payload = self._assembler.feed(text)
        except SmsEnvelopeError as exc:
            log.warning("SMS from %s refused: %s", sender, exc)
            return
        if payload is None:
            return
        result = await self._processor.handle(payload, names=SMS_NAMES, via="SMS")
        self.results.append(result)
        del self.results[:-100]
        if str(result["detail"]).startswith(_SILENT) and result["status"] == "rejected":
            log.warning("SMS command from %s refused: %s", sender, result["detail"])
            return
        outcome = self._reply(sender, result)
        if inspect.isawaitable(outcome):
            await outcome


class ModemSmsReply:
    """Answer by SMS through the modem (``AT+CMGS`` in text mode): one text of at most 160
    characters (agent.commands.sms_envelope.reply_text)."""

    def __init__(self, channel: SendingChannel, *, timeout: float = 60.0) -> None:
        self._channel = channel
        self._timeout = timeout

    async def __call__(self, sender: str, result: dict[str, Any]) -> None:
        if not _NUMBER.fullmatch(sender):
            log.warning("no SMS answer: sender %r is not a phone number", sender)
            return
        try:
            await self._channel.command(f'AT+CMGS="{sender}"', data=reply_text(result).encode(),
                                        timeout=self._timeout)
        except ModemError as exc:
            log.warning("SMS answer to %s not sent: %s", sender, exc)


class ResettingChannel(Protocol):
    """The slot modem's channel as the SMS service needs it (AtChannel)."""

    async def command(self, cmd: str, *, timeout: float | None = None,
                      expect: tuple[str, ...] = (), data: bytes | None = None) -> list[str]: ...
    def add_urc_listener(self, callback: Callable[[Urc], None]) -> Callable[[], None]: ...
    def add_reset_listener(self, callback: Callable[[str], None]) -> Callable[[], None]: ...


class SmsCommands:
    """Commands by SMS on the modem that carries the SIM: the reader set up again after every
    modem reset (text mode and new-message indications go with it); a modem not ready for it
    is asked again after ``retry`` seconds. Answers go by MQTT while the session is up
    (``mqtt_ready``), by SMS when the data path is down."""

    def __init__(self, processor: Processor, *, publish: Callable[[dict[str, Any]], None],
                 mqtt_ready: Callable[[], bool], retry: float = 30.0,
                 emit: Emit = _no_event) -> None:
        self._processor = processor
        self._emit = emit
        self._publish = publish
        self._mqtt_ready = mqtt_ready
        self._retry = retry

    async def serve(self, channel: ResettingChannel) -> None:
        reset = asyncio.Event()
        unlisten = channel.add_reset_listener(lambda _why: reset.set())
        by_sms = ModemSmsReply(channel)

        async def reply(sender: str, result: dict[str, Any]) -> None:
            if self._mqtt_ready():
                self._publish(result)
            else:
                await by_sms(sender, result)

        try:
            while True:
                reset.clear()
                reader = SmsCommandReader(channel, self._processor, reply, emit=self._emit)
                try:
                    await reader.start()
                    ready = True
                except ModemError as exc:
                    log.warning("SMS commands not set up yet: %s", exc)
                    ready = False
                try:
                    await wait_event(reset, None if ready else self._retry)
                finally:
                    await reader.stop()
        finally:
            unlisten()
