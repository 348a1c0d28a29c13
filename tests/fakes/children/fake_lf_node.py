#!/usr/bin/env python3
"""FAKE llamafactory-cli for one node of a Slurm step: torchrun-like ranks that print real-format lines.

Run on every node of an srun step (through a wrapper) as ``fake_lf_node.py node train <yaml>``,
with what dsplan's per-node wrapper sets: ``NODE_RANK``, ``NNODES``, ``NPROC_PER_NODE``,
``MASTER_ADDR``, ``MASTER_PORT``.  It starts ``NPROC_PER_NODE`` ranks
(``fake_lf_node.py rank <global rank> <yaml>``); each prints LLaMA-Factory's "Process rank"
line with its global rank, the world size and its node.

At a tier listed in ``$FAKE_OOM_TIERS``, global rank ``$FAKE_OOM_RANK`` prints a HIP
out-of-memory traceback, each line prefixed ``[rankN]:`` as torch prints a rank's
exception, and writes the time it printed the OOM line to ``$FAKE_STATE_DIR/oom-at``.
Then every process of the attempt, on every node, blocks for ever and ignores SIGTERM
and SIGINT (a rank stuck in a collective is no more cooperative): only Slurm's kill of
the step can end them.  At any other tier global rank 0 writes ``trainer_log.jsonl``
and every rank exits 0.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import yaml


def say(text: str, fd: int = 1) -> None:
    """One write per line: ranks share their node's pipe, as torchrun's ranks do."""
    os.write(fd, (text + "\n").encode())


def tier_of(cfg: dict) -> str:
    return os.path.basename(cfg["deepspeed"])[3:-5]


def stubborn() -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def oom_traceback(rank: int) -> list[str]:
    return [f"[rank{rank}]: {line}" for line in (
        "Traceback (most recent call last):",
        '  File "/opt/conda/lib/python3.10/site-packages/llamafactory/launcher.py", line 23, in <module>',
        "    run_exp()",
        '  File "/opt/conda/lib/python3.10/site-packages/torch/nn/modules/linear.py", line 125, in forward',
        "    return F.linear(input, self.weight, self.bias)",
        f"torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB. GPU {rank % 2} has a total capacity "
        "of 63.98 GiB of which 1.10 GiB is free. Of the allocated memory 60.12 GiB is allocated by PyTorch, and "
        "1.31 GiB is reserved by PyTorch but unallocated.",
    )]


def rank_main(rank: int, cfg: dict) -> int:
    world = int(os.environ["NNODES"]) * int(os.environ["NPROC_PER_NODE"])
    say(f"[INFO|2025-06-02 14:04:05] llamafactory.hparams.parser:406 >> Process rank: {rank}, world size: {world}, "
        f"device: cuda:{rank % int(os.environ['NPROC_PER_NODE'])}, node: {socket.gethostname()}")
    if tier_of(cfg) not in os.environ.get("FAKE_OOM_TIERS", "").split(","):
        if rank == 0:
            os.makedirs(cfg["output_dir"], exist_ok=True)
            with open(os.path.join(cfg["output_dir"], "trainer_log.jsonl"), "a") as f:
                for step in (1, 2):
                    f.write(json.dumps({"current_steps": step, "total_steps": 2, "loss": 1.0 / step}) + "\n")
            say("***** train metrics *****")
        return 0
    stubborn()
    if rank == int(os.environ.get("FAKE_OOM_RANK", "-1")):
        time.sleep(0.5)  # the other ranks are up and blocked by now
        for line in oom_traceback(rank):
            say(line, 2)
        with open(os.path.join(os.environ["FAKE_STATE_DIR"], "oom-at"), "w") as f:
            f.write(f"{time.time():.6f} {socket.gethostname()}\n")
    while True:
        time.sleep(3600)


def node_main(yaml_path: str, cfg: dict) -> int:
    if tier_of(cfg) in os.environ.get("FAKE_OOM_TIERS", "").split(","):
        stubborn()
    nproc, node = int(os.environ["NPROC_PER_NODE"]), int(os.environ["NODE_RANK"])
    ranks = [subprocess.Popen([sys.executable, __file__, "rank", str(node * nproc + i), yaml_path])
             for i in range(nproc)]
    return max(p.wait() for p in ranks)


def main() -> int:
    role = sys.argv[1]
    if role == "node":
        assert sys.argv[2] == "train", sys.argv
        with open(sys.argv[3]) as f:
            return node_main(sys.argv[3], yaml.safe_load(f))
    with open(sys.argv[3]) as f:
        return rank_main(int(sys.argv[2]), yaml.safe_load(f))


if __name__ == "__main__":
    sys.exit(main())
