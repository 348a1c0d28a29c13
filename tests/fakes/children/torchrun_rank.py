# FAKE child for tests: the per-rank program run under the REAL torchrun
# (`python -m torch.distributed.run ... torchrun_rank.py`).  It trains nothing and
# does not import torch: it reads the RANK/LOCAL_RANK/WORLD_SIZE that torchrun
# sets, prints real-format LLaMA-Factory lines, and hangs, as ranks waiting in an
# NCCL collective do.  Rank --oom-rank prints a real-format CUDA
# torch.OutOfMemoryError after --oom-after seconds.  With --worker, every rank
# also starts a child process (like a DataLoader worker) in the rank's process group.
#
#   torchrun_rank.py [--oom-rank N] [--oom-after S] [--worker] [--pid-file F] [--oom-stamp F]
import argparse
import os
import subprocess
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--oom-rank", type=int, default=-1)
p.add_argument("--oom-after", type=float, default=2.0)
p.add_argument("--worker", action="store_true")
p.add_argument("--as-worker", action="store_true")
p.add_argument("--pid-file")
p.add_argument("--oom-stamp")
a = p.parse_args()


def record_pid():
    if a.pid_file:
        fd = os.open(a.pid_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)


def hang():
    while True:
        time.sleep(3600)


record_pid()
if a.as_worker:
    hang()
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
if a.worker:
    subprocess.Popen([sys.executable, os.path.abspath(__file__), "--as-worker", "--pid-file", a.pid_file or ""])
print(f"[INFO|{time.strftime('%Y-%m-%d %H:%M:%S')}] llamafactory.hparams.parser:423 >> Process rank: {rank}, "
      f"world size: {world}, device: cuda:{os.environ.get('LOCAL_RANK', rank)}, distributed training: True, "
      "compute dtype: torch.bfloat16", file=sys.stderr, flush=True)
if rank != a.oom_rank:
    hang()
time.sleep(a.oom_after)
print("Traceback (most recent call last):", file=sys.stderr)
print('  File "/opt/venv/lib/python3.11/site-packages/torch/nn/modules/linear.py", line 125, in forward',
      file=sys.stderr)
print("    return F.linear(input, self.weight, self.bias)", file=sys.stderr, flush=True)
if a.oom_stamp:
    with open(a.oom_stamp, "w") as f:
        f.write(repr(time.time()))
print(f"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU {rank} has a total capacity of "
      "79.15 GiB of which 1.02 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. "
      "Of the allocated memory 75.01 GiB is allocated by PyTorch, and 1.63 GiB is reserved by PyTorch but "
      "unallocated. If reserved but unallocated memory is large try setting "
      "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
      "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)", file=sys.stderr,
      flush=True)
hang()
