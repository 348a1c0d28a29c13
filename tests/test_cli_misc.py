"""`dsplan detect` (with FAKE smi tools replaying recorded output) and `dsplan diagnose`, as commands."""

import json
import os

from tests.conftest import REPO, run_dsplan

FAKE_BIN = REPO / "tests" / "fakes" / "bin"


def test_detect_with_fake_nvidia_smi():
    env = {"PATH": f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}", "DSPLAN_FAKE_SMI": "nvidia-smi_8xA100-80GB.csv"}
    r = run_dsplan("detect", env=env)
    assert r.returncode == 0, r.stderr
    assert "--gpus 8x80G --backend cuda" in r.stdout and "--gpu-name A100" in r.stdout
    d = json.loads(run_dsplan("detect", "--json", env=env).stdout)
    assert d["world_size"] == 8 and d["gpu_name"] == "A100" and d["backend"] == "cuda" and d["host_ram"] > 0


def test_detect_with_fake_hy_smi():
    env = {"PATH": f"{FAKE_BIN}{os.pathsep}{os.environ['PATH']}", "DSPLAN_FAKE_SMI": "hy-smi_8xK100_AI.json"}
    d = json.loads(run_dsplan("detect", "--backend", "dcu", "--json", env=env).stdout)
    assert d["backend"] == "dcu" and d["gpus_per_node"] == 8 and d["gpu_name"] == "K100"


def test_detect_without_any_tool_is_one_line():
    r = run_dsplan("detect", env={"PATH": "/nonexistent"})
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_diagnose_command_json_and_text():
    log = REPO / "tests" / "logs" / "gpu_oom__rocm_hip.log"
    d = json.loads(run_dsplan("diagnose", str(log), "--json").stdout)
    assert set(d) == {"verdict", "evidence", "backend", "suggestion"}
    assert d["verdict"] == "gpu_oom" and d["backend"] == "rocm"
    r = run_dsplan("diagnose", str(log))
    assert r.returncode == 0 and "verdict: gpu_oom" in r.stdout and "next:" in r.stdout


def test_diagnose_missing_file():
    r = run_dsplan("diagnose", "/nonexistent/train.log")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_run_cleanup_needs_no_plan_inputs(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    r = run_dsplan("run", "--cleanup", "--run-dir", str(run_dir))
    assert r.returncode == 0, r.stderr
    assert "nothing to clean up" in r.stderr and not (run_dir / "attempts.jsonl").exists()


def test_precision_flag_fp32_writes_neither_mixed_precision_key(tmp_path):
    import yaml

    out = tmp_path / "out"
    r = run_dsplan("render", "--gpus", "1x16G", "--model", "Qwen2.5-0.5B", "--precision", "fp32", "-o", str(out))
    assert r.returncode == 0, r.stderr
    for tier_yaml in out.glob("lf_*.yaml"):
        keys = yaml.safe_load(tier_yaml.read_text())
        assert "bf16" not in keys and "fp16" not in keys, tier_yaml
    r = run_dsplan("render", "--gpus", "1x16G", "--model", "Qwen2.5-0.5B", "--precision", "fp16", "-o",
                   str(tmp_path / "o16"))
    assert yaml.safe_load((tmp_path / "o16" / "lf_zero2.yaml").read_text())["fp16"] is True


def test_fp32_is_flagged_as_not_modelled():
    d = json.loads(run_dsplan("plan", "--gpus", "1x16G", "--model", "Qwen2.5-0.5B", "--precision", "fp32",
                              "--json").stdout)
    assert any(w.startswith("precision fp32") for w in d["warnings"])
    d = json.loads(run_dsplan("plan", "--gpus", "1x16G", "--model", "Qwen2.5-0.5B", "--json").stdout)
    assert not any(w.startswith("precision fp32") for w in d["warnings"])
