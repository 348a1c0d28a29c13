"""``dsplan demo --micro-batch``: the short act of the demo, and what both acts share.

(The main act, the tier walk, is :mod:`dsplan.demo.tiers`.)

Makes a tiny model and dataset locally (no hub), then runs ``dsplan run`` on them
through the real ``llamafactory-cli`` and DeepSpeed on the CPU.  The child gets an
address-space cap (``RLIMIT_AS``) and a micro-batch too big for it, so the first
attempt dies of a real allocation failure; dsplan reads the verdict, falls back,
and the next attempt trains to the end.  Everything stays in the workdir.

GPUs, if any, are hidden from the demo (an address-space cap and a CUDA context do
not mix).  The demo plans for pretend 16 GB cards and trains in fp32: DeepSpeed's
CPU accelerator takes fp32 (and bf16) on every x86-64 CPU, but fp16 only where
oneDNN has fp16 kernels (AVX512-FP16 or AMX), and LLaMA-Factory refuses bf16
without a GPU unless ``use_cpu`` is set, which breaks ZeRO-3 at world size 2.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
from pathlib import Path

import yaml

from dsplan.errors import UserError, excerpt
from dsplan.fsutil import atomic_write

#: Precision of every demo run (see the module docstring for why not fp16 or bf16).
DEMO_PRECISION = "fp32"

#: Address-space cap per process.  Measured in fp32 on a 2-core AMD EPYC box (torch
#: 2.9.1, LF 0.9.5, DeepSpeed 0.19.8), zero2, one process, cutoff 256, the demo
#: model's 8192-entry vocabulary; VmPeak of the training rank by micro-batch:
#: 1 -> 7.11 GiB, 16 -> 7.44, 32 -> 7.98, 64 -> 9.16; llamafactory-cli itself peaks at
#: 4.96 GiB and torchrun at 4.53.  8.5 GiB sits about halfway between 32 and 64, so
#: 64 dies in torch's allocator and the fall back to 32 trains.  (The 8 GiB this was
#: before left 32 only 0.02 GiB under the cap.)  Reproduce:
#: scripts/probe_tiny_training.py run --tier zero2 --nproc 1 --micro-batch N.
DEMO_CAP_BYTES = int(8.5 * 1024**3)
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


def fresh_dir(workdir: Path, stem: str) -> Path:
    """``workdir/stem``, else the first free ``stem-N``: a demo never writes into an earlier one's folder."""
    for i in range(1, 1000):
        cand = workdir / (stem if i == 1 else f"{stem}-{i}")
        if not cand.exists():
            return cand
    raise UserError(f"{workdir} holds too many earlier demos ({stem}-N); use another --workdir")


def demo_yaml(model_dir: Path, data_dir: Path, dataset: str, micro_batch: int, max_steps: int = 3) -> dict:
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
        "max_steps": max_steps,
        "logging_steps": 1,
        "save_steps": 100000,
        "learning_rate": 1.0e-4,
        "report_to": "none",
        "preprocessing_num_workers": 1,
        "dataloader_num_workers": 0,
    }


def cpu_plan(user: dict, model_dir: Path, nproc: int, card: str = "16G", **plan_kw):
    """The plan for a CPU run of ``user`` with ``nproc`` processes: pretend ``card`` cards
    with no name, trained in :data:`DEMO_PRECISION`; ``plan_kw`` go to ``make_plan``
    (``tier``, ``headroom``: what ``--tier`` and ``--headroom`` set)."""
    from dsplan.inputs.hardware import make_profile
    from dsplan.inputs.model import load_model_spec
    from dsplan.inputs.settings import merge_settings
    from dsplan.plan.planner import make_plan

    profile = make_profile(f"{nproc}x{card}", "cuda")
    spec = load_model_spec(str(model_dir))
    settings = merge_settings(user, model_name_or_path=str(model_dir), default_template="qwen",
                              precision_supported=DEMO_PRECISION, flags={"flash_attn": "sdpa"})
    return make_plan(profile, spec, settings, **plan_kw)


