"""Atomic installation of a bundle into ``/etc/simkeeper`` (or ``ROOT/etc/simkeeper``).

Each identity lives in its own generation directory, ``id-<UTC time>-<random>/``, and its
config names files inside that directory only. The one thing the agent reads first,
``config.toml``, is a symbolic link to the current generation's config::

    /etc/simkeeper/config.toml -> id-20250401T090000Z-3fa2c1/config.toml
    /etc/simkeeper/id-20250401T090000Z-3fa2c1/{config.toml,device.key,device.pem,...}

A new identity is staged in ``.stage-<gen>/`` beside it (same filesystem), every file and the
directory fsynced, renamed to ``<gen>/``, and then the link is replaced by ``rename(2)``, which
is atomic. A crash at any point leaves the link on the old generation (old identity whole) or
on the new one (new identity whole); leftovers of an unfinished run are removed by the next.

Installed for a group (the service's, :mod:`provisioning.owner`), the generation directory is
``root:<group>`` 0750 and every file in it ``root:<group>``, the private key 0640; the group is
set before the first byte is written. Without one: directory 0755, key 0600 (root only).
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath

from agent.core import config
from provisioning.bundle import CONFIG, ETC
from provisioning.files import File, ProvisionError, fsync_dir, locked, make_dir, why, write_new

GEN_PREFIX, STAGE_PREFIX, LINK_PREFIX = "id-", ".stage-", ".link-"
LOCK = ".provision.lock"

Builder = Callable[[PurePosixPath], Mapping[str, File]]  # device path of the bundle -> files


def etc_dir(root: Path | None) -> Path:
    """``/etc/simkeeper`` on this machine, or under the staging tree ``root``."""
    return Path(ETC) if root is None else root / ETC.relative_to("/")


def current(etc: Path) -> Path | None:
    """The generation ``config.toml`` points to, None when it is not such a link."""
    link = etc / CONFIG
    if not link.is_symlink():
        return None
    parts = PurePosixPath(os.readlink(link)).parts
    if len(parts) != 2 or not parts[0].startswith(GEN_PREFIX) or parts[1] != CONFIG:
        return None
    gen = etc / parts[0]
    return gen if (gen / CONFIG).is_file() else None


def existing_identity(etc: Path) -> str | None:
    """What is installed, if it is an identity. A plain config.toml without a client
    certificate or an operator key (the packaged default) is not one."""
    gen = current(etc)
    if gen is not None:
        return f"generation {gen.name}"
    path = etc / CONFIG
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        cfg = config.load(path)
    except config.ConfigError:
        return f"{path}, which is not a config the agent loads"
    if cfg.uplink.cert is not None or cfg.commands.operator_key is not None:
        return f"{path} of {cfg.device_id}"
    return None


def _generation() -> str:
    return f"{GEN_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(3)}"


DIR_MODE, GROUP_DIR_MODE = 0o755, 0o750


def _stage(stage: Path, files: Mapping[str, File], gid: int | None) -> None:
    stage.mkdir(mode=0o700)
    if gid is not None:
        try:
            os.chown(stage, -1, gid)
        except PermissionError:
            raise ProvisionError(f"cannot give {stage} to group {gid}: not permitted (only root"
                                 " may); run as root, or --no-group for root-only files"
                                 ) from None
    os.chmod(stage, DIR_MODE if gid is None else GROUP_DIR_MODE)
    for name, file in files.items():
        write_new(stage / name, file.for_group(gid))
    fsync_dir(stage)


def _switch(etc: Path, gen: str) -> None:
    """Point config.toml at ``gen``: a new link under a temporary name renamed over it."""
    tmp = etc / f"{LINK_PREFIX}{secrets.token_hex(4)}"
    os.symlink(f"{gen}/{CONFIG}", tmp)
    os.replace(tmp, etc / CONFIG)
    fsync_dir(etc)


def _clean(etc: Path, keep: str | None) -> None:
    """Remove leftovers: unfinished stages, temporary links, generations not in use."""
    for entry in etc.iterdir():
        name = entry.name
        if name == keep or not name.startswith((GEN_PREFIX, STAGE_PREFIX, LINK_PREFIX)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def install(etc: Path, build: Builder, *, force: bool = False,
            device_etc: PurePosixPath = ETC, gid: int | None = None) -> Path:
    """Install the files ``build`` makes as the new identity in ``etc``; the generation
    directory. ``device_etc`` is where ``etc`` is on the device (config paths use it); ``gid``
    the group that gets read access (the service's), None for root-only files."""
    make_dir(etc)
    with locked(etc / LOCK):
        installed = existing_identity(etc)
        if installed and not force:
            raise ProvisionError(f"{etc} already holds an identity ({installed});"
                                 " --force replaces it")
        gen = _generation()
        stage, final = etc / f"{STAGE_PREFIX}{gen}", etc / gen
        files = build(device_etc / gen)
        try:
            _stage(stage, files, gid)
            os.rename(stage, final)
            fsync_dir(etc)
            _switch(etc, gen)
        except (OSError, ProvisionError) as exc:
            shutil.rmtree(stage, ignore_errors=True)
            if current(etc) != final:
                shutil.rmtree(final, ignore_errors=True)
            if isinstance(exc, ProvisionError):
                raise
            raise ProvisionError(f"cannot install into {etc}: {why(exc)}") from None
        keep = current(etc)
        _clean(etc, keep.name if keep else None)
        return final
