"""``dsplan demo``: the whole promise on any machine, in a few minutes.

Makes a tiny model and dataset locally (no hub), then runs ``dsplan run`` on them
through the real ``llamafactory-cli`` and DeepSpeed on the CPU.  The child gets an
address-space cap (``RLIMIT_AS``) and a micro-batch too big for it, so the first
attempt dies of a real allocation failure; dsplan reads the verdict, falls back,
and the next attempt trains to the end.  Everything stays in the workdir.

GPUs, if any, are hidden from the demo (an address-space cap and a CUDA context do
not mix); the demo plans for a pretend single 16 GB T4, whose fp16 also runs on
the CPU.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import yaml

from dsplan.errors import UserError
from dsplan.fsutil import atomic_write

#: Address-space cap per process.  Measured on a 2-core CPU box (torch 2.9.1, LF
#: 0.9.5): a worker peaks at ~7.1 GiB at micro-batch 1 and ~8.8 GiB at 64 with
#: cutoff 256 and the demo model's 8192-entry vocabulary; llamafactory-cli itself
#: needs ~5 GiB just to import.  8 GiB separates them with margin on both sides.
DEMO_CAP_BYTES = 8 * 1024**3
DEMO_MICRO_BATCH = 64


def _capped_cli(bin_dir: Path, lf_cli: str, cap: int) -> Path:
    """A wrapper that sets RLIMIT_AS, then becomes the real llamafactory-cli (children inherit it)."""
    path = bin_dir / "llamafactory-cli-capped"
    text = (
        f"#!{sys.executable}\n"
        "# dsplan demo: run llamafactory-cli under an address-space cap, so a too-big batch\n"
        "# fails with a real allocation error instead of needing a GPU to run out.\n"
        "import os, resource, sys\n"
        f"resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))\n"
        f"os.execv({lf_cli!r}, [{lf_cli!r}] + sys.argv[1:])\n"
    )
    atomic_write(path, text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _fresh_run_dir(workdir: Path) -> Path:
    for i in range(1, 1000):
        cand = workdir / ("run" if i == 1 else f"run-{i}")
        if not cand.exists():
            return cand
    raise UserError(f"{workdir} holds too many demo runs; use another --workdir")


def demo_yaml(model_dir: Path, data_dir: Path, dataset: str, micro_batch: int) -> dict:
    return {
        "model_name_or_path": str(model_dir),
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_target": "all",
        "dataset": dataset,
        "dataset_dir": str(data_dir),
        "template": "qwen",
        "cutoff_len": 256,
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": 1,
        "max_steps": 3,
        "logging_steps": 1,
        "save_steps": 100000,
        "learning_rate": 1.0e-4,
        "report_to": "none",
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
    }


def run_demo(workdir: Path, lf_cli: str, nproc: int = 1, cap: int = DEMO_CAP_BYTES,
             micro_batch: int = DEMO_MICRO_BATCH, stall_timeout: float = 900, say=print) -> tuple[int, Path]:
    """Run the demo; returns (exit code, run folder)."""
    from dsplan.demo.assets import make_demo_assets
    from dsplan.inputs.hardware import make_profile
    from dsplan.inputs.model import load_model_spec
    from dsplan.plan.planner import make_plan
    from dsplan.launch.loop import RunOptions, run
    from dsplan.inputs.settings import merge_settings

    workdir = workdir.resolve()
    if any(ch.isspace() for ch in str(workdir)):
        raise UserError(f"--workdir {workdir} contains whitespace; llamafactory-cli's launcher cannot take it")
    workdir.mkdir(parents=True, exist_ok=True)
    say(f"dsplan demo: building a tiny Qwen2-shaped model and dataset in {workdir / 'assets'} (no hub)")
    model_dir, data_dir, dataset = make_demo_assets(workdir / "assets")
    user = demo_yaml(model_dir, data_dir, dataset, micro_batch)
    atomic_write(workdir / "demo.yaml", yaml.safe_dump(user, sort_keys=False))
    wrapper = _capped_cli(workdir / "bin", lf_cli, cap)

    profile = make_profile(f"{nproc}x16G", "cuda", None, "T4")
    spec = load_model_spec(str(model_dir))
    settings = merge_settings(user, model_name_or_path=str(model_dir), default_template="qwen",
                              precision_supported=profile.precision, flags={"flash_attn": "sdpa"})
    plan = make_plan(profile, spec, settings)
    run_dir = _fresh_run_dir(workdir)
    say(f"dsplan demo: each training process is capped at {cap / 1024**3:.0f} GiB of address space; micro-batch "
        f"{micro_batch} x cutoff 256 needs more, so the first attempt should die of a real allocation failure")
    say(f"dsplan demo: plan {plan.choice}, ladder {' -> '.join(plan.ladder)}, then smaller micro-batches")
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")  # no GPU needed, none used
    env["PATH"] = str(Path(lf_cli).parent) + os.pathsep + env.get("PATH", "")  # LF's bare `torchrun`
    env.pop("HIP_VISIBLE_DEVICES", None)
    opts = RunOptions(run_dir=run_dir, lf_cli=str(wrapper), stall_timeout=stall_timeout, max_attempts=8, env=env)
    code = run(plan, user, opts, say=say)
    return code, run_dir


def summarize(run_dir: Path) -> list[str]:
    """Lines describing each attempt and the last one's training log."""
    import json

    from dsplan.launch.ledger import read_attempts

    lines = [f"run folder: {run_dir}", f"ledger: {run_dir / 'attempts.jsonl'}"]
    attempts = read_attempts(run_dir)
    for a in attempts:
        lines.append(f"  attempt {a['attempt']}: {a['tier']:<13} micro-batch {a['micro_batch']:>3} x GA "
                     f"{a['grad_accum']:<3} -> {a['verdict']}" + (f"  ({a['evidence'][:110]})" if a['verdict'] != "success" else ""))
    if attempts and attempts[-1]["verdict"] == "success":
        log = Path(attempts[-1]["output_dir"]) / "trainer_log.jsonl"
        if log.is_file():
            for raw in log.read_text().splitlines():
                rec = json.loads(raw)
                if "loss" in rec:
                    lines.append(f"  step {rec['current_steps']}/{rec['total_steps']} loss {rec['loss']:.4f}")
            lines.append(f"  trainer log: {log}")
    return lines
