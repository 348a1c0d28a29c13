# FAKE child for tests: stands in for `llamafactory-cli train` -> torchrun -> N ranks.
# It trains nothing; it prints log lines in the real LLaMA-Factory / DeepSpeed / torch
# formats so that dsplan's launcher and log classifier see what a real run prints.
#
#   fake_ranks.py --ranks 8 --oom-rank 3 --oom-after 1.0 --backend cuda|rocm
#                 [--ignore-term] [--escapee pgroup|session] [--pid-file F] [--oom-stamp F]
#                 [--die-after S]
#
# The top process plays torchrun: it starts --ranks copies of itself (one per rank,
# each in a new session, as torchrun does) and then waits on them forever.  Rank --oom-rank prints a real-format
# torch.OutOfMemoryError traceback after --oom-after seconds and then hangs; every
# other rank hangs from the start, as ranks waiting in an NCCL collective do.  With
# --ignore-term every process ignores SIGTERM, so only SIGKILL removes them.  With
# --escapee, rank 0 also starts a helper that leaves the process group (pgroup:
# setpgid) or the session (session: setsid), like a badly behaved data-loader worker.
# With --die-after, the fake torchrun exits on its own after S seconds and leaves its
# ranks behind (still holding the output pipes).  Every process appends its pid to
# --pid-file; the OOM rank writes time.time(), taken just before it prints the OOM
# line, to --oom-stamp.
import argparse
import os
import signal
import subprocess
import sys
import time


def record_pid(path):
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)


def hang():
    while True:
        time.sleep(3600)


def stamp_lf(level="INFO"):
    return f"[{level}|{time.strftime('%Y-%m-%d %H:%M:%S')}]"


def stamp_ds():
    t = time.time()
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) + f",{int(t * 1000) % 1000:03d}"


OOM_CUDA = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.32 GiB. GPU {gpu} has a total capacity of "
    "79.15 GiB of which 1.02 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. "
    "Of the allocated memory 75.01 GiB is allocated by PyTorch, and 1.63 GiB is reserved by PyTorch but "
    "unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)
