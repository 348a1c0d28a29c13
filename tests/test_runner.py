"""`dsplan run` end to end with a FAKE llamafactory-cli (tests/fakes/children/fake_lf_cli.py)
that prints real-format log lines: the ladder walk, the ledger, folders, environment."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dsplan.launch.attempt import running
from dsplan.launch.ledger import read_attempts
from tests.conftest import REPO, run_dsplan

FAKE = REPO / "tests" / "fakes" / "children" / "fake_lf_cli.py"
BIG = ["--gpus", "8x80G", "--gpu-name", "A100", "--host-ram", "2048G", "--model", "Llama-3-8B", "--method", "full",
       "--cutoff-len", "1024"]


@pytest.fixture
def fake_cli(tmp_path):
    wrapper = tmp_path / "bin" / "llamafactory-cli"
    wrapper.parent.mkdir()
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def dsplan_run(tmp_path, fake_cli, *args, env=None, run_dir="run", cwd=None):
    record = tmp_path / "record.jsonl"
    e = {"FAKE_LF_RECORD": str(record), **(env or {})}
    r = run_dsplan("run", *args, "--lf-cli", str(fake_cli), "--run-dir", str(tmp_path / run_dir), env=e,
                   timeout=120, cwd=cwd)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return r, calls, read_attempts(tmp_path / run_dir) if (tmp_path / run_dir).exists() else []


def test_gpu_oom_walks_down_the_ladder(tmp_path, fake_cli):
    plan = json.loads(run_dsplan("plan", *BIG, "--json").stdout)
    ladder = plan["ladder"]
    assert len(ladder) >= 2
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, env={"FAKE_GPU_OOM_TIERS": ",".join(ladder[:-1])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c["tier"] for c in calls] == ladder
    assert [a["verdict"] for a in ledger] == ["gpu_oom"] * (len(ladder) - 1) + ["success"]
    assert all("out of memory" in a["evidence"] for a in ledger[:-1])
    for i, a in enumerate(ledger, 1):
        assert a["attempt"] == i and a["tier"] == ladder[i - 1]
        for key in ("micro_batch", "grad_accum", "cutoff_len", "started", "ended", "exit_code", "output_dir"):
            assert key in a
        d = tmp_path / "run" / f"attempt-{i:03d}"
        assert Path(a["output_dir"]) == d / "output"
        assert (d / f"lf_{a['tier']}.yaml").is_file() and (d / f"ds_{a['tier']}.json").is_file()
        assert (d / "train.log").is_file() and (d / "dsplan.json").is_file()
    assert (tmp_path / "run" / f"attempt-{len(ladder):03d}" / "output" / "trainer_log.jsonl").is_file()
    # each attempt's own output_dir, argv passed as a list, environment as LLaMA-Factory wants it
    assert len({c["output_dir"] for c in calls}) == len(calls)
    for c in calls:
        assert c["argv"][1] == "train" and c["argv"][2].endswith(f"lf_{c['tier']}.yaml")
        assert c["env"]["FORCE_TORCHRUN"] == "1" and c["env"]["NPROC_PER_NODE"] == "8"
        assert c["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and "HIP_VISIBLE_DEVICES" not in c["env"]


def test_micro_batch_halves_after_the_last_tier(tmp_path, fake_cli):
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, "--tier", "minimal", "--micro-batch", "8",
                                  "--grad-accum", "2", env={"FAKE_MAX_MICRO_BATCH": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(c["tier"], c["micro_batch"], c["grad_accum"]) for c in calls] == [
        ("zero3_offload", 8, 2), ("zero3_offload", 4, 4), ("zero3_offload", 2, 8)]
    assert [a["verdict"] for a in ledger] == ["gpu_oom", "gpu_oom", "success"]


def test_host_oom_never_moves_to_more_host_ram(tmp_path, fake_cli):
    plan = json.loads(run_dsplan("plan", *BIG, "--tier", "zero2", "--json").stdout)
    host = {t["tier"]: t["host_bytes"] for t in plan["tiers"]}
    assert host["zero2_offload"] > host["zero2"] >= host["zero3"]  # the offload tier needs more host RAM
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, "--tier", "zero2",
                                  env={"FAKE_HOST_OOM_TIERS": "zero2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [a["verdict"] for a in ledger] == ["host_oom", "success"]
    # skips zero2_offload (faster, less GPU memory, but more host RAM) for zero3
    assert [c["tier"] for c in calls] == ["zero2", "zero3"]


def test_rocm_sets_only_the_hip_mask(tmp_path, fake_cli):
    r, calls, _ = dsplan_run(tmp_path, fake_cli, "--gpus", "8x64G", "--backend", "rocm", "--gpu-name", "K100",
                             "--model", "Qwen2.5-7B", env={"CUDA_VISIBLE_DEVICES": "3"})
    assert r.returncode == 0, r.stderr[-2000:]
    env = calls[0]["env"]
    assert env["HIP_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7" and "CUDA_VISIBLE_DEVICES" not in env
    assert "unset CUDA_VISIBLE_DEVICES" in r.stderr


def test_not_oom_stops_without_fallback(tmp_path, fake_cli):
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, env={"FAKE_NOT_OOM": "1"})
    assert r.returncode == 1 and len(calls) == 1
    assert ledger[0]["verdict"] == "not_oom" and "Undefined dataset" in ledger[0]["evidence"]


def test_no_fallback_and_exhausted_exit_codes(tmp_path, fake_cli):
    r, calls, _ = dsplan_run(tmp_path, fake_cli, *BIG, "--no-fallback", env={"FAKE_GPU_OOM_TIERS": "zero2,zero3"})
    assert r.returncode == 3 and len(calls) == 1
    every = "zero2,zero2_offload,zero3,zero3_offload"
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, "--micro-batch", "1", env={"FAKE_GPU_OOM_TIERS": every},
                                  run_dir="run2")
    assert r.returncode == 3 and all(a["verdict"] == "gpu_oom" for a in ledger)
    assert "nothing left to fall back" in r.stderr


def test_rerun_resumes_same_tier_from_checkpoint_and_never_overwrites(tmp_path, fake_cli):
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, "--tier", "zero3", env={"FAKE_NOT_OOM": "1"})
    assert r.returncode == 1
    first_out = Path(ledger[0]["output_dir"])
    (first_out / "checkpoint-7").mkdir(parents=True)  # as if it had saved before failing
    (first_out / "checkpoint-7" / "trainer_state.json").write_text('{"global_step": 7, "max_steps": 20}')
    (first_out / "checkpoint-9").mkdir()  # cut short while saving: no trainer_state.json, never resumed from
    before = (tmp_path / "run" / "attempt-001" / "lf_zero3.yaml").read_text()
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, "--tier", "zero3")
    assert r.returncode == 0
    assert calls[-1]["resume_from_checkpoint"] == str(first_out / "checkpoint-7")
    assert (tmp_path / "run" / "attempt-001" / "lf_zero3.yaml").read_text() == before
    assert [a["attempt"] for a in ledger] == [1, 2]
    # a different tier starts fresh
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, "--tier", "zero3_offload", run_dir="run3")
    assert calls[-1]["resume_from_checkpoint"] is None


def test_rerun_continues_from_the_ledger_and_never_repeats_an_oom(tmp_path, fake_cli):
    ladder = json.loads(run_dsplan("plan", *BIG, "--json").stdout)["ladder"]
    oom = {"FAKE_GPU_OOM_TIERS": ladder[0]}
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, "--max-attempts", "1", env=oom)
    assert r.returncode == 3 and [c["tier"] for c in calls] == [ladder[0]]
    # the rerun starts where the ledger left off: the OOM configuration is not run again
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, env=oom)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c["tier"] for c in calls] == [ladder[0], ladder[1]]  # the record file spans both runs
    assert "continuing from the ledger" in r.stderr and f"not repeating tier {ladder[0]}" in r.stderr
    assert [(a["attempt"], a["tier"], a["verdict"]) for a in ledger] == [(1, ladder[0], "gpu_oom"),
                                                                          (2, ladder[1], "success")]
    # a third run has nothing to do
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, env=oom)
    assert r.returncode == 0 and len(calls) == 2 and "already holds a finished run" in r.stderr


def test_rerun_after_micro_batch_oom_keeps_the_smaller_micro_batch(tmp_path, fake_cli):
    args = [*BIG, "--micro-batch", "4", "--tier", "zero3_offload"]
    r, calls, _ = dsplan_run(tmp_path, fake_cli, *args, "--max-attempts", "1", env={"FAKE_MAX_MICRO_BATCH": "2"})
    assert r.returncode == 3 and [c["micro_batch"] for c in calls] == [4]
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, "--micro-batch", "4",
                                  env={"FAKE_MAX_MICRO_BATCH": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c["micro_batch"] for c in calls] == [4, 2]
    assert ledger[-1]["tier"] == "zero3_offload" and ledger[-1]["micro_batch"] == 2
    assert ledger[-1]["grad_accum"] == 2 * ledger[0]["grad_accum"]


def test_each_attempt_records_estimate_measured_and_oom_figures(tmp_path, fake_cli):
    ladder = json.loads(run_dsplan("plan", *BIG, "--json").stdout)["ladder"]
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG,
                                  env={"FAKE_GPU_OOM_TIERS": ladder[0], "FAKE_VRAM_GIB": "30"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(c["env"].get("RECORD_VRAM") != "0" for c in calls)
    oom, ok = ledger[0], ledger[-1]
    for rec in (oom, ok):
        est = rec["estimate"]
        assert est["gpu_bytes"] == sum(est["breakdown"].values()) > 0
        assert est["host_bytes"] == sum(est["host_breakdown"].values()) > 0
        assert rec["measured"]["host_peak_bytes"] > 0  # the fake child's own resident memory
    assert oom["measured"]["vram_allocated_bytes"] is None  # it died before logging a step
    assert oom["oom_figures"]["tried"] == int(2.32 * 1024**3) and oom["oom_figures"]["total"] == int(63.98 * 1024**3)
    assert oom["oom_figures"]["allocated"] is None  # the message does not say: null, never 0
    assert ok["oom_figures"] is None
    assert ok["measured"]["vram_allocated_bytes"] == 30 * 1024**3
    assert ok["measured"]["vram_reserved_bytes"] == int(33.0 * 1024**3)
    plan = json.loads(run_dsplan("plan", *BIG, "--json").stdout)
    by_tier = {t["tier"]: t for t in plan["tiers"]}
    assert oom["estimate"]["gpu_bytes"] == by_tier[ladder[0]]["gpu_bytes"]


def test_a_users_record_vram_0_is_kept(tmp_path, fake_cli):
    r, calls, ledger = dsplan_run(tmp_path, fake_cli, *BIG, env={"RECORD_VRAM": "0", "FAKE_VRAM_GIB": "30"})
    assert r.returncode == 0 and calls[0]["env"].get("RECORD_VRAM", "0") == "0"
    assert ledger[-1]["measured"]["vram_allocated_bytes"] is None


@pytest.mark.parametrize("env, noted", [
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, True),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "OPTIM_TORCH": "0"}, False),
    ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128", "OPTIM_TORCH": "Y"}, True),
    ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, False),
    ({}, False),
])
def test_a_users_allocator_setting_that_lfs_launcher_replaces_is_said(tmp_path, env, noted):
    r = run_dsplan("run", *BIG, "--dry-run", "--run-dir", str(tmp_path / "run"), env=env)
    assert r.returncode == 0, r.stderr
    line = "LLaMA-Factory's launcher replaces PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128 with expandable_segments:True"
    assert (line in r.stdout + r.stderr) == noted


@pytest.mark.parametrize("flags, needle", [
    (["--nnodes", "2", "--node-rank", "5", "--master-addr", "h0"], "--node-rank 5 is not a node of a 2-node job"),
    (["--nnodes", "3"], "--nnodes 3 but the plan is for 2 node(s) (2x8x80G): pass --gpus 3x8x80G"),
    (["--node-rank", "1"], "--node-rank 1 needs --master-addr"),
])
def test_per_node_flags_that_disagree_with_the_plan_are_one_line(tmp_path, flags, needle):
    r = run_dsplan("run", "--gpus", "2x8x80G", "--model", "Qwen1.5-7B", *flags, "--dry-run", "--run-dir",
                   str(tmp_path / "run"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("dsplan: error: ") and needle in lines[0]
    assert r.stdout == "" and not (tmp_path / "run").exists()
    ok = run_dsplan("run", "--gpus", "2x8x80G", "--model", "Qwen1.5-7B", "--nnodes", "2", "--node-rank", "1",
                    "--master-addr", "h0", "--dry-run", "--run-dir", str(tmp_path / "run"))
    assert ok.returncode == 0 and "NODE_RANK=1" in ok.stdout and "MASTER_ADDR=h0" in ok.stdout


def test_dry_run_with_tier_alias(tmp_path):
    r = run_dsplan("run", *BIG, "--tier", "minimal", "--dry-run", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0, r.stderr
    assert "attempt 1: tier zero3_offload" in r.stdout and "ladder: zero3_offload" in r.stdout


def test_dry_run_writes_nothing(tmp_path):
    r = run_dsplan("run", *BIG, "--dry-run", "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 0
    assert "FORCE_TORCHRUN=1" in r.stdout and "CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in r.stdout
    assert "llamafactory-cli train" in r.stdout and "ladder:" in r.stdout
    assert not (tmp_path / "run").exists()


def test_missing_lf_cli_is_a_user_error(tmp_path):
    r = run_dsplan("run", *BIG, "--lf-cli", str(tmp_path / "nope"), "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_sigint_to_dsplan_leaves_no_process(tmp_path):
    fake = REPO / "tests" / "fakes" / "children" / "fake_ranks.py"
    wrapper = tmp_path / "lf"
    pidfile = tmp_path / "pids"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {fake} --ranks 4 --oom-rank -1 --pid-file {pidfile}\n")
    wrapper.chmod(0o755)
    proc = subprocess.Popen([sys.executable, "-m", "dsplan", "run", *BIG, "--lf-cli", str(wrapper), "--run-dir",
                             str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=REPO)
    deadline = time.time() + 60
    while time.time() < deadline and (not pidfile.exists() or len(pidfile.read_text().split()) < 5):
        time.sleep(0.2)
    pids = [int(p) for p in pidfile.read_text().split()]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    time.sleep(0.5)
    assert not running(pids)
    assert read_attempts(tmp_path / "run")[-1]["verdict"] == "interrupted"


# --------------------------------------------------------------------------- where an attempt starts from

RESUME_FAKE = REPO / "tests" / "fakes" / "children" / "fake_lf_resume.py"
LORA = ["--gpus", "8x80G", "--gpu-name", "A100", "--host-ram", "2048G", "--model", "Llama-3-8B", "--method", "lora",
        "--cutoff-len", "1024"]


@pytest.fixture
def resume_cli(tmp_path):
    wrapper = tmp_path / "bin" / "lf-resume"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {RESUME_FAKE} \"$@\"\n")
    wrapper.chmod(0o755)
    return wrapper


def test_fallback_to_another_tier_continues_from_the_saved_adapter(tmp_path, resume_cli):
    """zero2 saves checkpoint-2 and runs out of memory; zero3 takes the adapter, and the Trainer's step
    count and schedule from the checkpoint, with a fresh optimizer (the rank hook skips DeepSpeed's part)."""
    from dsplan.launch.resume import HOOK_DIR

    r, calls, ledger = dsplan_run(tmp_path, resume_cli, *LORA, env={"FAKE_OOM_TIERS": "zero2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c["tier"] for c in calls] == ["zero2", "zero3"]
    ck = str(Path(ledger[0]["output_dir"]) / "checkpoint-2")
    first, second = calls
    assert first["resume_from_checkpoint"] is None and first["env"]["DSPLAN_WEIGHTS_FROM"] is None
    assert second["resume_from_checkpoint"] == ck and second["adapter_name_or_path"] == ck
    assert second["model_name_or_path"] == first["model_name_or_path"]  # LoRA: the base model stays
    assert second["env"]["DSPLAN_WEIGHTS_FROM"] == ck
    assert second["env"]["PYTHONPATH"].split(os.pathsep)[0] == str(HOOK_DIR)
    resumed = ledger[1]["resumed_from"]
    assert (resumed["mode"], resumed["checkpoint"], resumed["from_tier"], resumed["step"]) == \
        ("weights", ck, "zero2", 2)
    assert "optimizer's moments" in resumed["lost"] and "resumed_from" not in ledger[0]
    steps = [json.loads(x)["current_steps"]
             for x in (Path(ledger[1]["output_dir"]) / "trainer_log.jsonl").read_text().splitlines()]
    assert steps[0] == 3  # after the checkpoint's step, not from 0
    assert "continuing from the adapter of" in r.stderr and "optimizer's moments" in r.stderr


def test_full_fine_tune_continues_from_the_checkpoint_weights(tmp_path, resume_cli):
    r, calls, ledger = dsplan_run(tmp_path, resume_cli, *BIG, env={"FAKE_OOM_TIERS": "zero2,zero2_offload"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [c["tier"] for c in calls] == ["zero2", "zero2_offload", "zero3"]
    # each new tier takes the newest checkpoint: attempt 2 continued attempt 1's and saved its own
    ck1 = str(Path(ledger[0]["output_dir"]) / "checkpoint-2")
    ck2 = str(Path(ledger[1]["output_dir"]) / "checkpoint-4")
    assert [c["model_name_or_path"] for c in calls[1:]] == [ck1, ck2]
    assert [c["resume_from_checkpoint"] for c in calls[1:]] == [ck1, ck2]
    assert all(c["adapter_name_or_path"] is None for c in calls)
    assert [a.get("resumed_from", {}).get("step") for a in ledger] == [None, 2, 4]


def test_same_tier_after_a_smaller_micro_batch_resumes_exactly(tmp_path, resume_cli):
    r, calls, ledger = dsplan_run(tmp_path, resume_cli, *LORA, "--tier", "zero3_offload", "--micro-batch", "4",
                                  env={"FAKE_MAX_MICRO_BATCH": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert [(c["tier"], c["per_device_train_batch_size"]) for c in calls] == [("zero3_offload", 4),
                                                                              ("zero3_offload", 2)]
    ck = str(Path(ledger[0]["output_dir"]) / "checkpoint-2")
    assert calls[1]["resume_from_checkpoint"] == ck and calls[1]["adapter_name_or_path"] is None
    assert calls[1]["env"]["DSPLAN_WEIGHTS_FROM"] is None
    assert ledger[1]["resumed_from"]["mode"] == "exact" and "lost" not in ledger[1]["resumed_from"]


def test_a_checkpoint_without_weights_is_not_continued_across_tiers(tmp_path, resume_cli):
    """A folder with trainer_state.json but no adapter (saved with another method, say) cannot
    carry weights to another tier: that attempt starts from step 0."""
    r, calls, ledger = dsplan_run(tmp_path, resume_cli, *LORA, "--max-attempts", "1",
                                  env={"FAKE_OOM_TIERS": "zero2"})
    assert r.returncode == 3
    ck = Path(ledger[0]["output_dir"]) / "checkpoint-2"
    (ck / "adapter_model.safetensors").unlink()
    r, calls, ledger = dsplan_run(tmp_path, resume_cli, *LORA, env={"FAKE_OOM_TIERS": "zero2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert calls[-1]["tier"] == "zero3" and calls[-1]["resume_from_checkpoint"] is None
    assert "resumed_from" not in ledger[-1]


def test_the_rank_hook_skips_deepspeed_state_for_that_checkpoint_only(tmp_path):
    """The sitecustomize of dsplan.launch.rank_hook, against a stand-in transformers.trainer: the
    named checkpoint's DeepSpeed load is skipped, any other path still loads, and a
    sitecustomize it shadows still runs."""
    from dsplan.launch.resume import HOOK_DIR

    pkg = tmp_path / "site" / "transformers"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "trainer.py").write_text("def deepspeed_load_checkpoint(engine, path, load_module_strict=True):\n"
                                    "    raise ValueError(f'Can\\'t find a valid checkpoint at {path}')\n")
    (tmp_path / "site" / "sitecustomize.py").write_text("import builtins\nbuiltins.SHADOWED_RAN = True\n")
    code = ("import builtins, transformers.trainer as t\n"
            "assert builtins.SHADOWED_RAN\n"
            "assert t.deepspeed_load_checkpoint(None, sys_ck + '/', load_module_strict=False) is None\n"
            "try:\n    t.deepspeed_load_checkpoint(None, '/elsewhere')\n"
            "except ValueError as e:\n    print('other:', e)\n")
    ck = tmp_path / "attempt-001" / "output" / "checkpoint-2"
    env = dict(os.environ, PYTHONPATH=f"{HOOK_DIR}{os.pathsep}{tmp_path / 'site'}", DSPLAN_WEIGHTS_FROM=str(ck),
               RANK="0")
    r = subprocess.run([sys.executable, "-c", f"sys_ck = {str(ck)!r}\n" + code], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "other: Can't find a valid checkpoint at /elsewhere" in r.stdout
    assert f"[dsplan] continuing from {ck}" in r.stderr and "optimizer starts fresh" in r.stderr
    # without the variable nothing is patched
    env.pop("DSPLAN_WEIGHTS_FROM")
    code = "import transformers.trainer as t\nt.deepspeed_load_checkpoint(None, 'x')"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Can't find a valid checkpoint at x" in r.stderr


def test_lf_runs_where_dsplan_run_was_started(tmp_path, fake_cli):
    """LF reads the YAML's relative paths (``dataset_dir: data`` is its default) from its working folder:
    that must be the user's folder, as for `llamafactory-cli train` started there, not the attempt folder."""
    here = tmp_path / "project"
    (here / "data").mkdir(parents=True)
    r, calls, _ = dsplan_run(tmp_path, fake_cli, *BIG, env={"FAKE_GPU_OOM_TIERS": "zero2"}, cwd=here)
    assert r.returncode == 0, r.stderr
    assert len(calls) >= 2 and {c["cwd"] for c in calls} == {str(here)}
