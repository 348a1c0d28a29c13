"""Validation worker: runs *inside* the Python that has deepspeed and llamafactory.

Started by :mod:`dsplan.emit.validate` as ``python validate_worker.py`` with a JSON list
of jobs on stdin; prints one JSON result per line.  Stand-alone on purpose (no
dsplan imports): it may run under another interpreter than dsplan's own.

Jobs:
- ``{"kind": "deepspeed", "path", "world_size", "micro_batch", "grad_accum", "precision", "hidden_size"}``:
  DeepSpeed's own ``DeepSpeedZeroConfig`` on ``zero_optimization``, then
  ``DeepSpeedConfig`` on the whole file after filling the "auto" values the way
  transformers' ``HfTrainerDeepSpeedConfig`` does, at the profile's world size.
- ``{"kind": "lf", "path"}``: LLaMA-Factory's own ``get_train_args`` on the YAML,
  in a one-rank distributed environment (it refuses a ``deepspeed:`` key without one).
"""

from __future__ import annotations

import json
import os
import sys
import traceback


def _fill_auto(cfg: dict, job: dict) -> dict:
    """Replace "auto" as transformers would for a run with these knobs."""
    world, micro, ga = job["world_size"], job["micro_batch"], job["grad_accum"]
    h = job.get("hidden_size") or 4096
    fills = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": ga,
        "train_batch_size": micro * ga * world,
        "gradient_clipping": 1.0,
    }
    out = json.loads(json.dumps(cfg))
    for k, v in fills.items():
        if out.get(k) == "auto":
            out[k] = v
    for prec in ("fp16", "bf16"):
        if isinstance(out.get(prec), dict) and out[prec].get("enabled") == "auto":
            out[prec]["enabled"] = job.get("precision") == prec
    zero = out.get("zero_optimization", {})
    for k, v in {
        "reduce_bucket_size": h * h,
        "stage3_prefetch_bucket_size": int(0.9 * h * h),
        "stage3_param_persistence_threshold": 10 * h,
    }.items():
        if zero.get(k) == "auto":
            zero[k] = v
    left = [k for k, v in _walk(out) if v == "auto"]
    if left:
        raise ValueError(f"'auto' left that transformers would not fill: {', '.join(left)}")
    return out


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def check_deepspeed(job: dict) -> str:
    from deepspeed import comm as ds_comm
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with open(job["path"], encoding="utf-8") as f:
        cfg = json.load(f)
    DeepSpeedZeroConfig(**cfg.get("zero_optimization", {}))
    world = int(job["world_size"])
    # DeepSpeedConfig asks deepspeed.comm for rank and world size; this process is one
    # rank standing in for `world` of them, so answer as rank 0 of that world.
    saved = ds_comm.get_rank, ds_comm.get_world_size
    ds_comm.get_rank = lambda *a, **k: 0
    ds_comm.get_world_size = lambda *a, **k: world
    try:
        ds = DeepSpeedConfig(_fill_auto(cfg, job))
    finally:
        ds_comm.get_rank, ds_comm.get_world_size = saved
    if ds.world_size != world:
        raise ValueError(f"DeepSpeedConfig saw world size {ds.world_size}, expected {world}")
    return f"stage {ds.zero_optimization_stage}, world {ds.world_size}, train_batch_size {ds.train_batch_size}"


def check_lf(job: dict) -> str:
    import yaml

    with open(job["path"], encoding="utf-8") as f:
        args = yaml.safe_load(f)
    note = ""
    import torch

    if args.get("bf16") and not torch.cuda.is_available() and not args.get("use_cpu"):
        # LF/transformers refuse bf16 without a GPU unless told the run is on the CPU.
        args["use_cpu"] = True
        note = " (bf16 checked with use_cpu: no GPU on this machine)"
    from llamafactory.hparams import get_train_args

    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    return (f"{finetuning_args.finetuning_type}, cutoff {data_args.cutoff_len}, "
            f"micro-batch {training_args.per_device_train_batch_size} x GA {training_args.gradient_accumulation_steps}"
            f"{note}")


def main() -> int:
    jobs = json.load(sys.stdin)
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    for job in jobs:
        try:
            detail = check_deepspeed(job) if job["kind"] == "deepspeed" else check_lf(job)
            result = {"path": job["path"], "kind": job["kind"], "ok": True, "detail": detail}
        except Exception as e:  # every failure is a validation result, reported per file
            tb = traceback.extract_tb(e.__traceback__)
            where = f"{tb[-1].filename}:{tb[-1].lineno}" if tb else ""
            msg = " ".join(str(e).split())[:2000]
            result = {"path": job["path"], "kind": job["kind"], "ok": False,
                      "detail": f"{type(e).__name__}: {msg}", "where": where}
        sys.stdout.write("DSPLAN-RESULT " + json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
