#!/usr/bin/env python3
"""FAKE llamafactory-cli that leaves a checkpoint before it runs out of memory, and records where it started.

Called as ``fake_lf_resume.py train <yaml>``.  It appends to ``$FAKE_LF_RECORD`` (JSON
lines) the tier, the micro-batch, the YAML keys a resume sets (``resume_from_checkpoint``,
``adapter_name_or_path``, ``model_name_or_path``) and the variables of dsplan's rank hook
(``DSPLAN_WEIGHTS_FROM``, ``PYTHONPATH``).  Then:

- at a tier listed in ``$FAKE_OOM_TIERS``, or with a micro-batch above
  ``$FAKE_MAX_MICRO_BATCH``, it writes ``output/checkpoint-<step>`` the way the Hugging
  Face Trainer leaves one (weights, ``scheduler.pt``, and ``trainer_state.json`` last;
  the step is ``$FAKE_SAVE_STEP`` past where it started), then prints a rank's CUDA
  out-of-memory traceback and exits 1;
- otherwise it writes ``trainer_log.jsonl`` from the step after its
  ``resume_from_checkpoint`` (as the Trainer counts) to ``$FAKE_TOTAL_STEPS`` and exits 0.
"""

import json
import os
import sys

import yaml


def start_step(cfg: dict) -> int:
    ck = cfg.get("resume_from_checkpoint")
    if not ck:
        return 0
    with open(os.path.join(ck, "trainer_state.json")) as f:
        return json.load(f)["global_step"]


def save_checkpoint(cfg: dict, step: int, total: int) -> str:
    ck = os.path.join(cfg["output_dir"], f"checkpoint-{step}")
    os.makedirs(ck, exist_ok=True)
    names = (("adapter_model.safetensors", "adapter_config.json") if cfg.get("finetuning_type") == "lora"
             else ("model.safetensors", "config.json"))
    for name in names + ("scheduler.pt", "rng_state.pth"):
        with open(os.path.join(ck, name), "w") as f:
            f.write("fake\n")
    with open(os.path.join(ck, "trainer_state.json"), "w") as f:
        json.dump({"global_step": step, "max_steps": total, "epoch": step / total}, f)
    return ck


def record(cfg: dict, tier: str) -> None:
    path = os.environ.get("FAKE_LF_RECORD")
    if not path:
        return
    keys = ("resume_from_checkpoint", "adapter_name_or_path", "model_name_or_path", "output_dir",
            "per_device_train_batch_size")
    env = {k: os.environ.get(k) for k in ("DSPLAN_WEIGHTS_FROM", "PYTHONPATH")}
    with open(path, "a") as f:
        f.write(json.dumps({"tier": tier, **{k: cfg.get(k) for k in keys}, "env": env}) + "\n")


def main() -> int:
    assert sys.argv[1] == "train", sys.argv
    with open(sys.argv[2]) as f:
        cfg = yaml.safe_load(f)
    tier = os.path.basename(cfg["deepspeed"])[3:-5]
    record(cfg, tier)
    total = int(os.environ.get("FAKE_TOTAL_STEPS", "10"))
    first = start_step(cfg)
    too_big = cfg["per_device_train_batch_size"] > int(os.environ.get("FAKE_MAX_MICRO_BATCH", "1000000"))
    if tier in os.environ.get("FAKE_OOM_TIERS", "").split(",") or too_big:
        save_checkpoint(cfg, first + int(os.environ.get("FAKE_SAVE_STEP", "2")), total)
        print("[rank0]: Traceback (most recent call last):", file=sys.stderr)
        print("[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
              "capacity of 79.25 GiB of which 1.02 GiB is free.", file=sys.stderr, flush=True)
        return 1
    os.makedirs(cfg["output_dir"], exist_ok=True)
    with open(os.path.join(cfg["output_dir"], "trainer_log.jsonl"), "a") as f:
        for step in range(first + 1, total + 1):
            f.write(json.dumps({"current_steps": step, "total_steps": total, "loss": 1.0 / step}) + "\n")
    print("***** train metrics *****", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