def cpu_env(lf_cli: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The child's environment for a CPU run: offline, no GPU visible, and the folder of
    ``lf_cli`` first on PATH (LLaMA-Factory starts a bare ``torchrun``)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env["PATH"] = str(Path(lf_cli).parent) + os.pathsep + env.get("PATH", "")
    env.pop("HIP_VISIBLE_DEVICES", None)
    env.update(extra or {})
    return env


#: What the demo imports (its asset maker) or runs (its training processes).
TRAIN_MODULES = ("torch", "transformers", "deepspeed", "llamafactory")


def missing_train_modules() -> list[str]:
    """The modules of :data:`TRAIN_MODULES` this Python cannot import (looked up, not imported)."""
    import importlib.util

    missing = []
    for name in TRAIN_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or a module with no spec
            found = False
        if not found:
            missing.append(name)
    return missing


def check_train_modules() -> None:
    """One-line :class:`UserError` when this Python lacks what the demo trains with."""
    missing = missing_train_modules()
    if missing:
        raise UserError(f"dsplan demo trains a real model and needs {', '.join(missing)} in {sys.executable}: "
                        "pip install '.[train]' (or run scripts/setup_env.sh)")


def prepare_workdir(workdir: Path) -> Path:
    """``workdir`` made absolute and created, after checking that this Python has the training
    stack (:func:`check_train_modules`), so nothing is written when it does not; one without
    whitespace (llamafactory-cli's launcher splits its arguments on spaces), and one dsplan can
    write in.  Each problem is a one-line :class:`UserError`."""
    check_train_modules()
    workdir = Path(workdir).resolve()
    if any(ch.isspace() for ch in str(workdir)):
        raise UserError(f"--workdir {workdir} contains whitespace; llamafactory-cli's launcher cannot take it")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".dsplan-probe-", dir=workdir)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write in --workdir {excerpt(str(workdir))}: {e.strerror or e}") from None
    return workdir


def run_demo(workdir: Path, lf_cli: str, nproc: int = 1, cap: int = DEMO_CAP_BYTES,
             micro_batch: int = DEMO_MICRO_BATCH, stall_timeout: float = 900, say=print, max_steps: int = 3,
             env: dict[str, str] | None = None) -> tuple[int, Path]:
    """Run the demo; returns (exit code, run folder).  ``env`` adds to the training
    processes' environment (the tests use it to change what the CPU appears to have)."""
    from dsplan.demo.assets import make_demo_assets
    from dsplan.launch.loop import RunOptions, run

    workdir = prepare_workdir(workdir)
    say(f"dsplan demo: building a tiny Qwen2-shaped model and dataset in {workdir / 'assets'} (no hub)")
    model_dir, data_dir, dataset = make_demo_assets(workdir / "assets")
    user = demo_yaml(model_dir, data_dir, dataset, micro_batch, max_steps)
    atomic_write(workdir / "demo.yaml", yaml.safe_dump(user, sort_keys=False))
    wrapper = _capped_cli(workdir / "bin", lf_cli, cap)

    plan = cpu_plan(user, model_dir, nproc)
    run_dir = fresh_dir(workdir, "run")
    say(f"dsplan demo: each training process is capped at {cap / 1024**3:.1f} GiB of address space; micro-batch "
        f"{micro_batch} x cutoff 256 needs more, so the first attempt should die of a real allocation failure")
    say(f"dsplan demo: plan {plan.choice}, ladder {' -> '.join(plan.ladder)}, then smaller micro-batches; "
        f"{DEMO_PRECISION} on {nproc} CPU process(es)")
    opts = RunOptions(run_dir=run_dir, lf_cli=str(wrapper), stall_timeout=stall_timeout, max_attempts=8,
                      env=cpu_env(lf_cli, env))
    code = run(plan, user, opts, say=say)
    return code, run_dir


def summarize(run_dir: Path) -> list[str]:
    """Lines describing each attempt and the last one's training log."""
    import json

    from dsplan.launch.ledger import read_attempts

    lines = [f"run folder: {run_dir}", f"ledger: {run_dir / 'attempts.jsonl'}"]
    attempts = read_attempts(run_dir)
    for a in attempts:
        where = f" on rank {a['evidence_rank']}" if a.get("evidence_rank") is not None else ""
        lines.append(f"  attempt {a['attempt']}: {a['tier']:<13} micro-batch {a['micro_batch']:>3} x GA "
                     f"{a['grad_accum']:<3} -> {a['verdict']}{where}"
                     + (f"  ({a['evidence'][:110]})" if a['verdict'] != "success" else ""))
    if attempts and attempts[-1]["verdict"] == "success":
        log = Path(attempts[-1]["output_dir"]) / "trainer_log.jsonl"
        if log.is_file():
            for raw in log.read_text().splitlines():
                rec = json.loads(raw)
                if "loss" in rec:
                    lines.append(f"  step {rec['current_steps']}/{rec['total_steps']} loss {rec['loss']:.4f}")
            lines.append(f"  trainer log: {log}")
    return lines
