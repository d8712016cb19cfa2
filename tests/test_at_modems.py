"""The remote AT console on a gateway with two modems: the signed `at` and `fleet at` go to the
modem their `modem` (a slot) or `iccid` names; without either, the agent asks for one, listing
the slots, and sends nothing. A real daemon on two simulated modems, mosquitto, the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.fleet.sign import make_envelope
from tests.broker import Broker, Subscriber, until
from tests.test_at_console import _at_events, _fleet, _run
from tests.test_commands_away import _key_file
from tests.test_daemon import DEVICE, online, send_command, until_async
from tests.test_multi_modem import A, B, two_modems

CSQ = {A: -61, B: -81}  # +CSQ: 26,99 on A's modem, 16,99 on B's


async def _both_ready(agent: Any) -> bool:
    status = await agent.status()
    held = {m["slot"]: m["modem"]["sim"]["iccid"] for m in status["modems"]
            if m["state"] == "ready" and m["modem"]}
    current = {s["iccid"] for s in status["sims"] if s["lifecycle"] and s["lifecycle"]["current"]}
    return held == {"modem": A, "modem2": B} and current == {A, B}


async def test_at_goes_to_the_modem_named_and_asks_when_there_are_two(
        tmp_path: Path, broker: Broker) -> None:
    events = Subscriber(broker.port, f"simkeeper/{DEVICE}/events")
    try:
        async with two_modems(tmp_path, broker) as (agent, sims, key):
            key_file = _key_file(key, tmp_path)
            await online(broker.port)
            await until_async(lambda: _both_ready(agent), "both modems ready, both SIMs read")
            for iccid, rssi in CSQ.items():
                sims[iccid].set_signal(rssi_dbm=rssi)

            # The signed command, by slot: modem2's answer, and the slot in detail and event.
            answer = await send_command(broker.port, make_envelope(
                key, DEVICE, "at", {"command": "AT+CSQ", "modem": "modem2"}))
            assert answer["status"] == "ok", answer
            assert answer["detail"] == {"command": "AT+CSQ", "slot": "modem2",
                                        "lines": ["+CSQ: 16,99"], "final": "OK"}
            await until(lambda: any(e["slot"] == "modem2" and e["final"] == "OK"
                                    for e in _at_events(events)), "modem2's at-command event")

            # fleet at, by slot and by SIM.
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ",
                                     "--modem", "modem2"))
            assert (done.returncode, done.stdout.splitlines()) == (0, ["+CSQ: 16,99", "OK"]), \
                done.stderr
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ",
                                     "--iccid", A))
            assert (done.returncode, done.stdout.splitlines()) == (0, ["+CSQ: 26,99", "OK"]), \
                done.stderr
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ",
                                     "--iccid", B))
            assert done.stdout.splitlines() == ["+CSQ: 16,99", "OK"], done.stderr

            # Without a target: refused, naming the slots and their SIMs; nothing sent (the
            # agent itself never sends AT+QNWINFO).
            sent = {i: len(s.commands) for i, s in sims.items()}
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+QNWINFO"))
            assert (done.returncode, done.stdout) == (1, ""), done.stderr
            assert done.stderr.splitlines() == [
                f"simkeeper fleet at: {DEVICE}: failed: AtRefused: AT+QNWINFO: this gateway has 2"
                " modems: name one by its slot (modem) or its SIM (iccid): modem (SIM"
                f" {A}), modem2 (SIM {B})"]
            await until(lambda: any(e["command"] == "AT+QNWINFO" for e in _at_events(events)),
                        "the refusal's event")
            refused = [e for e in _at_events(events) if e["command"] == "AT+QNWINFO"][-1]
            assert refused["slot"] is None and refused["error"].startswith("refused: this")
            assert not any("QNWINFO" in c.upper() for i, s in sims.items()
                           for c in s.commands[sent[i]:])

            # A slot no modem is in, a SIM no modem holds: each said.
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ",
                                     "--modem", "modem3"))
            assert done.returncode == 1
            assert "no modem is connected in slot modem3 (connected: modem, modem2)" in \
                done.stderr
            done = await _run(_fleet(broker.port, key_file, "at", DEVICE, "AT+CSQ",
                                     "--iccid", "8981100000000000001"))
            assert done.returncode == 1
            assert "in none of this gateway's modems" in done.stderr

            # A radio suspension of B holds B's modem only.
            answer = await send_command(broker.port, make_envelope(
                key, DEVICE, "suspend", {"scope": "radio", "iccid": B}))
            assert answer["status"] == "ok", answer
            answer = await send_command(broker.port, make_envelope(
                key, DEVICE, "at", {"command": "AT+CSQ", "modem": "modem2"}))
            assert answer["status"] == "failed"
            assert f"SIM {B} is suspended by operator order (scope radio)" in answer["detail"]
            answer = await send_command(broker.port, make_envelope(
                key, DEVICE, "at", {"command": "AT+CSQ", "modem": "modem"}))
            assert answer["status"] == "ok" and answer["detail"]["lines"] == ["+CSQ: 26,99"]
    finally:
        events.close()


def test_fleet_at_target_options_are_checked_before_signing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "absent.key"  # never read: the usage is refused first
    assert main(["fleet", "at", DEVICE, "AT+CSQ", "--modem", "modem1", "--key", str(key)]) == 2
    assert "modem must be a modem's slot: modem, modem2, modem3, ..." in capsys.readouterr().err
    assert main(["fleet", "at", DEVICE, "AT+CSQ", "--iccid", "12", "--key", str(key)]) == 2
    assert "iccid must be an ICCID" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:  # argparse: the two options exclude each other
        main(["fleet", "at", DEVICE, "AT+CSQ", "--modem", "modem2", "--iccid", A, "--key",
              str(key)])
    assert usage.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
