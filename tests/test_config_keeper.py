"""The keeper's config keys: [lifecycle], [conformance], [modem] nm_connection."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.core.config import ConfigError, parse
from agent.core.store import Store
from agent.sim.keeper import default_probe
from agent.sim.keepers import keeper_from_config


def test_defaults() -> None:
    cfg = parse('device_id = "x"')
    lc = cfg.lifecycle
    assert lc.manifest is None and lc.apn == "soracom.io" and lc.cid == 1
    assert lc.probe == "uplink" and lc.alarms == (604800.0, 86400.0, 3600.0)
    assert lc.retry_min <= lc.retry_urgent <= lc.retry_cap
    assert cfg.conformance.list is None and cfg.conformance.malfunction_resets == 5
    assert cfg.modem.nm_connection is None


def test_values_are_read() -> None:
    cfg = parse("""
device_id = "x"
[modem]
nm_connection = "soracom"
[lifecycle]
manifest = "/etc/simkeeper/sims.toml"
apn = "iot.example"
probe = "udp"
probe_host = "echo.example"
probe_port = 7777
alarms = [172800, 3600]
[conformance]
list = "/etc/simkeeper/list.json"
signature = "/etc/simkeeper/list.sig"
malfunction_resets = 3
""")
    assert cfg.lifecycle.manifest == Path("/etc/simkeeper/sims.toml")
    assert cfg.lifecycle.alarms == (172800.0, 3600.0)
    assert cfg.conformance.list == Path("/etc/simkeeper/list.json")
    assert cfg.modem.nm_connection == "soracom"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[lifecycle]\nmanifest = "/x/sims.xlsx"', "lifecycle.manifest: expected a .csv or .toml"),
        ('[lifecycle]\napn = "bad apn"', "lifecycle.apn: expected an APN"),
        ("[lifecycle]\ncid = 0", "lifecycle.cid: expected an integer 1-24"),
        ('[lifecycle]\nprobe = "icmp"', 'lifecycle.probe: expected "uplink" or "tcp" or "udp"'),
        ("[lifecycle]\nalarms = [3600, 86400]", "lifecycle.alarms: expected seconds before"),
        ("[lifecycle]\nalarms = [1]", "lifecycle.alarms[0]: expected a number 60-"),
        ("[lifecycle]\nretry_min = 100\nretry_urgent = 50", "lifecycle.retry_urgent: need"),
        ("[lifecycle]\nregister_timeout = 0", "lifecycle.register_timeout: expected a number"),
        ("[lifecycle]\nprob = 1", "lifecycle.prob: unknown key"),
        ('[conformance]\nlist = "/x/list.yaml"', "conformance.list: expected a .toml or .json"),
        ('[conformance]\nsignature = "/x/l.sig"', "conformance.signature: set, but"),
        ("[conformance]\nmalfunction_resets = 0", "conformance.malfunction_resets: expected"),
        ('[modem]\nnm_connection = ""', "modem.nm_connection: expected a NetworkManager"),
    ],
)
def test_refusals_name_the_key(toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^" + message.replace("[", r"\[").replace(
            "]", r"\]").replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse('device_id = "x"\n' + toml)


def test_keeper_from_config(tmp_path: Path) -> None:
    cfg = parse(f'device_id = "x"\n[modem]\ndata_path = "networkmanager"\n'
                f'[lifecycle]\nprobe = "tcp"\n[store]\npath = "{tmp_path}/db"')
    store = Store(cfg.store.path)
    try:
        keeper = keeper_from_config(cfg, store, lambda *_a, **_k: "")
        assert keeper.cfg is cfg.lifecycle
        assert default_probe(cfg.lifecycle, cfg.uplink) is not None
    finally:
        store.close()
