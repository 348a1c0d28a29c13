"""scripts/gpu_check.py: its case matrix, time budget and sample lines (fast), and one real ``--dry`` case.

The real test trains one shrunk Qwen2.5-0.5B LoRA case through the real llamafactory-cli and
DeepSpeed on the CPU (fp32, gloo, world size 1) and checks the ``dsplan-sample/1`` line it appends.
No GPU figure exists on a CPU: those fields must be null, never 0.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from dsplan.units import GiB
from tests.conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_check.py"
TOP_KEYS = ["format", "source", "hardware", "tier", "micro_batch", "cutoff_len", "verdict", "estimate", "measured",
            "oom_figures", "case"]
HARDWARE_KEYS = {"backend", "gpu_name", "gpu_mem_bytes", "world_size", "nodes", "gpus_per_node"}
VERSION_KEYS = {"torch", "deepspeed", "llamafactory", "transformers", "peft"}


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------ the matrix
def test_every_default_case_is_in_the_matrix_and_names_read_back(gc):
    names = {c.name for c in gc.matrix()}
    assert len(names) == len(gc.matrix()) == 4 * 2 * 4 * 2 * 4 * 2
    assert set(gc.DEFAULT_GPU) <= names and set(gc.DEFAULT_DRY) <= names
    assert [c.name for c in gc.select(None, False)] == list(gc.DEFAULT_GPU)
    assert [c.name for c in gc.select("default", True)] == list(gc.DEFAULT_DRY)
    defaults = gc.select(None, False)
    assert {c.method for c in defaults} == {"lora", "full"} and {c.gc for c in defaults} == {True, False}
    assert {c.model for c in defaults} == {"qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b"}
    assert {c.tier for c in defaults} == {"zero2", "zero3"} and len({c.cutoff for c in defaults}) > 1


def test_cases_globs_select_from_the_matrix_cheapest_first(gc):
    picked = gc.select("qwen2.5-7b-*-zero2-gc-c1024-mb1,qwen2.5-0.5b-lora-zero3-nogc-c512-mb1", False)
    assert [c.name for c in picked] == ["qwen2.5-0.5b-lora-zero3-nogc-c512-mb1", "qwen2.5-7b-lora-zero2-gc-c1024-mb1",
                                        "qwen2.5-7b-full-zero2-gc-c1024-mb1"]
    assert len(gc.select("all", False)) == len(gc.matrix())
    with pytest.raises(SystemExit, match="matches no case"):
        gc.select("mistral-*", False)


def test_dry_shapes_keep_the_architecture_and_shrink_its_size(gc):
    real = gc.model_config("llama-3-8b", False)
    dry = gc.model_config("llama-3-8b", True)
    assert real["hidden_size"] == 4096 and real["num_hidden_layers"] == 32
    assert dry["num_attention_heads"] == real["num_attention_heads"]
    assert dry["num_key_value_heads"] == real["num_key_value_heads"]
    assert dry["hidden_size"] == 16 * real["num_attention_heads"] and dry["num_hidden_layers"] == 2
    assert dry["vocab_size"] == 8192 and dry["tie_word_embeddings"] is False
    assert gc.model_config("qwen2.5-0.5b", True)["tie_word_embeddings"] is True


# ------------------------------------------------------------------------ the time budget
def _ctx(gc, tmp_path, dry=False):
    return SimpleNamespace(workdir=tmp_path, dry=dry)


def test_budget_starts_only_cases_expected_to_fit_and_learns_from_finished_ones(gc, tmp_path):
    cases = gc.select("qwen2.5-0.5b-lora-zero2-gc-c1024-mb1,qwen2.5-0.5b-lora-zero2-nogc-c1024-mb1,"
                      "qwen2.5-7b-full-zero3-gc-c1024-mb1", False)
    now = [0.0]

    def runner(ctx, case):  # every case really takes 20 s more than its size and build terms
        took = 20.0 + gc.size_term(case, False) + gc.build_term(case, set(), False) * (case.name == cases[0].name)
        now[0] += took
        return {"case": case, "line": {}, "status": "success", "evidence": "", "wall_s": took}

    said = []
    prior = gc.expected_seconds(cases[0], {}, set(), False)
    results = gc.run_all(_ctx(gc, tmp_path), cases, budget=prior + 25.0 + 40.0, t0=0.0, say=said.append,
                         clock=lambda: now[0], runner=runner)
    assert [r["status"] for r in results] == ["success", "success", "skipped (budget)"]
    # the second case was expected at the observed 20 s fixed part, not the 30 s prior
    assert f"running (expected {20 + gc.size_term(cases[1], False):.0f} s" in said[2]
    assert "skipped, expected" in said[-1]


def test_a_case_that_raises_is_an_error_row_and_the_rest_still_run(gc, tmp_path):
    cases = gc.select("qwen2.5-0.5b-lora-zero2-gc-c1024-mb1,qwen2.5-0.5b-lora-zero2-nogc-c1024-mb1", False)

    def runner(ctx, case):
        if case is cases[0]:
            raise RuntimeError("building the model failed: disk full")
        return {"case": case, "line": {}, "status": "success", "evidence": "", "wall_s": 1.0}

    results = gc.run_all(_ctx(gc, tmp_path), cases, budget=1e6, t0=0.0, say=lambda s: None,
                         clock=lambda: 0.0, runner=runner)
    assert results[0]["status"] == "error" and "disk full" in results[0]["evidence"]
    assert results[1]["status"] == "success"


def test_list_plans_every_default_case_without_training(gc):
    lines = gc.list_cases(gc.select(None, False), dry=False, budget=gc.DEFAULT_BUDGET_S["gpu"])
    assert "H200" in lines[0] and len(lines) == 1 + len(gc.DEFAULT_GPU)
    for line in lines[1:]:
        est = float(line.split()[1])
        assert 1.0 < est < 200.0, line
    assert "past the budget" not in "\n".join(lines)  # the default list fits the default budget


# ------------------------------------------------------------------------ the sample line
def _estimate(gpu=10 * GiB, transient=2 * GiB):
    return SimpleNamespace(gpu_bytes=gpu, host_bytes=40 * GiB, gpu={"weights": gpu - GiB, "overhead": GiB},
                           transient_bytes=transient)


def _line_ctx(gc, tmp_path):
    from dsplan.inputs.hardware import HardwareProfile

    profile = HardwareProfile(nodes=1, gpus_per_node=1, gpu_mem=143771 * 2**20, backend="cuda", gpu_name="H200")
    return SimpleNamespace(dry=False, precision="bf16", versions=dict.fromkeys(VERSION_KEYS, "1"), max_steps=3,
                           hardware=gc.hardware_block(profile, "H200"), profile=profile, out=tmp_path / "s.jsonl")


def test_sample_lines_have_exactly_the_calibration_format(gc, tmp_path):
    ctx = _line_ctx(gc, tmp_path)
    case = gc.select("qwen2.5-7b-lora-zero3-nogc-c1024-mb1", False)[0]
    ok = SimpleNamespace(exit_code=0, finding=SimpleNamespace(evidence="***** train metrics *****"))
    measured = {"vram_allocated_bytes": 9 * GiB, "vram_reserved_bytes": 11 * GiB, "host_peak_bytes": 30 * GiB}
    assumed = {"context_bytes": GiB // 2, "nccl_bytes": GiB // 2, "headroom_shift": 0.0, "runtime_source": "default",
               "seq_len": 1024, "tokens": 1024, "planned_at": "cutoff_len"}
    line = gc.sample_line(ctx, case, _estimate(), measured, None, "success", ok, 61.234,
                          {"pid": 7, "rank": 0, "max_reserved_bytes": 11 * GiB, "distributions": ["torch"]}, assumed)
    assert list(line) == TOP_KEYS
    assert line["format"] == "dsplan-sample/1" and line["source"] == "gpu_check"
    assert set(line["hardware"]) == HARDWARE_KEYS and line["hardware"]["gpu_name"] == "H200"
    assert (line["tier"], line["micro_batch"], line["cutoff_len"], line["verdict"]) == ("zero3", 1, 1024, "success")
    assert line["estimate"] == {"gpu_bytes": 10 * GiB, "host_bytes": 40 * GiB,
                                "breakdown": {"weights": 9 * GiB, "overhead": GiB}, "host_breakdown": {},
                                "transient_bytes": 2 * GiB, **assumed}
    assert line["measured"] == measured and line["oom_figures"] is None
    c = line["case"]
    assert (c["model"], c["method"], c["gc"], c["precision"], c["wall_s"]) == ("Qwen2.5-7B", "lora", False, "bf16", 61.2)
    assert set(c["versions"]) == VERSION_KEYS
    assert c["process"] == {"rank": 0, "max_reserved_bytes": 11 * GiB}  # the import list stays in the run folder
    # reserved never holds the context (one GPU: no NCCL), as dsplan report compares it
    assert gc.error_pct(line) == pytest.approx(100 * (9.5 - 11) / 11)
    from dsplan.learn import samples

    assert gc.FORMAT is samples.FORMAT
    no_transient = gc.estimate_record(SimpleNamespace(gpu_bytes=1, host_bytes=2, gpu={}))
    assert no_transient["transient_bytes"] is None


def test_verdicts_are_the_ledgers(gc):
    for v in ("success", "gpu_oom", "host_oom", "not_oom", "unknown", "stalled"):
        assert gc.sample_verdict(v) == v
    assert gc.sample_verdict("exploded") == "unknown"


def test_lines_are_appended_whole_and_read_back_by_calibrate(gc, tmp_path):
    from dsplan.learn.samples import read_samples

    ctx = _line_ctx(gc, tmp_path)
    cases = gc.select("qwen2.5-7b-lora-zero2-gc-c1024-mb1,qwen2.5-7b-full-zero3-gc-c1024-mb1", False)
    ok = SimpleNamespace(exit_code=0, finding=SimpleNamespace(evidence=""))
    oom = SimpleNamespace(exit_code=1, finding=SimpleNamespace(evidence="CUDA out of memory"))
    figures = {"tried": 2 * GiB, "allocated": 120 * GiB, "reserved": 130 * GiB, "total": 140 * GiB, "free": GiB}
    gc.append_line(ctx.out, gc.sample_line(ctx, cases[0], _estimate(), {"vram_allocated_bytes": 8 * GiB,
                   "vram_reserved_bytes": 9 * GiB, "host_peak_bytes": None}, None, "success", ok, 50.0, None))
    gc.append_line(ctx.out, gc.sample_line(ctx, cases[1], _estimate(139 * GiB), dict.fromkeys(
        ("vram_allocated_bytes", "vram_reserved_bytes", "host_peak_bytes")), figures, "gpu_oom", oom, 80.0, None))
    text = ctx.out.read_text()
    assert text.count("\n") == 2 and all(json.loads(x)["format"] == "dsplan-sample/1" for x in text.splitlines())
    found = read_samples([ctx.out])
    assert [(s.key, s.stage, s.measured_bytes, s.lower_bound) for s in found.samples] == [
        ("cuda/H200", 2, 9 * GiB, None), ("cuda/H200", 3, None, 132 * GiB)]


def test_the_table_gives_median_and_worst_error(gc):
    def row(name, est, reserved, status="success"):  # est: what a reserved peak is compared with
        line = {"verdict": status, "oom_figures": None, "hardware": {"backend": "cuda", "world_size": 1},
                "estimate": {"gpu_bytes": est + GiB // 2, "context_bytes": GiB // 2, "nccl_bytes": GiB // 2},
                "measured": {"vram_reserved_bytes": reserved, "vram_allocated_bytes": reserved,
                             "host_peak_bytes": None}}
        return {"case": SimpleNamespace(name=name), "line": line, "record": line, "status": status, "wall_s": 1.0}

    text = "\n".join(gc.table([row("a", 11 * GiB, 10 * GiB), row("b", 8 * GiB, 10 * GiB),
                               row("c", 10 * GiB, 10 * GiB)], dry=False))
    assert "median +0.0 %" in text and "worst -20.0 %" in text and "+10.0" in text
    assert "est-ctx" in text.splitlines()[0] and "11.50" in text and "11.00" in text
    dry = "\n".join(gc.table([row("a", GiB, None)], dry=True))
    assert "no GPU figure" in dry and "median" not in dry


# ------------------------------------------------------------------------ the training processes' hook
def test_the_hook_writes_a_workers_peaks_and_runs_the_sitecustomize_it_shadows(gc, tmp_path):
    hook_dir = gc.write_hook(tmp_path / "work")
    other = tmp_path / "other"
    other.mkdir()
    (other / "sitecustomize.py").write_text(f"open({str(tmp_path / 'chained')!r}, 'w').write('yes')\n")
    peaks = tmp_path / "peaks"
    peaks.mkdir()
    env = dict(os.environ, PYTHONPATH=f"{hook_dir}{os.pathsep}{other}", LOCAL_RANK="0", RANK="0",
               DSPLAN_GPU_CHECK_PEAKS=str(peaks))
    subprocess.run([sys.executable, "-c", "x = bytearray(50 * 2**20)"], env=env, check=True, timeout=60)
    rec = gc.read_peaks(peaks)
    assert rec["rank"] == 0 and rec["ru_maxrss_bytes"] > 50 * 2**20
    assert "max_reserved_bytes" not in rec  # no torch, no CUDA: no GPU figure at all
    assert (tmp_path / "chained").read_text() == "yes"
    for f in peaks.iterdir():
        f.unlink()
    no_rank = {k: v for k, v in env.items() if k != "LOCAL_RANK"}
    subprocess.run([sys.executable, "-c", "pass"], env=no_rank, check=True, timeout=60)
    assert gc.read_peaks(peaks) is None  # llamafactory-cli and torchrun themselves write nothing


# ------------------------------------------------------------------------ a real --dry case
@pytest.mark.real
def test_dry_run_trains_one_case_and_appends_its_sample_line(tmp_path, train_python):
    out = tmp_path / "samples.jsonl"
    case = "qwen2.5-0.5b-lora-zero2-gc-c512-mb1"
    r = subprocess.run([train_python, str(SCRIPT), "--dry", "--cases", case, "--out", str(out),
                        "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=900, check=False,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=REPO)
    log = tmp_path / "work" / "runs" / case / "train.log"
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:] + (log.read_text()[-3000:] if log.is_file() else "")
    lines = out.read_text().splitlines()
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert list(line) == TOP_KEYS and line["format"] == "dsplan-sample/1" and line["source"] == "gpu_check"
    assert line["verdict"] == "success" and (line["tier"], line["micro_batch"], line["cutoff_len"]) == ("zero2", 1, 512)
    assert set(line["hardware"]) == HARDWARE_KEYS and line["hardware"]["gpu_name"] is None
    est = line["estimate"]
    assert est["gpu_bytes"] > 0 and est["host_bytes"] > 0 and est["breakdown"]["overhead"] > 0
    assert est["gpu_bytes"] == sum(est["breakdown"].values())
    assert est["transient_bytes"] is None or est["transient_bytes"] > 0
    m = line["measured"]
    assert m["vram_allocated_bytes"] is None and m["vram_reserved_bytes"] is None
    assert m["host_peak_bytes"] > 2**30 and line["oom_figures"] is None
    c = line["case"]
    assert c["dry"] is True and c["dry_shape"]["num_hidden_layers"] == 2 and c["precision"] == "fp32"
    assert c["model"] == "Qwen2.5-0.5B" and c["method"] == "lora" and c["gc"] is True and c["wall_s"] > 0
    assert set(c["versions"]) == VERSION_KEYS and all(c["versions"].values())
    assert c["process"]["ru_maxrss_bytes"] > 2**28 and "max_reserved_bytes" not in c["process"]
    steps = [json.loads(x) for x in (log.parent / "output" / "trainer_log.jsonl").read_text().splitlines()]
    assert [s["current_steps"] for s in steps if "loss" in s] == [1, 2, 3]
    assert case in r.stdout and "no GPU figure" in r.stdout


# ------------------------------------------------------------------------ the GPU path, with a stand-in trainer
FAKE_CLI = r'''#!{python}
"""Stands in for llamafactory-cli on a GPU: logs LF's vram figures, or dies of a CUDA OOM."""
import os, sys, json, yaml
os.environ["LOCAL_RANK"] = "0"  # so the exit hook records this process as the training worker
cfg = yaml.safe_load(open(sys.argv[2]))
out = cfg["output_dir"]
os.makedirs(out, exist_ok=True)
if cfg["finetuning_type"] == "full":
    print("Traceback (most recent call last):", file=sys.stderr)
    print('  File "train.py", line 1, in <module>', file=sys.stderr)
    print("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
          "139.80 GiB of which 1.50 GiB is free. Including non-PyTorch memory, this process has 138.29 GiB memory "
          "in use. Of the allocated memory 130.00 GiB is allocated by PyTorch, and 5.00 GiB is reserved by PyTorch "
          "but unallocated.", file=sys.stderr)
    sys.exit(1)
