"""The rules of the house (README, "Architecture"), checked on the code's own imports: a
package imports only from its own floor or below, never another package's private module,
and no module grows past what one reads in a sitting."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Each wing of agent/ and its floor; drivers/ lies below the agent.
FLOORS = {
    "drivers": -1,
    "agent.core": 0,
    "agent.telemetry": 1,
    "agent.usage": 2,
    "agent.sim": 3,
    "agent.modem": 3,
    "agent.commands": 4,
    "agent.daemon": 5,
    "agent.cli": 6,
    "agent.fleet": 6,
}
MAX_LINES = 420  # "about 400"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _wing(module: str) -> str | None:
    for wing in sorted(FLOORS, key=len, reverse=True):
        if module == wing or module.startswith(wing + "."):
            return wing
    return None


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of the project in ``path``, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                      if _wing(f"{node.module}.{a.name}") and (ROOT / (
                          f"{node.module}.{a.name}".replace(".", "/") + ".py")).exists()]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] in ("agent", "drivers")]


def _sources() -> list[Path]:
    return sorted((ROOT / "agent").rglob("*.py"))


def test_every_agent_module_has_a_floor() -> None:
    assert [str(p) for p in _sources() if _wing(_module(p)) is None
            and _module(p) != "agent"] == []


def test_no_import_runs_up_a_floor() -> None:
    wrong = []
    for path in _sources():
        here = _wing(_module(path))
        if here is None:
            continue
        for line, module in _imports(path):
            there = _wing(module)
            if there is not None and FLOORS[there] > FLOORS[here]:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert wrong == []


def test_no_package_imports_another_packages_private_module() -> None:
    wrong = []
    for path in [*_sources(), *sorted((ROOT / "drivers").rglob("*.py")),
                 *sorted((ROOT / "provisioning").rglob("*.py"))]:
        for line, module in _imports(path):
            parts = module.split(".")
            first = next((i for i, part in enumerate(parts) if part.startswith("_")), None)
            # a private module is for the package that holds it
            if first is not None and not _module(path).startswith(".".join(parts[:first])):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert wrong == []


def test_no_module_is_too_long_to_read_in_one_sitting() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
