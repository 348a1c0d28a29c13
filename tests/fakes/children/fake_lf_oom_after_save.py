#!/usr/bin/env python3
"""The REAL llamafactory-cli, with a host out-of-memory forced once it has saved a checkpoint.

Called as ``fake_lf_oom_after_save.py train <yaml>``.  At a tier not listed in
``$FAKE_OOM_AFTER_SAVE_TIERS`` it becomes ``$FAKE_REAL_LF_CLI`` (exec).  At a listed
tier it runs the real CLI as its child and watches the YAML's ``output_dir``: once
``trainer_log.jsonl`` shows step ``$FAKE_OOM_AT_STEP`` (so the checkpoint saved at an
earlier step is complete: the Trainer saves before it starts the next step), it
stops every process of the training (SIGSTOP: no further step, no further
checkpoint), prints the traceback a rank prints when torch's CPU allocator fails,
and waits to be killed.  Deterministic: the training is real up to that step, and
nothing of it moves after.
"""

import json
import os
import subprocess
import sys
import time

import psutil
import yaml


def tier_of(cfg: dict) -> str:
    return os.path.basename(cfg["deepspeed"])[3:-5]


def last_step(output_dir: str) -> int:
    try:
        with open(os.path.join(output_dir, "trainer_log.jsonl")) as f:
            return max((json.loads(line).get("current_steps", 0) for line in f if line.strip()), default=0)
    except (OSError, ValueError):
        return 0


def freeze(pid: int) -> None:
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    for p in procs:
        try:
            p.suspend()
        except psutil.NoSuchProcess:
            pass


def main() -> int:
    real = os.environ["FAKE_REAL_LF_CLI"]
    with open(sys.argv[2]) as f:
        cfg = yaml.safe_load(f)
    if tier_of(cfg) not in os.environ.get("FAKE_OOM_AFTER_SAVE_TIERS", "").split(","):
        os.execv(real, [real, *sys.argv[1:]])
    child = subprocess.Popen([real, *sys.argv[1:]])
    at = int(os.environ.get("FAKE_OOM_AT_STEP", "3"))
    while last_step(cfg["output_dir"]) < at:
        if child.poll() is not None:
            return child.returncode
        time.sleep(0.05)
    freeze(child.pid)
    for line in ("Traceback (most recent call last):",
                 '  File "/usr/lib/python3/site-packages/llamafactory/launcher.py", line 23, in <module>',
                 "    run_exp()",
                 "RuntimeError: [enforce fail at alloc_cpu.cpp:124] err == 0. DefaultCPUAllocator: can't allocate "
                 "memory: you tried to allocate 536870912 bytes. Error code 12 (Cannot allocate memory)"):
        print(f"[rank0]: {line}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
