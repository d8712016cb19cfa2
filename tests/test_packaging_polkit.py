"""The polkit rule the package ships (packaging/polkit/50-simkeeper.rules): with
``data_path = "networkmanager"`` the agent, user simkeeper, runs nmcli to carry out a
suspension; the rule grants that user exactly the NetworkManager actions those nmcli calls
need, and nobody anything else. The rule runs in node against a stand-in ``polkit`` object
(polkitd is not needed); node is installed by ``make test``, skipped where it is missing."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from agent.sim.suspension import Enforcer, NmMode
from tests.test_packaging import PACKAGING

RULE = PACKAGING / "polkit" / "50-simkeeper.rules"
NM = "org.freedesktop.NetworkManager."
# What NetworkManager asks polkit for each nmcli call (its D-Bus method or property).
ACTION_OF = {
    ("connection", "show"): None,  # reading the connections: no authorization
    ("connection", "up"): NM + "network-control",  # ActivateConnection
    ("connection", "down"): NM + "network-control",  # DeactivateConnection
    ("connection", "modify"): NM + "settings.modify.system",  # Update2 of a system connection
    ("radio", "wwan"): NM + "enable-disable-wwan",  # the WwanEnabled property
}
EVALUATE = """
const fs = require("fs"), vm = require("vm");
const rules = [];
const polkit = {
  Result: {NO: "no", YES: "yes", AUTH_SELF: "auth_self", AUTH_SELF_KEEP: "auth_self_keep",
           AUTH_ADMIN: "auth_admin", AUTH_ADMIN_KEEP: "auth_admin_keep", NOT_HANDLED: null},
  addRule: (rule) => rules.push(rule), log: () => {},
};
vm.runInNewContext(fs.readFileSync(process.argv[1], "utf8"), {polkit},
                   {filename: process.argv[1]});
const answers = JSON.parse(fs.readFileSync(0, "utf8")).map(([user, id]) => {
  for (const rule of rules) {
    const answer = rule({id, lookup: () => undefined},
                        {user, isInGroup: () => true, local: false, active: false});
    if (answer !== undefined && answer !== null) return answer;
  }
  return null;
});
console.log(JSON.stringify({rules: rules.length, answers}));
"""


def _node() -> str:
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node not installed (make test installs it: apt-get install nodejs)")
    return node


def _agent_actions() -> set[str]:
    """The polkit actions of every nmcli call the agent makes, in each NetworkManager mode."""
    calls: list[Sequence[str]] = []

    async def runner(argv: Sequence[str]) -> tuple[int, str]:
        calls.append(argv)
        return 0, "soracom:gsm\n"

    enforcer = Enforcer(data_path="networkmanager", runner=runner)
    steps: list[tuple[NmMode, NmMode | None]] = [("data-off", "on"), ("radio-off", "data-off"),
                                                 ("on", "radio-off")]
    for mode, previous in steps:
        assert asyncio.run(enforcer.apply_nm(mode, previous))
    actions = set()
    for argv in calls:
        rest = list(argv[1:])
        while rest and rest[0].startswith("-"):  # nmcli's own options: -t, -f FIELDS
            rest = rest[2:] if rest[0] in ("-f", "--fields") else rest[1:]
        words = tuple([*rest, "", ""][:2])
        assert argv[0] == "nmcli" and words in ACTION_OF, \
            f"{' '.join(argv)}: which polkit action does it need? add it to the rule and here"
        action = ACTION_OF[words]
        if action is not None:
            actions.add(action)
    return actions


def test_the_rule_covers_the_agents_nmcli_calls() -> None:
    granted = set(re.findall(r'"(org\.freedesktop\.[^"]+)"', RULE.read_text()))
    assert granted == _agent_actions()


def test_rule_parses(tmp_path: Path) -> None:
    node = _node()
    copy = tmp_path / "rule.js"  # node --check goes by the file name
    copy.write_text(RULE.read_text())
    result = subprocess.run([node, "--check", str(copy)], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    # polkitd's interpreter (duktape) is ECMAScript 5: no arrows, let, const or templates
    code = "\n".join(line.split("//")[0] for line in RULE.read_text().splitlines())
    assert not re.search(r"=>|\blet\b|\bconst\b|`", code)


def test_rule_grants_simkeeper_exactly_those_actions() -> None:
    node = _node()
    needed = sorted(_agent_actions())
    others = [NM + "settings.modify.hostname", NM + "wifi.share.open", NM + "sleep-wake",
              NM + "network-control.x", "org.freedesktop.login1.reboot",
              "org.freedesktop.systemd1.manage-units"]
    cases = [(user, action) for user in ("simkeeper", "root", "pi", "simkeeper2", "")
             for action in [*needed, *others]]
    result = subprocess.run([node, "-e", EVALUATE, str(RULE)], input=json.dumps(cases),
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["rules"] == 1
    granted = {case for case, answer in zip(cases, out["answers"], strict=True)
               if answer is not None}
    assert granted == {("simkeeper", action) for action in needed}
    assert set(out["answers"]) == {"yes", None}
