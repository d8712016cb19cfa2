"""Terminal conformance in the keeper: the signed list (last good kept), enforce and warn, the
check on registration (MCC) and on SIM swap, and the malfunction latch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.core.config import ConformanceConfig
from agent.core.store import Store
from agent.sim.activation import tcp_probe
from agent.sim.keeper import KeeperError
from drivers.channel import Reset
from tests.test_keeper_harness import (
    after,
    echo_server,
    rig,
    sign,
    state_of,
    until,
    with_lifecycle,
    write_signed_list,
)

# The simulator's Quectel EC25: IMEI 864692030541238, firmware EC25JFAR06A07M4G, network 440-10.
EC25 = """
version = {version}
policy = "{policy}"

[[terminal]]
manufacturer = "Quectel"
model = "{model}"
tac_prefixes = ["86469203"]
min_firmware = "EC25JFAR06A06M4G"
regions = [{regions}]

[terminal.certifications.JP]
radio_act = "003-180231"
telecom_business_act = "D180155003"
"""


def ec25(*, version: int = 1, policy: str = "enforce", model: str = "EC25",
         regions: str = '"JP"') -> str:
    return EC25.format(version=version, policy=policy, model=model, regions=regions)


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def conf(tmp_path: Path, key: Ed25519PrivateKey, text: str, **kwargs: Any) -> dict[str, Any]:
    lst, pem = write_signed_list(tmp_path, key, text)
    return {"conformance": ConformanceConfig(list=lst, **kwargs), "operator_key": pem}


async def test_a_conforming_terminal_activates(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2), **conf(tmp_path, key, ec25())) as r:
        await until(lambda: state_of(r.keeper) == "active")
        summary = r.keeper.summary()
        assert summary is not None
        assert summary["conformance"]["conforming"] is True
        assert summary["conformance"]["country"] == "JP"  # checked again once registered
        assert summary["terminal"]["list_version"] == 1


async def test_enforce_keeps_an_unlisted_terminal_off_the_air(
        tmp_path: Path, key: Ed25519PrivateKey) -> None:
    async with rig(tmp_path, **conf(tmp_path, key, ec25(model="EG91"))) as r:
        await until(lambda: r.events.of("conformance"), what="reported")
        await until(lambda: r.sim.state.radio == 4, what="radio off")
        report = r.events.of("conformance")[0]
        assert report["conforming"] is False
        assert [f["check"] for f in report["failures"]] == ["model"]
        assert r.count("AT+CGACT=1,1") == 0
        assert r.keeper.summary()["activation"]["attempts"] == 0


async def test_a_refused_terminal_still_listens_for_orders(
        tmp_path: Path, key: Ed25519PrivateKey) -> None:
    """Radio off under ``enforce``, but on for rare listening windows (an order could fix the
    list); a SIM never activated gets no data context then: only the radio, for SMS."""
    lifecycle = with_lifecycle(probation_interval=0.5, probation_window=0.6)
    async with rig(tmp_path, lifecycle=lifecycle, **conf(tmp_path, key, ec25(model="EG91"))) as r:
        await until(lambda: r.sim.state.radio == 4, what="radio off")
        mark = len(r.sim.commands)
        await until(lambda: after(r.sim.commands, mark, "AT+CFUN=1", "AT+CFUN=4"),
                    what="a listening window")
        assert r.events.of("listening")[0]["reason"] == "terminal does not conform"
        assert r.count("AT+CGACT=1,1") == 0
        assert r.keeper.summary()["activation"]["attempts"] == 0


async def test_enforce_on_registration_when_the_country_is_not_covered(
        tmp_path: Path, key: Ed25519PrivateKey) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2),
            **conf(tmp_path, key, ec25(regions='"US"'))) as r:
        await until(lambda: r.sim.state.radio == 4, what="radio off once the MCC is known")
        reports = r.events.of("conformance")
        assert reports[0]["conforming"] is True and reports[0]["unchecked"]  # before the MCC
        assert reports[-1]["conforming"] is False and reports[-1]["country"] == "JP"
        assert state_of(r.keeper) == "awaiting-activation"
        assert "region" in (r.keeper.summary()["activation"]["last_error"] or "")


async def test_warn_reports_and_carries_on(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2),
            **conf(tmp_path, key, ec25(model="EG91", policy="warn"))) as r:
        await until(lambda: state_of(r.keeper) == "active")
        assert r.events.of("conformance")[0]["conforming"] is False
        assert r.count("AT+CFUN=4") == 0


async def test_a_refused_list_keeps_the_last_good_one(tmp_path: Path,
                                                      key: Ed25519PrivateKey) -> None:
    store = Store(tmp_path / "simkeeper.db")
    try:
        good = conf(tmp_path, key, ec25(version=2))
        async with rig(tmp_path, store=store, **good) as r:
            await until(lambda: r.keeper.guard.list is not None)
        lst = tmp_path / "conformance.toml"
        lst.write_text(ec25(version=3, model="EG91"))  # changed, signature no longer matches
        async with rig(tmp_path, store=store, **good) as r:
            await until(lambda: r.events.of("conformance"))
            assert r.keeper.guard.list is not None and r.keeper.guard.list.version == 2
            assert "signature" in (r.keeper.guard.error or "")
            assert r.events.of("conformance")[0]["conforming"] is True
            # an older list, properly signed, is a replay: refused too
            old = ec25(version=1).encode()
            with pytest.raises(KeeperError, match="older"):
                r.keeper.update_conformance(old, sign(key, old), "toml")
            new = ec25(version=4, model="EG91").encode()
            r.keeper.update_conformance(new, sign(key, new), "toml")
            await until(lambda: r.sim.state.radio == 4, what="the new list is enforced")
    finally:
        store.close()


async def test_sim_swap_reruns_conformance(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    async with echo_server() as (host, port), rig(
            tmp_path, probe=tcp_probe(host, port, timeout=2), **conf(tmp_path, key, ec25())) as r:
        await until(lambda: state_of(r.keeper) == "active")
        before = len(r.events.of("conformance"))
        r.sim.set_sim(iccid="8981100005819480022")
        await until(lambda: len(r.events.of("conformance")) > before, what="re-reported")
        assert r.events.of("conformance")[-1]["iccid"] == "8981100005819480022"


async def test_malfunction_is_reported_persists_and_keeps_the_radio_on(tmp_path: Path) -> None:
    """Spontaneous resets count toward the malfunction window; the report trips, persists
    across a restart until an order clears it, and never turns the radio off."""
    store = Store(tmp_path / "simkeeper.db")
    malfunction = {"conformance": ConformanceConfig(malfunction_resets=2,
                                                    malfunction_window=3600.0)}
    try:
        async with echo_server() as (host, port):
            probe = tcp_probe(host, port, timeout=2)
            async with rig(tmp_path, store=store, probe=probe, **malfunction) as r:
                await until(lambda: state_of(r.keeper) == "active")
                r.sim.reboot()
                await until(lambda: r.count("AT+CTZU=1") >= 2, what="first reset handled")
                r.sim.reboot()
                await until(lambda: r.events.of("malfunction"), what="tripped")
                rounds = r.count("AT+CFUN?")
                await until(lambda: r.count("AT+CFUN?") >= rounds + 2, what="rounds after it")
                assert r.sim.state.radio == 1 and r.count("AT+CFUN=4") == 0
                terminal = r.keeper.summary()["terminal"]
                assert terminal["malfunction"] is not None
                assert terminal["malfunction_signals"] == 2
            async with rig(tmp_path, store=store, probe=probe, **malfunction) as r:
                await until(lambda: state_of(r.keeper) == "active", what="on the air")
                assert r.keeper.summary()["terminal"]["malfunction"] is not None  # persisted
                assert r.keeper.clear_malfunction()
                assert r.events.of("malfunction-cleared")
                assert r.keeper.summary()["terminal"]["malfunction"] is None
                assert not r.keeper.clear_malfunction()
                assert r.sim.state.radio == 1
    finally:
        store.close()


async def test_hangs_count_once_per_episode(tmp_path: Path) -> None:
    async with rig(tmp_path, conformance=ConformanceConfig(malfunction_resets=3)) as r:
        await until(lambda: r.keeper.iccid is not None)
        r.keeper.note_hang("AT+CSQ: no answer within 2 s")
        r.keeper.note_reset(Reset("AT+CFUN=1,1 (recovery of a hang)", "recovery"))
        r.keeper.note_reset(Reset("AT+CFUN=1,1 (requested)", "requested"))
        assert r.keeper.summary()["terminal"]["malfunction_signals"] == 1
        r.keeper.note_hang("AT+CEREG?: no answer within 2 s")
        r.keeper.note_reset(Reset("RDY", "spontaneous"))
        assert r.events.of("malfunction")
        rounds = r.count("AT+CFUN?")
        await until(lambda: r.count("AT+CFUN?") >= rounds + 2, what="rounds after it")
        assert r.sim.state.radio == 1
