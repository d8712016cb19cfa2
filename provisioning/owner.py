"""Which group the installed identity belongs to: the service's, so that the agent, which runs
as the ``simkeeper`` system user (packaging/simkeeper.service: ``User=simkeeper``,
``Group=simkeeper``), can read its own key while nobody else can.

Installed with a group, a bundle is ``root:<group>``: the directory 0750, the private key 0640,
the other files 0644; root alone can change any of it. Without a group (none given and no
``simkeeper`` group on the target) it stays root-only: key 0600, directory 0755.

The group is looked up where the identity will be used: in ``ROOT/etc/group`` of a staging tree
that has one, else on this machine (NSS). A numeric gid is taken as it is.
"""

from __future__ import annotations

import grp
from dataclasses import dataclass
from pathlib import Path

from provisioning.files import ProvisionError, why

SERVICE_GROUP = "simkeeper"  # packaging/simkeeper.service Group=, made by postinst


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    gid: int
    source: str  # where it was found: a group file, "this machine" or "numeric"

    def __str__(self) -> str:
        return self.name if self.name == str(self.gid) else f"{self.name} (gid {self.gid})"


def group_file(root: Path | None) -> Path | None:
    """``ROOT/etc/group`` of a staging tree when it has one; None means this machine's."""
    if root is None:
        return None
    path = root / "etc" / "group"
    return path if path.exists() else None


def _read(path: Path) -> dict[str, int]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise ProvisionError(f"cannot read {path}: {why(exc)}") from None
    groups: dict[str, int] = {}
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) >= 3 and fields[0] and not fields[0].startswith(("#", "+", "-")) \
                and fields[2].isdigit():
            groups.setdefault(fields[0], int(fields[2]))
    return groups


def find(name: str, root: Path | None = None) -> Group | None:
    """The group ``name`` of the target (``root``'s group file, else this machine), or None."""
    path = group_file(root)
    if path is not None:
        gid = _read(path).get(name)
        return None if gid is None else Group(name, gid, str(path))
    try:
        return Group(name, grp.getgrnam(name).gr_gid, "this machine")
    except KeyError:
        return None


def lookup(spec: str, root: Path | None = None) -> Group:
    """``spec`` (a group name, or a numeric gid) on the target; :class:`ProvisionError` when a
    name is not there."""
    if spec.isdigit():
        return Group(spec, int(spec), "numeric")
    group = find(spec, root)
    if group is None:
        path = group_file(root)
        where = str(path) if path is not None else "this machine"
        raise ProvisionError(f"group {spec!r} does not exist on {where} (a numeric gid is"
                             " taken as it is)")
    return group


def service_group(spec: str | None, root: Path | None = None, *,
                  enabled: bool = True) -> Group | None:
    """The group to install for: ``spec`` when given, else ``simkeeper`` when the target has
    it, else None (root-only files). ``enabled=False`` (``--no-group``): None."""
    if not enabled:
        return None
    return find(SERVICE_GROUP, root) if spec is None else lookup(spec, root)
