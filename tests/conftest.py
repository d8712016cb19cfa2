"""Shared fixtures: a real mosquitto per test (plain or mutual TLS) and a session-wide test PKI.

Tests that need a broker take ``broker`` or ``tls_broker``; they are skipped, saying why, when
no mosquitto binary is installed (``make deps`` installs it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.fleet.localbroker import find_mosquitto
from tests.broker import Broker, Pki, make_pki
from tests.test_mosquitto_acl import clients  # noqa: F401 (a fixture: paho clients closed)
from tests.webhook import webhook  # noqa: F401 (a fixture: the Flux webhook stand-in)


@pytest.fixture(scope="session")
def mosquitto() -> str:
    path = find_mosquitto()
    if path is None:
        pytest.skip("mosquitto is not installed (make deps installs it)")
    return path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _run(broker: Broker) -> Iterator[Broker]:
    broker.start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def broker(mosquitto: str, tmp_path: Path) -> Iterator[Broker]:
    yield from _run(Broker(mosquitto, tmp_path))


@pytest.fixture
def tls_broker(mosquitto: str, tmp_path: Path, pki: Pki) -> Iterator[Broker]:
    yield from _run(Broker(mosquitto, tmp_path, pki))
