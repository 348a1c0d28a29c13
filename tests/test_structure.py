"""The package reads as the data flow, in small units (the login-node import checks are in test_plan_cli)."""

import ast

from tests.conftest import REPO

PACKAGE = REPO / "dsplan"
MAX_FUNCTION_LINES = 60
#: The stages of the data flow, each a subpackage with one job (README "Layout").
STAGES = ("inputs", "schema", "estimate", "plan", "emit", "launch", "logs", "learn", "demo")


def _functions(path):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno, node.end_lineno - node.lineno + 1


def test_no_function_over_60_lines():
    long = [f"{p.relative_to(REPO)}:{line} {name} ({n} lines)"
            for p in sorted(PACKAGE.rglob("*.py")) for name, line, n in _functions(p) if n > MAX_FUNCTION_LINES]
    assert not long, "functions over 60 lines:\n" + "\n".join(long)


def test_the_tree_is_the_flow_and_the_readme_names_each_stage():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):]
    for stage in STAGES:
        assert (PACKAGE / stage / "__init__.py").is_file(), stage
        assert f"`dsplan/{stage}/`" in layout, f"README Layout does not name dsplan/{stage}/"
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "cli.py", "codes.py", "errors.py", "fsutil.py", "units.py"]
