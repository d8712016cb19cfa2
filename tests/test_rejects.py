from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.sim.rejects import (
    Backoff,
    classify_ceer,
    classify_cme,
    classify_mobility,
    classify_registration,
    classify_session,
)
from drivers.parsers.network import parse_ceer, parse_registration


@pytest.mark.parametrize("cause", [3, 6, 7, 8])
def test_barred_sim_or_device_is_permanent_at_mobility_layer(cause: int) -> None:
    reject = classify_mobility(cause)
    assert (reject.kind, reject.layer, reject.code) == ("permanent", "mobility", cause)


@pytest.mark.parametrize("cause", [8, 33])
def test_operator_barring_and_unsubscribed_data_are_permanent_sessions(cause: int) -> None:
    assert classify_session(cause).kind == "permanent"
    assert classify_session(cause).layer == "session"


@pytest.mark.parametrize("cause", [11, 12, 13, 14, 15])
def test_plmn_and_area_refusals_are_not_the_sim(cause: int) -> None:
    assert classify_mobility(cause).kind == "not-sim"


@pytest.mark.parametrize("cause", [27, 28, 29])
def test_apn_and_credentials_are_not_the_sim(cause: int) -> None:
    assert classify_session(cause).kind == "not-sim"


@pytest.mark.parametrize("cause", [9, 10, 17, 19, 22, 200])
def test_transient_and_unknown_mobility_causes_are_temporary(cause: int) -> None:
    assert classify_mobility(cause).kind == "temporary"


@pytest.mark.parametrize(("code", "kind", "layer"), [
    (103, "permanent", "mobility"), (106, "permanent", "mobility"),
    (107, "permanent", "mobility"), (108, "permanent", "mobility"),
    (133, "permanent", "session"), (177, "permanent", "session"),
    (111, "not-sim", "mobility"), (127, "not-sim", "session"), (149, "not-sim", "session"),
    (14, "temporary", "mobility"), (515, "temporary", "mobility"), (30, "temporary", "mobility"),
    (122, "temporary", "mobility"), (150, "temporary", "session"),
])
def test_cme_codes(code: int, kind: str, layer: str) -> None:
    reject = classify_cme(code)
    assert reject is not None
    assert (reject.kind, reject.layer, reject.origin, reject.code) == (kind, layer, "cme", code)


@pytest.mark.parametrize("code", [3, 4, 10, 11, 12, 13, 15, 16, 100, 258])
def test_cme_codes_that_are_not_network_refusals(code: int) -> None:
    assert classify_cme(code) is None


def test_registration_reject_fields() -> None:
    urc = classify_registration(parse_registration('+CEREG: 3,"","",7,0,3'))
    assert urc is not None and urc.kind == "permanent" and urc.code == 3
    read = classify_registration(parse_registration("+CEREG: 3,3,,,,0,8"))
    assert read is not None and read.code == 8
    assert classify_registration(parse_registration('+CEREG: 1,"17E0","00359D48",7')) is None
    assert classify_registration(parse_registration("+CEREG: 3")) is None  # ask AT+CEER
    vendor = classify_registration(parse_registration('+CEREG: 3,"","",7,1,3'))
    assert vendor is None  # cause_type 1: manufacturer-specific, not a 3GPP cause


def test_ceer_reports() -> None:
    esm_wrapped = classify_ceer(parse_ceer(['+CEER: "EMM reject",19,"ESM failure"']))
    assert esm_wrapped is not None and esm_wrapped.kind == "temporary"
    altair = classify_ceer(parse_ceer(["+CEER: EPS_AND_NON_EPS_SERVICES_NOT_ALLOWED"]))
    assert altair is not None and (altair.kind, altair.code) == ("permanent", 8)
    session = classify_ceer(parse_ceer(['+CEER: "ESM reject",33,"not subscribed"']))
    assert session is not None and (session.layer, session.kind) == ("session", "permanent")
    assert classify_ceer(parse_ceer(['+CEER: "No report available"'])) is None


def test_backoff_grows_then_caps_and_resets() -> None:
    backoff = Backoff(base=10, cap=100, min_delay=1, urgent_cap=5, rng=random.Random(1))
    ceilings = []
    for _ in range(12):
        ceilings.append(min(100.0, 10 * 2.0 ** backoff.attempts))
        assert 1 <= backoff.next_delay() <= ceilings[-1]
    assert ceilings[-1] == 100
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next_delay() <= 10


def test_backoff_shrinks_near_the_deadline_but_never_storms() -> None:
    backoff = Backoff(rng=random.Random(2), attempts=20)
    near = [backoff.next_delay(time_left=0.0) for _ in range(200)]
    assert all(backoff.min_delay <= d <= backoff.urgent_cap for d in near)
    far = [backoff.next_delay(time_left=10 * 86400) for _ in range(200)]
    assert max(far) > backoff.urgent_cap


def test_probe_is_rare_and_jittered() -> None:
    backoff = Backoff(rng=random.Random(3))
    delays = {backoff.probe_delay() for _ in range(50)}
    assert all(0.9 * backoff.probe <= d <= 1.1 * backoff.probe for d in delays)
    assert len(delays) > 1
    assert backoff.probe_delay(time_left=3600) <= 1.1 * 900


def test_backoff_refuses_settings_that_allow_a_storm() -> None:
    with pytest.raises(ValueError):
        Backoff(min_delay=0)
    with pytest.raises(ValueError):
        Backoff(min_delay=100, urgent_cap=60)


@given(st.integers(0, 10_000), st.one_of(st.none(), st.floats(-1e9, 1e9)),
       st.integers(0, 2**32))
def test_backoff_delay_always_within_bounds(attempts: int, time_left: float | None,
                                            seed: int) -> None:
    backoff = Backoff(rng=random.Random(seed), attempts=attempts)
    delay = backoff.next_delay(time_left)
    assert backoff.min_delay <= delay <= backoff.cap
    if time_left is not None and time_left / 4 < backoff.urgent_cap:
        assert delay <= backoff.urgent_cap