with open(os.path.join(out, "trainer_log.jsonl"), "w") as f:
    for step, (a, r) in enumerate([(9.5, 10.25), (10.0, 12.5), (9.75, 12.5)], 1):
        f.write(json.dumps({{"current_steps": step, "total_steps": 3, "loss": 9.0, "vram_allocated": a,
                            "vram_reserved": r}}) + "\n")
print("***** train metrics *****")
'''


def test_the_gpu_path_records_lfs_vram_and_a_cuda_ooms_figures(gc, tmp_path):
    """Everything of a GPU case but the GPU: planned for an H200 in bf16, the measured peaks read from
    LF's trainer log, an OOM's figures parsed from its message.  The model folder holds only the real
    config.json (the stand-in trainer loads nothing)."""
    from dsplan.inputs.hardware import HardwareProfile

    cli = tmp_path / "bin" / "llamafactory-cli"
    cli.parent.mkdir()
    cli.write_text(FAKE_CLI.format(python=sys.executable))
    cli.chmod(0o755)
    work = tmp_path / "work"
    model_dir = work / "models" / "qwen2.5-7b"
    model_dir.mkdir(parents=True)
    cfg = {**gc.model_config("qwen2.5-7b", False), "architectures": ["Qwen2ForCausalLM"]}
    (model_dir / "config.json").write_text(json.dumps(cfg))
    (model_dir / gc.STAMP).write_text(json.dumps(gc.build_params("qwen2.5-7b", False)))
    profile = HardwareProfile(nodes=1, gpus_per_node=1, gpu_mem=143771 * 2**20, backend="cuda",
                              host_ram=128 * GiB, gpu_name="H200")
    ctx = gc.Context(workdir=work, out=tmp_path / "s.jsonl", dry=False, profile=profile,
                     hardware=gc.hardware_block(profile, "H200"), precision="bf16",
                     versions=dict.fromkeys(VERSION_KEYS, "1"), lf_cli=str(cli), max_steps=3, stall_timeout=60,
                     record_imports=False, keep_output=False, deadline=time.monotonic() + 300)
    cases = gc.select("qwen2.5-7b-lora-zero3-nogc-c1024-mb1,qwen2.5-7b-full-zero3-gc-c1024-mb1", False)
    ok, oom = (gc.run_case(ctx, c) for c in cases)
    assert ok["status"] == "success" and oom["status"] == "gpu_oom"
    lines = [json.loads(x) for x in ctx.out.read_text().splitlines()]
    assert [x["verdict"] for x in lines] == ["success", "gpu_oom"]
    good, bad = lines
    assert good["measured"]["vram_reserved_bytes"] == int(12.5 * GiB)
    assert good["measured"]["vram_allocated_bytes"] == int(10.0 * GiB)
    assert good["measured"]["host_peak_bytes"] > 0 and good["oom_figures"] is None
    assert good["case"]["process"]["rank"] == 0 and good["case"]["precision"] == "bf16"
    assert "dry_shape" not in good["case"] and good["case"]["dry"] is False
    yml = (work / "runs" / cases[0].name / "lf_zero3.yaml").read_text()
    assert "bf16: true" in yml and "disable_gradient_checkpointing: true" in yml and "cutoff_len: 1024" in yml
    assert good["estimate"]["gpu_bytes"] > 15 * GiB  # 7B's 16-bit weights alone are 15.2 GB
    assert good["estimate"]["context_bytes"] == int(0.75 * GiB) and good["estimate"]["planned_at"] == "cutoff_len"
    assert good["estimate"]["tokens"] == 1024 and good["estimate"]["host_breakdown"]
    assert bad["measured"]["vram_reserved_bytes"] is None
    assert bad["oom_figures"]["tried"] == 2 * GiB and bad["oom_figures"]["reserved"] == 135 * GiB
    assert bad["case"]["exit_code"] != 0 and "CUDA out of memory" in bad["case"]["evidence"]
    text = "\n".join(gc.table([ok, oom], dry=False))
    assert "median" in text and "135.00" in text  # the OOM row shows what its message stated
