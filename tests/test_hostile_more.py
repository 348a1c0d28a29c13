"""More hostile input, each run as a user would: one line on stderr, exit 2 (or 6 for an OS error),
no traceback, nothing written.

Deeply nested dataset files and ledger lines, a ledger record naming no tier, 300-character path
components, a demo without its training stack or a place to write, the all-or-nothing writer's
file modes, and a dataset_info.json that is a FIFO or a link to /dev/zero.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path

import pytest

from dsplan.codes import ExitCode
from dsplan.launch.ledger import ATTEMPTS_FILE, MAX_LINE_DEPTH, load_ledger
from dsplan.plan.tiers import TIER_NAMES
from tests.conftest import REPO, run_dsplan

QWEN = ["--gpus", "1x80G", "--model", "Qwen1.5-7B", "--template", "qwen"]
BIG = ["--gpus", "8x80G", "--gpu-name", "A100", "--host-ram", "2048G", "--model", "Llama-3-8B", "--method", "full",
       "--cutoff-len", "1024"]
DEEP = "[" * 200_000 + "]" * 200_000
LONG = "d" * 300
TRAIN_MODULES = ("torch", "transformers", "deepspeed", "llamafactory")


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def assert_one_line(r, code: int) -> str:
    """Exit ``code``, exactly one line on stderr (returned), no traceback."""
    assert r.returncode == code, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    got = lines(r.stderr)
    assert len(got) == 1, got
    return got[0]


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def record(run_dir: Path, n: int = 1, **over) -> dict:
    rec = {"attempt": n, "tier": "zero2", "micro_batch": 1, "grad_accum": 1, "cutoff_len": 1024,
           "started": "2025-01-31T14:02:11+08:00", "ended": "2025-01-31T14:09:40+08:00", "exit_code": 1,
           "verdict": "gpu_oom", "evidence": "CUDA out of memory", "output_dir": str(run_dir / "x")}
    rec.update(over)
    return rec


def fake_cli(tmp_path: Path) -> Path:
    """A llamafactory-cli stand-in that trains nothing and succeeds."""
    path = tmp_path / "bin" / "lf-ok"
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {REPO / 'tests' / 'fakes' / 'children' / 'fake_lf_cli.py'} "
                    '"$@"\n')
    path.chmod(0o755)
    return path


# --------------------------------------------------------------------------- 1. deeply nested dataset files


@pytest.mark.parametrize("name, text", [
    ("d.json", DEEP),
    ("d.jsonl", '{"instruction": "hi", "output": "there"}\n' + DEEP + "\n"),
])
def test_a_deeply_nested_dataset_file_is_one_line(tmp_path, name, text):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"foo": {"file_name": name}}))
    (data / name).write_text(text)
    before = files_under(tmp_path)
    r = run_dsplan("plan", *QWEN, "--dataset", "foo", "--dataset-dir", str(data))
    line = assert_one_line(r, ExitCode.USAGE)
    assert line.startswith("dsplan: error: dataset foo: cannot read 'foo'") and "nested too deeply" in line, line
    assert files_under(tmp_path) == before


# --------------------------------------------------------------------------- 2./3. damaged ledger lines


def test_a_deeply_nested_ledger_line_is_a_damaged_line_for_report_and_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    too_deep = record(run_dir, 2, hardware=json.loads("[" * (MAX_LINE_DEPTH + 5) + "]" * (MAX_LINE_DEPTH + 5)))
    (run_dir / ATTEMPTS_FILE).write_text(DEEP + "\n" + json.dumps(record(run_dir)) + "\n" + json.dumps(too_deep)
                                         + "\n")
    r = run_dsplan("report", str(run_dir))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    deep = f"nested more than {MAX_LINE_DEPTH} levels deep; skipped"
    assert lines(r.stderr) == [f"warning: {ATTEMPTS_FILE} line 1: {deep}", f"warning: {ATTEMPTS_FILE} line 3: {deep}"]
    r = run_dsplan("run", *BIG, "--lf-cli", str(fake_cli(tmp_path)), "--run-dir", str(run_dir), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.count(f"dsplan run: {ATTEMPTS_FILE} line 1: nested more than") == 1
    assert r.stderr.count(f"dsplan run: {ATTEMPTS_FILE} line 3: nested more than") == 1


def test_a_ledger_record_with_an_unknown_tier_is_a_damaged_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ATTEMPTS_FILE).write_text(json.dumps(record(run_dir, tier="nosuch")) + "\n")
    ledger = load_ledger(run_dir)
    assert ledger.records == []
    why = f"{ATTEMPTS_FILE} line 1: attempt record: tier must be one of {', '.join(TIER_NAMES)}, got 'nosuch'; skipped"
    assert ledger.problems == [why]
    r = run_dsplan("run", *BIG, "--lf-cli", str(fake_cli(tmp_path)), "--run-dir", str(run_dir), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert r.stderr.count(f"dsplan run: {why}") == 1
    r = run_dsplan("report", str(run_dir))
    assert r.returncode == 0 and lines(r.stderr) == [f"warning: {why}"], r.stderr


# --------------------------------------------------------------------------- 4. 300-character path components


def _ledger_of_one(run_dir: Path) -> Path:
    run_dir.mkdir()
    (run_dir / ATTEMPTS_FILE).write_text(json.dumps(record(run_dir, verdict="success", exit_code=0, evidence=""))
                                         + "\n")
    return run_dir


def test_report_plot_with_a_name_too_long_is_one_line(tmp_path):
    run_dir = _ledger_of_one(tmp_path / "run")
    before = files_under(tmp_path)
    r = run_dsplan("report", str(run_dir), "--plot", str(tmp_path / f"{LONG}.png"))
    line = assert_one_line(r, ExitCode.USAGE)
    assert line.startswith("dsplan: error: cannot write --plot ") and line.endswith(": File name too long"), line
    assert len(line) < 200
    assert files_under(tmp_path) == before


def test_report_of_a_run_folder_with_a_name_too_long_is_one_line(tmp_path):
    r = run_dsplan("report", str(tmp_path / LONG))
    line = assert_one_line(r, ExitCode.USAGE)
    assert line.startswith("dsplan: error: cannot use run folder ") and line.endswith(": File name too long"), line
    assert len(line) < 200


def test_a_calibration_path_too_long_is_one_line(tmp_path):
    r = run_dsplan("plan", "--gpus", "1x80G", "--model", "Qwen1.5-7B", env={"DSPLAN_CALIBRATION": str(tmp_path / LONG)})
    line = assert_one_line(r, ExitCode.USAGE)
    assert line.startswith("dsplan: error: cannot read calibration file ") and line.endswith(": File name too long")
    assert len(line) < 200


def test_an_os_error_no_command_catches_is_one_line_and_exit_6(tmp_path):
    """`run --cleanup` does not check its folder's name; the CLI's last resort makes it one line."""
    r = run_dsplan("run", "--cleanup", "--run-dir", str(tmp_path / LONG))
    line = assert_one_line(r, ExitCode.OS_ERROR)
    assert line.startswith("dsplan: error: File name too long: ") and "..." in line and len(line) < 200, line
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- 5. the demo


def _site(tmp_path: Path, found: bool) -> dict:
    """An environment whose Python sees the training modules as missing (``found`` False: not
    importable either) or as present (True: specs only, never imported)."""
    site = tmp_path / f"site-{found}"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"""
