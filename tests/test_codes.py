"""The README's exit-code and verdict tables are dsplan.codes' enums, row for row."""

import json
import re

from dsplan.codes import EXIT_FOR_VERDICT, Component, EndReason, ExitCode, HostComponent, Verdict
from tests.conftest import REPO


def _table(header: str) -> list[tuple[str, str]]:
    """Rows of the README table whose first line is ``header``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index(header)
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        rows.append((cells[0], " | ".join(cells[1:])))
    return rows


def test_readme_exit_codes_are_the_enum():
    assert _table("| exit code | meaning |") == [(str(int(c)), c.help) for c in ExitCode]


def test_readme_verdicts_are_the_enum():
    assert _table("| verdict | meaning |") == [(f"`{v.value}`", v.help) for v in Verdict]


def test_readme_names_every_estimate_component():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"`(\w+)`", text[text.index("`breakdown`: component to bytes"):][:600]))
    assert {c.value for c in Component} <= listed


def test_codes_print_and_serialise_as_their_values():
    assert f"{Verdict.GPU_OOM}" == "gpu_oom" and str(EndReason.OOM) == "oom"
    assert json.loads(json.dumps({"v": Verdict.HOST_OOM})) == {"v": "host_oom"}
    assert Verdict("stalled") is Verdict.STALLED and ExitCode(130) is ExitCode.INTERRUPTED


def test_every_member_has_help_and_every_verdict_an_exit_code():
    for enum in (Verdict, ExitCode, EndReason, Component, HostComponent):
        for member in enum:
            assert member.help and member.help[0] != " ", member
    assert set(EXIT_FOR_VERDICT) == set(Verdict)
    # members of different enums may share a value; each keeps its own help
    assert Verdict.STALLED.help != EndReason.STALLED.help
