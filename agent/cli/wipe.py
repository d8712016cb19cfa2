"""``simkeeper wipe-identity [--config FILE]``: root's part of a decommission.

Under the packaged unit the agent runs as ``simkeeper`` and may read the identity keys
(``root:simkeeper`` 0640 in a ``root`` 0750 bundle) but not remove them; what it could not
wipe it records in the decommission marker and asks for in ``wipe-requested`` beside the
database (:mod:`agent.sim.decommission`). ``simkeeper-wipe.path`` sees that file and starts
``simkeeper-wipe.service`` (root, no network), which runs this: the same completion a refused
start does (:func:`agent.sim.decommission.complete`: the keys of this config wiped, the SIM marked
``terminated``, the marker completed in the database), then the request removed.

The request only triggers; its content is not trusted (the agent's user can write it). What is
wiped comes from this config and the database's marker, and nothing is wiped unless that marker
holds: a gateway not decommissioned, or re-provisioned since, keeps its keys (the request is
void and removed, exit 1).

Exit 0 when every identity key is gone (one line on stdout); 1 when the gateway is not
decommissioned, a key could not be wiped (the request stays: the next boot asks again) or the
database failed; 2 for a config it cannot read. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from agent.cli.errors import CliError
from agent.core import config
from agent.core.store import Store, StoreError
from agent.sim import decommission


def add_arguments(parser: argparse.ArgumentParser) -> None:
    config.add_argument(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config.load(args.config)
    except config.ConfigError as exc:
        raise CliError(2, str(exc)) from None
    config_path = config.resolve_path(args.config)
    request = decommission.wipe_request_path(cfg)
    if not cfg.store.path.exists():
        _void(request)
        raise CliError(1, f"no database at {cfg.store.path}: no decommission recorded;"
                        " nothing wiped")
    try:
        store = Store(cfg.store.path)
    except StoreError as exc:
        raise CliError(1, str(exc)) from None
    try:
        marker = decommission.load_marker(store)
        if marker is None:
            _void(request)
            raise CliError(1, "this gateway is not decommissioned; nothing wiped")
        if (new := decommission.reprovisioned(marker, cfg, config_path)) is not None:
            _void(request)
            raise CliError(1, f"re-provisioned (certificate {new[:16]}) since the decommission"
                            f" at {decommission.when(marker.get('at'))}; nothing wiped")
        failed = decommission.complete(store, cfg, config_path, marker)
    except StoreError as exc:
        raise CliError(1, str(exc)) from None
    finally:
        store.close()
    if failed:
        raise CliError(1, "identity keys not wiped: "
                        + "; ".join(f"{path}: {why}" for path, why in failed.items()))
    try:
        request.unlink(missing_ok=True)
    except OSError as exc:
        why = f"keys wiped, but the request {request} stays: {exc.strerror or exc}"
        raise CliError(1, why) from None
    print(f"decommission at {decommission.when(marker.get('at'))} complete:"
          f" {len(marker.get('wiped') or [])} identity key file(s) wiped")
    return 0


def _void(request: Path) -> None:
    with contextlib.suppress(OSError):
        request.unlink()