import importlib.machinery, importlib.util, sys
_NAMES = {TRAIN_MODULES!r}
_find = importlib.util.find_spec
def find_spec(name, package=None):
    if name.split(".")[0] in _NAMES:
        return importlib.machinery.ModuleSpec(name, None) if {found!r} else None
    return _find(name, package)
importlib.util.find_spec = find_spec
class _Hide:
    def find_spec(self, name, path=None, target=None):
        if not {found!r} and name.split(".")[0] in _NAMES:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _Hide())
""")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}


@pytest.mark.parametrize("act", [[], ["--micro-batch"]])
def test_demo_without_the_training_stack_is_one_line_and_writes_nothing(tmp_path, act):
    workdir = tmp_path / "demo"
    r = run_dsplan("demo", *act, "--workdir", str(workdir), "--lf-cli", "/bin/true", env=_site(tmp_path, False))
    line = assert_one_line(r, ExitCode.USAGE)
    assert "torch, transformers, deepspeed, llamafactory" in line and "pip install '.[train]'" in line, line
    assert "scripts/setup_env.sh" in line
    assert not workdir.exists()


def test_check_train_modules_names_what_is_missing(monkeypatch):
    from dsplan.demo import demo
    from dsplan.errors import UserError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "deepspeed")
                        else importlib.machinery.ModuleSpec(name, None) if name in TRAIN_MODULES else real(name, *a))
    assert demo.missing_train_modules() == ["torch", "deepspeed"]
    with pytest.raises(UserError, match=r"needs torch, deepspeed in .*pip install '\.\[train\]'"):
        demo.check_train_modules()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None))
    demo.check_train_modules()


def test_demo_workdir_under_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    r = run_dsplan("demo", "--workdir", str(tmp_path / "file" / "demo"), "--lf-cli", "/bin/true",
                   env=_site(tmp_path, True))
    line = assert_one_line(r, ExitCode.USAGE)
    assert line.startswith("dsplan: error: cannot write in --workdir ") and line.endswith("Not a directory"), line
    assert (tmp_path / "file").read_text() == "x"


def test_demo_in_a_read_only_workdir_is_one_line(tmp_path):
    if os.geteuid() == 0:  # root writes anywhere the mode says no; /proc/self refuses everyone
        if not os.path.isdir("/proc/self"):
            pytest.skip("root, and no /proc")
        workdir, before = Path("/proc/self"), None
    else:
        workdir = tmp_path / "ro"
        workdir.mkdir()
        workdir.chmod(0o555)
        before = files_under(workdir)
    try:
        r = run_dsplan("demo", "--workdir", str(workdir), "--lf-cli", "/bin/true", env=_site(tmp_path, True))
    finally:
        if before is not None:
            workdir.chmod(0o755)
    line = assert_one_line(r, ExitCode.USAGE)
    assert line.startswith("dsplan: error: cannot write in --workdir "), line
    if before is not None:
        assert files_under(workdir) == before


# --------------------------------------------------------------------------- 6. file modes


def _with_umask(mask: int, *args: str, **kw):
    old = os.umask(mask)
    try:
        return run_dsplan(*args, **kw)
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_rendered_files_have_the_umask_mode(tmp_path, mask):
    out = tmp_path / f"out-{mask:o}"
    r = _with_umask(mask, "render", *QWEN, "--tier", "zero2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~mask}, modes


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="--plot needs matplotlib")
def test_a_plot_has_the_umask_mode(tmp_path):
    run_dir = _ledger_of_one(tmp_path / "run")
    r = _with_umask(0o027, "report", str(run_dir), "--plot", str(tmp_path / "p.png"))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((tmp_path / "p.png").stat().st_mode) == 0o640


# --------------------------------------------------------------------------- 7. dataset_info.json not a file


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "folder"])
def test_a_dataset_info_that_is_not_a_regular_file_is_one_line(tmp_path, kind):
    data = tmp_path / "data"
    data.mkdir()
    info = data / "dataset_info.json"
    if kind == "dev-zero":
        info.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(info)
    else:
        info.mkdir()
    r = run_dsplan("plan", *QWEN, "--dataset", "foo", "--dataset-dir", str(data), timeout=60)
    line = assert_one_line(r, ExitCode.USAGE)
    assert line == f"dsplan: error: dataset foo: {info} is not a regular file: LF will refuse it", line


def test_a_dataset_file_that_is_a_fifo_is_one_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"foo": {"file_name": "d.json"}}))
    os.mkfifo(data / "d.json")
    r = run_dsplan("plan", *QWEN, "--dataset", "foo", "--dataset-dir", str(data), timeout=60)
    line = assert_one_line(r, ExitCode.USAGE)
    assert line == f"dsplan: error: dataset foo: 'foo': {data / 'd.json'} is not a regular file: LF will refuse it"
