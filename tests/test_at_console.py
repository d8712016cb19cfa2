"""The remote AT console (issue 14, part 2): ``fleet at`` runs one allowed AT command through the
running agent's channel, as a signed ``at`` command, and prints the modem's answer.

The allow-list matcher is tested on hostile lines (concatenation, CR, A/, dial, set forms behind
an allowed query); the console on a real channel to the simulated modem (refusals while
decommissioned, under a radio order, with the modem hung or gone; an error result is an
answer); and end to end with a real daemon, mosquitto and the CLI.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.commands.at_console import AtConsole, AtRefused
from agent.core.at_allow import DEFAULT_ALLOW, fold, refusal
from agent.core.config import ConfigError, parse
from agent.fleet.sign import make_envelope
from agent.sim.keepers import SimKeepers
from drivers.errors import CommandTimeout
from tests.broker import WAIT, Broker, Subscriber, until
from tests.test_commands_away import _key_file, _offline, publish, results
from tests.test_daemon import DEVICE, SIMKEEPER, Agent, online, running, until_async
from tests.test_e2e_lifecycle import operator_key
from tests.test_keeper_harness import Rig, rig

# -- the allow-list matcher -------------------------------------------------------------------

ALLOWED = ["AT+CSQ", "at+csq", "At+CsQ", "ATI", "AT+CGDCONT?", "at+cgdcont?", "AT+COPS?",
           'AT+QENG="servingcell"', 'at+qeng="servingcell"', "AT+CGPADDR", "AT+C5GREG?"]
REFUSED = {
    "AT+CSQ;+CFUN=0": "';' joins commands",
    "AT+CSQ;": "';' joins commands",
    'AT+QENG="servingcell";+CFUN=0': "';' joins commands",
    "AT+CSQ\rAT+CFUN=0": "printable ASCII",
    "AT+CSQ\r": "printable ASCII",
    "AT+CSQ\n": "printable ASCII",
    "AT+CSQ\x1a": "printable ASCII",
    "AT+CSQ\x00": "printable ASCII",
    "AT+CSQ\u00a0": "printable ASCII",
    "ＡＴ+CSQ": "printable ASCII",
    "": "printable ASCII",
    "AT+CSQ" + "0" * 300: "printable ASCII",
    "A/": "A/ repeats",
    "a/": "A/ repeats",
    "+CSQ": "must start with AT",
    'AT+QENG="servingcell': "not terminated",
    'AT+QENG="servingcell""': "not terminated",
    "ATD112;": "';' joins commands",
    "ATD*99#": "at_allow",
    "ATDT0123": "at_allow",
    "AT&W": "at_allow",
    "AT&F": "at_allow",
    "ATZ": "at_allow",
    "ATID112": "at_allow",  # ATI then a dial, chained as basic commands are
    "ATI0D112": "at_allow",
    "AT+CFUN=0": "at_allow",
    "AT+CFUN=1,1": "at_allow",
    "AT+CGDCONT=1,\"IP\",\"evil\"": "at_allow",  # the set form behind the allowed query
    "AT+CGDCONT": "at_allow",
    "AT+CGDCONT=?": "at_allow",
    "AT+CGDCONT?+CFUN=0": "at_allow",
    "AT+CSQ?": "at_allow",
    "AT+CSQ=": "at_allow",
    "AT+CREG=2": "at_allow",
    "AT+COPS=2": "at_allow",
    "AT+COPS=?": "at_allow",  # a network scan: minutes
    "AT +CSQ": "at_allow",
    " AT+CSQ": "must start with AT",
    "AT+CSQ ": "at_allow",
    "AT+C SQ": "at_allow",
    'AT+QENG="SERVINGCELL"': "at_allow",  # inside quotes, as written
    'AT+QENG="servingcell",1': "at_allow",
    "AT+QGDCNT=0": "at_allow",  # resets the counters the usage meter reads
    "AT+QPOWD": "at_allow",
}


@pytest.mark.parametrize("command", ALLOWED)
def test_the_default_allows_read_only_queries_whatever_the_case(command: str) -> None:
    assert refusal(command, DEFAULT_ALLOW) is None


@pytest.mark.parametrize(("command", "why"), REFUSED.items())
def test_hostile_and_unlisted_lines_are_refused_saying_why(command: str, why: str) -> None:
    reason = refusal(command, DEFAULT_ALLOW)
    assert reason is not None and why in reason, reason


_AT_TEXT = st.text(alphabet='AT+CSQGDONREI?=;,"0123456789 &/\r\nqengsrvicl', max_size=24)


@given(_AT_TEXT)
def test_nothing_but_a_listed_command_passes_the_default(text: str) -> None:
    for command in (text, "AT" + text, "AT+CSQ" + text, "AT+CGDCONT?" + text):
        if refusal(command, DEFAULT_ALLOW) is None:
            assert fold(command) in {fold(p) for p in DEFAULT_ALLOW}, command


@given(st.text(alphabet='0123456789,"aZ ;+=?&\r:/_.-', max_size=24))
def test_a_wildcard_takes_only_arguments(tail: str) -> None:
    command = "AT+QENG=" + tail
    if refusal(command, ["AT+QENG=*"]) is None:
        outside = "".join(tail.split('"')[::2])
        assert set(outside) <= set("0123456789,"), command
        assert "\r" not in tail and ";" not in tail and "+" not in tail


def test_wildcards_and_an_empty_list() -> None:
    allow = ["AT+QENG=*", "AT+CGPADDR=*"]
    assert refusal('AT+QENG="neighbourcell"', allow) is None
    assert refusal("at+cgpaddr=1,2", allow) is None
    assert refusal('AT+QENG="x"+CFUN=0', allow) == "not in [commands] at_allow"
    assert refusal("AT+QENG=?", allow) == "not in [commands] at_allow"
    assert refusal("AT+QENGX=1", allow) == "not in [commands] at_allow"
    assert refusal("AT+CSQ", []) == "no command is allowed ([commands] at_allow is empty)"


def test_config_takes_patterns_and_refuses_bad_ones_naming_the_key() -> None:
    assert parse('device_id = "x"').commands.at_allow == DEFAULT_ALLOW
    cfg = parse('device_id = "x"\n[commands]\nat_allow = ["AT+CSQ", \'AT+QENG=*\']\n')
    assert cfg.commands.at_allow == ("AT+CSQ", "AT+QENG=*")
    assert parse('device_id = "x"\n[commands]\nat_allow = []\n').commands.at_allow == ()
    for bad in ['"AT+CSQ;+CFUN=0"', '"A/"', '"AT+CFUN*"', '"AT+Q*ENG=1"', '"AT+CSQ\\r"',
                '"AT + CSQ"', '"CSQ"', '""', "1", '"AT+X=**"', '"AT+X=\\"a"']:
        with pytest.raises(ConfigError, match=r"commands\.at_allow\[0\]: expected one AT"):
            parse(f'device_id = "x"\n[commands]\nat_allow = [{bad}]\n')


# -- the console on a real channel to the simulated modem -------------------------------------


def _console(r: Rig, decommissioned: Callable[[], bool] = lambda: False) -> AtConsole:
    console = AtConsole(DEFAULT_ALLOW, SimKeepers(lambda _index: r.keeper),
                        decommissioned=decommissioned, emit=r.events.emit)
    console.attach(r.channel)
    return console


async def _refused(console: AtConsole, r: Rig, command: str, why: str) -> None:
    """``command`` refused with ``why``, never sent: refusals are decided before the channel."""
    sent = len(r.sim.commands)
    with pytest.raises(AtRefused, match=why):
        await console.run(command)
    event = r.events.of("at-command")[-1]
    assert event["command"] == command and event["final"] is None
    assert event["error"].startswith("refused: ") and re.search(why, event["error"])
    assert command.upper() not in (c.upper() for c in r.sim.commands[sent:])


async def test_the_console_answers_and_refuses_on_a_real_channel(tmp_path: Path) -> None:
    decommissioned = False
    async with rig(tmp_path) as r:
        await until(lambda: r.keeper.summary() is not None, what="the SIM read")
        console = _console(r, lambda: decommissioned)
        r.sim.set_signal(rssi_dbm=-61)
        assert await console.run("at+csq") == {"command": "AT+CSQ", "slot": "modem",
                                               "lines": ["+CSQ: 26,99"], "final": "OK"}
        assert "AT+CSQ" in r.sim.commands
        assert r.events.of("at-command")[-1] == {"command": "AT+CSQ", "slot": "modem",
                                                 "final": "OK", "error": None, "by": None}
        r.sim.set_sim(state="absent")  # an error result is the modem's answer, not a failure
        assert await console.run("AT+CIMI") == {"command": "AT+CIMI", "slot": "modem",
                                                "lines": [], "final": "+CME ERROR: 10"}
        assert r.events.of("at-command")[-1]["final"] == "+CME ERROR: 10"
        r.sim.set_sim(state="ready")

        await _refused(console, r, "AT+CFUN=0", "not in \\[commands\\] at_allow")
        r.keeper.suspend("radio", reason="stop emission")
        # AT+QNWINFO is allowed, and nothing else in the agent sends it
        await _refused(console, r, "AT+QNWINFO", "suspended by operator order \\(scope radio\\)")
        r.keeper.resume()
        decommissioned = True
        await _refused(console, r, "AT+QNWINFO", "being decommissioned")
        decommissioned = False

        r.sim.silence()  # the modem stops answering: one timeout, then it is hung
        with pytest.raises(CommandTimeout):
            await console.run("AT+CGMI")
        assert r.events.of("at-command")[-1]["error"].startswith("AT+CGMI: no answer within")
        await _refused(console, r, "AT+QNWINFO", "the modem is (hung|resetting)")
        console.detach()
        await _refused(console, r, "AT+QNWINFO", "no modem is connected")


# -- end to end: the daemon, mosquitto, the CLI -----------------------------------------------


def _fleet(port: int, key_file: Path, action: str, *args: str) -> list[str]:
    return [*SIMKEEPER, "fleet", action, "--broker", f"127.0.0.1:{port}", "--key",
            str(key_file), *args]


async def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                   timeout=WAIT, check=False)


def _at_events(sub: Subscriber) -> list[dict[str, Any]]:
    return [r["data"] for r in sub.readings("events") if r["topic"] == "at-command"]


async def _modem_ready(agent: Agent) -> bool:
    modems = (await agent.status()).get("modems") or []
    return bool(modems) and modems[0]["state"] == "ready"


async def test_fleet_at_end_to_end(tmp_path: Path, broker: Broker) -> None:
    key, extra = operator_key(tmp_path)
    key_file = _key_file(key, tmp_path)
    events = Subscriber(broker.port, f"simkeeper/{DEVICE}/events")
    answers = Subscriber(broker.port, f"simkeeper/{DEVICE}/cmd/result")
    try:
        async with running(tmp_path, broker, extra=extra) as (agent, sim):
            await online(broker.port)
            await until_async(lambda: _modem_ready(agent), "the modem ready")
            sim.set_signal(rssi_dbm=-61)  # +CSQ: 26,99, from the modem and nowhere else

            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ"))
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines() == ["+CSQ: 26,99", "OK"]
            await until(lambda: any(e["command"] == "AT+CSQ" and e["final"] == "OK"
                                    for e in _at_events(events)), "the at-command event")

            # Refused by the device, which says why; the modem never saw it.
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CFUN=0"))
            assert done.returncode == 1
            assert done.stdout == ""
            assert done.stderr.splitlines() == [
                f"simkeeper fleet at: {DEVICE}: failed: AtRefused: AT+CFUN=0: not in [commands]"
                " at_allow"]
            await until(lambda: any(e["command"] == "AT+CFUN=0" for e in _at_events(events)),
                        "the refusal's event")
            assert _at_events(events)[-1]["error"] == "refused: not in [commands] at_allow"
            # A signer other than fleet at: two commands in one line are bad arguments.
            hostile = make_envelope(key, DEVICE, "at", {"command": "AT+CSQ\rAT+CFUN=0"})
            publish(broker.port, hostile)
            await until(lambda: bool(results(answers, hostile["id"])), "the hostile's answer")
            refused = results(answers, hostile["id"])[0]
            assert refused["status"] == "rejected"
            assert refused["detail"].startswith("bad arguments: command must be one AT command")
            # The event names the signed command that asked.
            asked = make_envelope(key, DEVICE, "at", {"command": "AT+CGMM"})
            publish(broker.port, asked)
            await until(lambda: any(e["by"] == asked["id"] for e in _at_events(events)),
                        "the event naming its command")
            assert [e["command"] for e in _at_events(events) if e["by"] == asked["id"]] == [
                "AT+CGMM"]
            # fleet at itself does not sign one.
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ\nAT+CFUN=0"))
            assert done.returncode == 2 and "printable ASCII" in done.stderr

            # A radio held off by operator order stays off: no command reaches the modem.
            done = await _run(_fleet(broker.port, key_file, "send", DEVICE, "suspend",
                                     "--arg", "scope=radio"))
            assert json.loads(done.stdout)["status"] == "ok", done.stdout
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ"))
            assert done.returncode == 1
            assert "is suspended by operator order (scope radio)" in done.stderr
            assert not any("CFUN=0" in c.upper() for c in sim.commands)

            # Offline: as fleet send, said at once, left to the broker's session (exit 3).
            await agent.stop(signal.SIGKILL)
            await until_async(lambda: _offline(broker.port), "the last will")
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ"))
            assert done.returncode == 3, done.stderr
            assert done.stderr.startswith(f"{DEVICE}: offline (its retained status)")
            assert json.loads(done.stdout)["status"] == "queued"
    finally:
        events.close()
        answers.close()