OOM_ROCM = (
    "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.32 GiB. GPU {gpu} has a total capacity of "
    "63.98 GiB of which 1.02 GiB is free. Of the allocated memory 60.11 GiB is allocated by PyTorch, and "
    "1.63 GiB is reserved by PyTorch but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_HIP_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)

TRACEBACK = [
    "Traceback (most recent call last):",
    '  File "/opt/venv/lib/python3.11/site-packages/llamafactory/launcher.py", line 23, in <module>',
    "    launch()",
    '  File "/opt/venv/lib/python3.11/site-packages/llamafactory/train/tuner.py", line 110, in run_exp',
    "    _training_function(config={\"args\": args, \"callbacks\": callbacks})",
    '  File "/opt/venv/lib/python3.11/site-packages/llamafactory/train/sft/workflow.py", line 96, in run_sft',
    "    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)",
    '  File "/opt/venv/lib/python3.11/site-packages/deepspeed/runtime/engine.py", line 2216, in backward',
    "    self.optimizer.backward(loss, retain_graph=retain_graph)",
    '  File "/opt/venv/lib/python3.11/site-packages/torch/autograd/graph.py", line 825, in _engine_run_backward',
    "    return Variable._execution_engine.run_backward(  # Calls into the C++ engine to run the backward pass",
]


def rank_main(a):
    rank = a.as_rank
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record_pid(a.pid_file)
    if a.escapee and rank == 0:
        subprocess.Popen([sys.executable, os.path.abspath(__file__), "--as-escapee", a.escapee,
                          "--pid-file", a.pid_file or "", *(["--ignore-term"] if a.ignore_term else [])])
    # ROCm builds of torch name the device "cuda" too, so the line is the same for both backends.
    print(f"{stamp_lf()} llamafactory.hparams.parser:423 >> Process rank: {rank}, world size: {a.ranks}, "
          f"device: cuda:{rank}, distributed training: True, compute dtype: torch.bfloat16", file=sys.stderr,
          flush=True)
    if rank == 0:
        print(f"[{stamp_ds()}] [INFO] [comm.py:658:init_distributed] cdb=None", flush=True)
        print(f"[{stamp_ds()}] [INFO] [config.py:1003:print] DeepSpeedEngine configuration:", flush=True)
        print(f"{stamp_lf()} llamafactory.model.loader:143 >> all params: 494,032,768", file=sys.stderr, flush=True)
    if rank != a.oom_rank:
        hang()
    time.sleep(a.oom_after)
    for line in TRACEBACK:
        print(f"[rank{rank}]: {line}", file=sys.stderr)
    sys.stderr.flush()
    msg = (OOM_CUDA if a.backend == "cuda" else OOM_ROCM).format(gpu=rank)
    if a.oom_stamp:
        with open(a.oom_stamp, "w") as f:
            f.write(repr(time.time()))
    print(f"[rank{rank}]: {msg}", file=sys.stderr, flush=True)
    hang()


def escapee_main(a):
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if a.as_escapee == "session":
        os.setsid()
    else:
        os.setpgid(0, 0)
    record_pid(a.pid_file)
    hang()


def torchrun_main(a):
    if a.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    record_pid(a.pid_file)
    pid = os.getpid()
    t = time.time()
    ts = time.strftime("%m%d %H:%M:%S", time.localtime(t)) + f".{int(t * 1e6) % 1000000:06d}"
    print(f"W{ts} {pid} torch/distributed/run.py:793] ", file=sys.stderr)
    print(f"W{ts} {pid} torch/distributed/run.py:793] *****************************************", file=sys.stderr)
    print(f"W{ts} {pid} torch/distributed/run.py:793] Setting OMP_NUM_THREADS environment variable for each "
          "process to be 1 in default, to avoid your system being overloaded, please further tune the variable "
          "for optimal performance in your application as needed. ", file=sys.stderr)
    print(f"W{ts} {pid} torch/distributed/run.py:793] *****************************************", file=sys.stderr,
          flush=True)
    common = ["--ranks", str(a.ranks), "--oom-rank", str(a.oom_rank), "--oom-after", str(a.oom_after),
              "--backend", a.backend, "--pid-file", a.pid_file or "", "--oom-stamp", a.oom_stamp or ""]
    if a.ignore_term:
        common.append("--ignore-term")
    if a.escapee:
        common += ["--escapee", a.escapee]
    # Like torchrun (torch.distributed.elastic's SubprocessHandler), every rank gets a
    # session, and so a process group, of its own.
    ranks = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--as-rank", str(r), *common],
                              start_new_session=True)
             for r in range(a.ranks)]
    if a.die_after is not None:  # torchrun itself crashes, orphaning its ranks
        time.sleep(a.die_after)
        print(f"{pid}: fake torchrun exits abruptly, its ranks keep running", file=sys.stderr, flush=True)
        os._exit(1)
    for r in ranks:
        r.wait()
    hang()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--oom-rank", type=int, default=3)
    p.add_argument("--oom-after", type=float, default=1.0)
    p.add_argument("--backend", choices=("cuda", "rocm"), default="cuda")
    p.add_argument("--ignore-term", action="store_true")
    p.add_argument("--escapee", choices=("pgroup", "session"))
    p.add_argument("--pid-file")
    p.add_argument("--oom-stamp")
    p.add_argument("--die-after", type=float, help="the fake torchrun exits after this many seconds")
    p.add_argument("--as-rank", type=int)
    p.add_argument("--as-escapee", choices=("pgroup", "session"))
    a = p.parse_args()
    if a.as_escapee:
        escapee_main(a)
    elif a.as_rank is not None:
        rank_main(a)
    else:
        torchrun_main(a)


if __name__ == "__main__":
    main()
