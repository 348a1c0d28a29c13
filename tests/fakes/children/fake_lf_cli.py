#!/usr/bin/env python3
"""FAKE llamafactory-cli for tests: no training, only real-format log lines.

Called as ``fake_lf_cli.py train <yaml>`` like the real CLI.  It records what it was
given (argv, the environment dsplan set, the YAML) into ``$FAKE_LF_RECORD`` (a JSONL
file), then behaves according to the tier named in the YAML's DeepSpeed file:

- tiers listed in ``$FAKE_GPU_OOM_TIERS`` print a CUDA (or, with
  ``$FAKE_BACKEND=rocm``, HIP) out-of-memory traceback as a rank would and exit 1,
  the way llamafactory-cli exits after torchrun fails;
- tiers in ``$FAKE_HOST_OOM_TIERS`` print torch's DefaultCPUAllocator error;
- ``$FAKE_NOT_OOM=1`` prints an unrelated dataset error;
- micro-batches above ``$FAKE_MAX_MICRO_BATCH`` fail with a GPU OOM;
- otherwise it writes LLaMA-Factory's trainer_log.jsonl for a few steps and exits 0.
"""

import json
import os
import sys
import time

import yaml


def main() -> int:
    assert sys.argv[1] == "train", sys.argv
    cfg = yaml.safe_load(open(sys.argv[2]))
    ds = json.load(open(cfg["deepspeed"]))
    tier = os.path.basename(cfg["deepspeed"])[3:-5]
    record = os.environ.get("FAKE_LF_RECORD")
    if record:
        with open(record, "a") as f:
            keep = ("FORCE_TORCHRUN", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                    "CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "PATH", "RECORD_VRAM")
            f.write(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "tier": tier, "stage": ds["zero_optimization"]["stage"],
                                "env": {k: os.environ[k] for k in keep if k in os.environ},
                                "micro_batch": cfg["per_device_train_batch_size"],
                                "grad_accum": cfg["gradient_accumulation_steps"], "output_dir": cfg["output_dir"],
                                "resume_from_checkpoint": cfg.get("resume_from_checkpoint")}) + "\n")
    print("[INFO|2025-01-01 00:00:00] llamafactory.hparams.parser:406 >> Process rank: 0, world size: 8, device: cuda:0")
    sys.stdout.flush()
    gpu_oom = tier in os.environ.get("FAKE_GPU_OOM_TIERS", "").split(",")
    gpu_oom |= cfg["per_device_train_batch_size"] > int(os.environ.get("FAKE_MAX_MICRO_BATCH", "1000000"))
    if gpu_oom:
        dev = "HIP" if os.environ.get("FAKE_BACKEND") == "rocm" else "CUDA"
        print("[rank3]: Traceback (most recent call last):", file=sys.stderr)
        print(f"[rank3]: torch.OutOfMemoryError: {dev} out of memory. Tried to allocate 2.32 GiB. GPU 3 has a total "
              "capacity of 63.98 GiB of which 1.02 GiB is free.", file=sys.stderr)
        print("subprocess.CalledProcessError: Command '['torchrun', '--nnodes', '1']' returned non-zero exit status 1.",
              file=sys.stderr)
        return 1
    if tier in os.environ.get("FAKE_HOST_OOM_TIERS", "").split(","):
        print("[rank0]: RuntimeError: [enforce fail at alloc_cpu.cpp:124] err == 0. DefaultCPUAllocator: can't "
              "allocate memory: you tried to allocate 536870912 bytes. Error code 12 (Cannot allocate memory)",
              file=sys.stderr)
        return 1
    if os.environ.get("FAKE_NOT_OOM") == "1":
        print("[rank0]: ValueError: Undefined dataset mydata in dataset_info.json.", file=sys.stderr)
        return 1
    out = cfg["output_dir"]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "trainer_log.jsonl"), "a") as f:
        for step in (1, 2, 3):
            rec = {"current_steps": step, "total_steps": 3, "loss": 2.0 / step, "lr": 1e-4, "epoch": step / 3,
                   "percentage": round(step / 3 * 100, 2), "elapsed_time": f"0:00:0{step}",
                   "remaining_time": "0:00:01"}
            if os.environ.get("RECORD_VRAM") == "1" and os.environ.get("FAKE_VRAM_GIB"):
                # LLaMA-Factory's LogCallback with RECORD_VRAM=1: the peak so far, in GiB, 2 decimals
                peak = float(os.environ["FAKE_VRAM_GIB"]) * step / 3
                rec.update(vram_allocated=round(peak, 2), vram_reserved=round(peak * 1.1, 2))
            f.write(json.dumps(rec) + "\n")
            f.flush()
            time.sleep(0.05)
    os.makedirs(os.path.join(out, "checkpoint-3"), exist_ok=True)
    print("***** train metrics *****")
    return 0


if __name__ == "__main__":
    sys.exit(main())
