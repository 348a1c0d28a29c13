#!/usr/bin/env python3
"""FAKE llamafactory-cli for the reliability tests: floods its output, then runs out of memory or succeeds.

    fake_flood.py [--flood BYTES] [--flood-tiers T1,T2] [--stream stdout|stderr] [--oom-tiers T1,T2]
                  [--ranks N] [--pid-file F] [--oom-stamp F] [--sigint-controller] train <yaml>

Called like the real CLI (``train <yaml>``); the tier is read from the YAML's
DeepSpeed file name.  It records its pid (and its ranks') in --pid-file, starts
--ranks helpers in sessions of their own that hang as ranks in a collective
would, then writes --flood bytes of log-like lines to --stream (only for the
tiers in --flood-tiers, if given).  If the tier is
in --oom-tiers it prints a real-format CUDA out-of-memory traceback (stamping
time.time() into --oom-stamp just before) and hangs until killed; otherwise it
tries to write LLaMA-Factory's trainer_log.jsonl (a full disk is fine), prints
the train metrics banner and exits 0.

--sigint-controller: when SIGTERM comes (dsplan ending the attempt after the OOM
line), first send SIGINT to dsplan (the parent of the guardian that is this
process's parent), so that dsplan's stop request arrives *between* attempts.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time


def record_pid(path, pid=None):
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{pid or os.getpid()}\n".encode())
        os.close(fd)


def tier_of(yaml_path):
    text = open(yaml_path, encoding="utf-8").read()
    m = re.search(r"ds_(\w+)\.json", text)
    return m.group(1) if m else ""


def output_dir_of(yaml_path):
    m = re.search(r"^output_dir:\s*(.+)$", open(yaml_path, encoding="utf-8").read(), re.M)
    return m.group(1).strip().strip("'\"") if m else None


def parent_of(pid):
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rfind(b")") + 2:].split()[1])


def flood(stream, nbytes):
    line = ("[INFO|2025-01-01 00:00:00] llamafactory.data.loader:143 >> tokenizing example %08d "
            + "x" * 60 + "\n")
    out = stream.buffer
    sent, i = 0, 0
    try:
        while sent < nbytes:
            chunk = "".join(line % (i + k) for k in range(100)).encode()
            out.write(chunk)
            sent += len(chunk)
            i += 100
        out.flush()
    except BrokenPipeError:
        pass


def hang():
    while True:
        time.sleep(3600)


def oom(a, tier):
    print("[rank0]: Traceback (most recent call last):", file=sys.stderr)
    print('[rank0]:   File "/opt/venv/lib/python3.11/site-packages/llamafactory/train/sft/workflow.py", line 96, '
          "in run_sft", file=sys.stderr)
    sys.stderr.flush()
    if a.oom_stamp:
        with open(a.oom_stamp, "w") as f:
            f.write(repr(time.time()))
    print(f"[rank0]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU 0 has a total "
          f"capacity of 79.15 GiB of which 1.02 GiB is free. (tier {tier})", file=sys.stderr, flush=True)
    hang()


def succeed(yaml_path):
    out = output_dir_of(yaml_path)
    try:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "trainer_log.jsonl"), "a") as f:
            f.write('{"current_steps": 1, "total_steps": 1, "loss": 1.0}\n')
    except OSError as e:  # a full disk: the training "finished" anyway
        print(f"[WARNING] could not write the trainer log: {e}", file=sys.stderr)
    print("***** train metrics *****", flush=True)
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--flood", type=int, default=0)
    p.add_argument("--flood-tiers", help="flood only for these tiers (default: all)")
    p.add_argument("--stream", choices=("stdout", "stderr"), default="stdout")
    p.add_argument("--oom-tiers", default="")
    p.add_argument("--ranks", type=int, default=0)
    p.add_argument("--pid-file")
    p.add_argument("--oom-stamp")
    p.add_argument("--sigint-controller", action="store_true")
    p.add_argument("cmd")
    p.add_argument("yaml")
    a = p.parse_args()
    tier = tier_of(a.yaml)
    record_pid(a.pid_file)
    if a.sigint_controller:
        controller = parent_of(os.getppid())

        def on_term(signum, frame):
            os.kill(controller, signal.SIGINT)
            os._exit(143)
        signal.signal(signal.SIGTERM, on_term)
    for _ in range(a.ranks):
        rank = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(3600)"],
                                start_new_session=True)
        record_pid(a.pid_file, rank.pid)
    if a.flood_tiers is None or tier in a.flood_tiers.split(","):
        flood(sys.stdout if a.stream == "stdout" else sys.stderr, a.flood)
    if tier in a.oom_tiers.split(","):
        oom(a, tier)
    return succeed(a.yaml)


if __name__ == "__main__":
    sys.exit(main())
