"""The demo does not depend on what the CPU can do.

DeepSpeed's CPU accelerator accepts fp16 only where oneDNN has fp16 kernels
(``torch.ops.mkldnn._is_mkldnn_fp16_supported()``: AVX512-FP16 or AMX).  These tests
make every training process believe it runs on a CPU without them, whatever CPU
the suite is on, through ``tests/fakes/no_fp16/sitecustomize.py`` on ``PYTHONPATH``,
and check that the demo's first steps still train.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from dsplan.launch.ledger import read_attempts
from tests.conftest import REPO
from tests.fakes.cpu_caps import cpu_capabilities, require

pytestmark = pytest.mark.real

NO_FP16 = REPO / "tests" / "fakes" / "no_fp16"


def no_fp16_env(log: Path) -> dict[str, str]:
    """What a training child needs to look like a CPU without fp16 kernels."""
    path = os.pathsep.join(p for p in (str(NO_FP16), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "DSPLAN_NO_FP16_LOG": str(log)}


def test_the_patch_reaches_deepspeed(tmp_path, train_python):
    """In a child with the helper on PYTHONPATH, DeepSpeed's own question says no fp16,
    and the answer comes from the helper, not from this CPU."""
    from dsplan.demo.demo import cpu_env

    log = tmp_path / "fp16.jsonl"
    env = cpu_env(train_python, no_fp16_env(log))
    code = ("import json, torch; from deepspeed.accelerator import get_accelerator; a = get_accelerator(); "
            "print(json.dumps({'name': a.device_name(), 'fp16': bool(a.is_fp16_supported()), "
            "'dtypes': [str(d) for d in a.supported_dtypes()], "
            "'from': torch.ops.mkldnn._is_mkldnn_fp16_supported.__module__}))")
    r = subprocess.run([train_python, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got == {"name": "cpu", "fp16": False, "dtypes": ["torch.float32", "torch.bfloat16"],
                   "from": "sitecustomize"}
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert records and {(r["mkldnn_fp16"], r["check_from"]) for r in records} == {(False, "sitecustomize")}


def test_demo_first_steps_train_without_fp16(tmp_path, train_python):
    """The demo's own code path (plan, cap wrapper, dsplan's run loop) at a micro-batch
    that fits, on a CPU that has no fp16: the first attempt trains and logs its steps."""
    from dsplan.demo.demo import DEMO_PRECISION, cpu_env, run_demo
    from dsplan.launch.loop import resolve_lf_cli

    log = tmp_path / "fp16.jsonl"
    extra = no_fp16_env(log)
    caps = cpu_capabilities(train_python, cpu_env(train_python, extra))
    assert "float16" not in caps["dtypes"] and not caps["mkldnn_fp16"]  # the forced CPU, as DeepSpeed sees it
    require(caps, precision=DEMO_PRECISION, rlimit_as=True)
    said: list[str] = []
    code, run_dir = run_demo(tmp_path / "demo", resolve_lf_cli(None), micro_batch=1, max_steps=2,
                             stall_timeout=600, say=said.append, env=extra)
    ledger = read_attempts(run_dir)
    train_log = (run_dir / "attempt-001" / "train.log").read_text(errors="replace")
    assert code == 0, "\n".join(said) + "\n" + train_log[-3000:]
    assert [(a["tier"], a["verdict"]) for a in ledger] == [("zero2", "success")]
    lf = yaml.safe_load((run_dir / "attempt-001" / "lf_zero2.yaml").read_text())
    assert not lf.get("fp16") and not lf.get("bf16")
    steps = [json.loads(x) for x in (Path(ledger[0]["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    assert [s["current_steps"] for s in steps if "loss" in s] == [1, 2]
    # the training rank itself ran with the patched check (rank "0": torchrun's child, not the launchers)
    records = [json.loads(x) for x in log.read_text().splitlines()]
    ranks = [r for r in records if r["rank"] is not None]
    assert ranks and all(r["mkldnn_fp16"] is False and r["check_from"] == "sitecustomize" for r in ranks)
    assert "0" in {r["rank"] for r in ranks}
