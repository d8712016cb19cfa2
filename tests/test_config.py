"""Config: the reference file, every refusal naming its key and reason, the default path."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import config
from agent.core.config import Config, ConfigError, load, parse

REFERENCE = Path(__file__).resolve().parent.parent / "packaging" / "config.toml"
CORE = """
device_id = "gw-0001"
[modem]
port = "auto"
[uplink]
kind = "mqtt"
host = "127.0.0.1"
port = 1883
profile = "default"
prefix = "simkeeper"
tls = false
[store]
path = "/var/lib/simkeeper/simkeeper.db"
[ingest]
socket = "/run/simkeeper/ingest.sock"
"""


def test_reference_config_loads_and_states_the_defaults() -> None:
    assert load(REFERENCE) == parse('device_id = "gw-0001"')


def test_reference_config_documents_every_key() -> None:
    text = REFERENCE.read_text()
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    for section_name in sections:
        if section_name == "device_id":
            continue
        cls = type(getattr(parse('device_id = "x"'), section_name))
        for f in dataclasses.fields(cls):
            pattern = rf"^#? ?({f.name} = |\[\[?{section_name}\.{f.name}\]\]?)"
            assert re.search(pattern, text, re.M), f"{section_name}.{f.name}"
    for f in dataclasses.fields(config.DualSimConfig):
        assert re.search(rf"^# {f.name} = ", text, re.M), f"modem.dual_sim.{f.name}"
    for f in dataclasses.fields(config.Plan):
        assert re.search(rf"^# {f.name} = ", text, re.M), f"usage.plan.{f.name}"


def test_design_core_keys_alone_are_enough() -> None:
    cfg = parse(CORE)
    assert cfg.device_id == "gw-0001"
    assert cfg.uplink.client_id == "gw-0001"
    assert cfg.ingest.socket == Path("/run/simkeeper/ingest.sock")
    assert cfg.commands.operator_key is None


def test_config_is_frozen() -> None:
    cfg = parse(CORE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.uplink.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[uplink]\nport = "x"', 'uplink.port: expected an integer 1-65535, got "x"'),
        ("[uplink]\nport = 0", "uplink.port: expected an integer 1-65535, got 0"),
        ("[uplink]\nport = true", "uplink.port: expected an integer 1-65535, got true"),
        ("[uplink]\nportt = 1", "uplink.portt: unknown key"),
        ("[uplinks]\nport = 1", "uplinks: unknown key"),
        ("uplink = 3", "uplink: expected a table, got 3"),
        ('[uplink]\nkind = "amqp"', 'uplink.kind: expected "mqtt" or "unified-endpoint"'),
        ('[uplink]\nprefix = "a/#"', "uplink.prefix: expected a topic"),
        ('[uplink]\nprefix = "/a"', "uplink.prefix: expected a topic"),
        ('[uplink]\nhttp_url = "ftp://x"', "uplink.http_url: expected an http:// or https:// URL"),
        ('[uplink]\nhost = "broker.example.com"', "uplink.allow_plain: MQTT without TLS"),
        (
            '[uplink]\nprofile = "beam"\nkeepalive = 1800\nallow_plain = true',
            'uplink.keepalive: expected 5-1200 with profile = "beam", got 1800',
        ),
        ("[uplink]\nkeepalive = 0", "uplink.keepalive: expected an integer 5-65535, got 0"),
        ('[uplink]\ntls = true\ncert = "/c.pem"', "uplink.cert: cert and key go together"),
        ('[uplink]\nca = "/ca.pem"', "uplink.ca: set, but uplink.tls is false"),
        ("[uplink]\nreconnect_min = 10.0\nreconnect_max = 5", "uplink.reconnect_max: expected"),
        ("[uplink]\nrate_bytes_per_minute = 2000", "uplink.rate_bytes_per_minute: 2000 is below"),
        (
            '[uplink]\nkind = "unified-endpoint"',
            "uplink.allow_plain: plain HTTP to uni.soracom.io needs allow_plain = true",
        ),
        ('[modem]\ndata_path = "nm"', 'modem.data_path: expected "networkmanager" or "agent"'),
        ("[modem]\nbaud = 1.5", "modem.baud: expected an integer 300-4000000, got 1.5"),
        ('[modem]\ninterface = "wwan0/../x"', "modem.interface: expected a network interface"),
        ("[modem]\nport = []", "modem.port: expected one value or a non-empty list"),
        ('[modem]\nport = ["/dev/a", "auto"]', 'modem.port: "auto" finds every modem'),
        ('[modem]\nport = ["/dev/a", "/dev/a"]', "modem.port: a port appears twice"),
        ('[modem]\nport = ["/dev/a", 3]', "modem.port[1]: expected \"auto\", a device path"),
        ('[modem]\nport = ["/dev/a", "/dev/b"]\ninterface = ["wwan0"]',
         "modem.interface: 1 given for 2 ports"),
        ('[modem]\nport = ["/dev/a", "/dev/b"]',
         "modem.nm_connection: with several modems and data_path = \"networkmanager\""),
        ("[ingest]\nmax_clients = -1", "ingest.max_clients: expected an integer 1-4096"),
        ("[ingest]\nsocket = '/" + "x" * 120 + "'", "ingest.socket: longer than 100 bytes"),
        ("[ingest]\ngroup = 'a b'", "ingest.group: expected a group name"),
        (
            "[ingest]\nmax_reading_bytes = 2097152\n[outbox]\nmax_bytes = 1048576",
            "ingest.max_reading_bytes: larger than outbox.max_bytes",
        ),
        ("[outbox]\nmax_age = -1", "outbox.max_age: expected a number 60-31622400, got -1"),
        ('[outbox]\ndrop_policy = "newest"', 'outbox.drop_policy: expected "oldest-lowest'),
        ("[usage]\ncycle_day = 31", "usage.cycle_day: expected an integer 1-28, got 31"),
        ('[usage]\ntimezone = "Mars/Olympus"', "usage.timezone: expected an IANA time zone"),
        ('[usage]\ntimezone = "../../etc/passwd"', "usage.timezone: expected an IANA time zone"),
        ("[usage]\nthresholds = [1.0]", "usage.thresholds[0]: expected a table, got 1.0"),
        (
            '[usage]\nthresholds = [{share = 1.0, action = "halt"}]',
            'usage.thresholds[0].action: expected "event" or "throttle" or "stop", got "halt"',
        ),
        ("[usage]\nthresholds = [{share = 1.0}]", "usage.thresholds[0].action: missing (required)"),
        (
            '[usage]\nthresholds = [{share = 1.0, action = "stop"},'
            ' {share = 0.8, action = "event"}]',
            "usage.thresholds: shares must be increasing",
        ),
        ('[usage]\ncritical_topics = ["ok", "b#"]', "usage.critical_topics[1]: expected a topic"),
        ("[[usage.plan]]\niccid = '123'\nplan_bytes = 5", "usage.plan[0].iccid: expected an ICCID"),
        (
            "[[usage.plan]]\niccid = '8981100000000000001'\nplan_bytes = 5\n"
            "[[usage.plan]]\niccid = '8981100000000000001F'\nplan_bytes = 6",
            "usage.plan: an ICCID appears twice",
        ),
        ("[commands]\noperator_key = 5", "commands.operator_key: expected a file path, got 5"),
    ],
)
def test_refusals_name_the_key_and_the_reason(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(f'device_id = "gw-1"\n{toml}')
    assert str(caught.value).startswith(message), str(caught.value)


def test_several_modems() -> None:
    """One port, a list (each modem's slot by its place), or hotplug; interface and
    NetworkManager connection one per port, or one for the first modem only."""
    one = parse('device_id = "g"\n[modem]\nport = "/dev/ttyUSB2"').modem
    assert one.ports == ("/dev/ttyUSB2",) and not one.several
    assert (one.interface_for(0), one.interface_for(1)) == ("wwan0", None)
    auto = parse('device_id = "g"').modem
    assert auto.ports == () and auto.several
    two = parse('device_id = "g"\n[modem]\nport = ["/dev/ttyUSB2", "rfc2217://h:1"]\n'
                'interface = ["wwan0", "wwan1"]\nnm_connection = ["one", "two"]').modem
    assert two.ports == ("/dev/ttyUSB2", "rfc2217://h:1") and two.several
    assert [two.interface_for(i) for i in range(3)] == ["wwan0", "wwan1", None]
    assert [two.nm_connection_for(i) for i in range(2)] == ["one", "two"]
    by_at = parse('device_id = "g"\n[modem]\nport = ["/dev/a", "/dev/b"]\ndata_path = "agent"')
    assert by_at.modem.nm_connection_for(1) is None


def test_device_id_required_and_checked() -> None:
    with pytest.raises(ConfigError, match=r"^device_id: missing \(required\)$"):
        parse("[modem]\nport = 'auto'")
    with pytest.raises(ConfigError, match=r'^device_id: expected 1-64 of .*, got "gw/1"$'):
        parse('device_id = "gw/1"')


def test_allowed_variants() -> None:
    cfg = parse(
        'device_id = "gw-1"\n'
        '[uplink]\nhost = "beam.soracom.io"\nprofile = "beam"\nallow_plain = true\n'
        'keepalive = 1200\nkind = "unified-endpoint"\nclient_id = "c-1"\n'
        '[usage]\ntimezone = "Asia/Tokyo"\nplan_bytes = 1000\n'
        'thresholds = [{share = 0.5, action = "event"}, {share = 1, action = "stop"}]\n'
        '[[usage.plan]]\niccid = "8981100000000000001f"\nplan_bytes = 5\ncycle_day = 15\n'
    )
    assert cfg.uplink.client_id == "c-1"
    assert cfg.usage.plan[0].iccid == "8981100000000000001"
    assert cfg.usage.plan[0].cycle_day == 15
    assert [t.action for t in cfg.usage.thresholds] == ["event", "stop"]
    assert cfg.usage.thresholds[1].share == 1.0
    tls = parse(
        'device_id = "gw-1"\n[uplink]\nhost = "mqtt.example.com"\ntls = true\n'
        'ca = "/etc/ca.pem"\ncert = "/etc/c.pem"\nkey = "/etc/c.key"\n'
    )
    assert tls.uplink.key == Path("/etc/c.key")
    assert parse('device_id = "g"\n[uplink]\nhost = "::1"').uplink.host == "::1"


def test_load_reads_env_override_and_reports_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = tmp_path / "good.toml"
    good.write_text('device_id = "from-env"\n')
    monkeypatch.setenv(config.ENV_VAR, str(good))
    assert load().device_id == "from-env"
    assert config.resolve_path(None) == good
    monkeypatch.delenv(config.ENV_VAR)
    assert config.resolve_path(None) == config.DEFAULT_PATH
    with pytest.raises(ConfigError, match=r"missing\.toml: cannot read config: No such file"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("device_id = \n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load(bad)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(binary)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('device_id = "g"\n[uplink]\nport = 70000\n')
    with pytest.raises(ConfigError, match=r"wrong\.toml: uplink\.port: expected"):
        load(wrong)


SECTIONS = {
    name: type(getattr(parse('device_id = "x"'), name))
    for name in ("modem", "uplink", "store", "ingest", "outbox", "usage", "commands")
}
scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.booleans(),
    st.text(max_size=40),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(
    section=st.sampled_from(sorted(SECTIONS)),
    data=st.data(),
    value=scalars,
)
def test_any_value_is_accepted_or_refused_with_a_config_error(
    section: str, data: st.DataObject, value: object
) -> None:
    key = data.draw(st.sampled_from([f.name for f in dataclasses.fields(SECTIONS[section])]))
    text = f'device_id = "g"\n[{section}]\n{key} = {json.dumps(value)}\n'
    try:
        parse(text)
    except ConfigError as exc:
        assert str(exc).startswith(("not valid TOML", f"{section}.", "uplink.", "ingest."))
