# FAKE child for tests: stands in for `llamafactory-cli train` whose torchrun loses a
# rank to SIGKILL (what the kernel's OOM killer does when host RAM runs out, e.g.
# with CPU offload).  It trains nothing; it prints the real-format lines of that
# failure: torchrun's "failed (exitcode: -9)" log line and ChildFailedError report,
# then llamafactory-cli's CalledProcessError traceback, and exits 1 as
# llamafactory-cli does.
#
#   fake_sigkilled_rank.py [--ranks 2] [--victim 1] [--after 0.5] [--pid-file F]
import argparse
import os
import signal
import socket
import subprocess
import sys
import time


def record_pid(path):
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)


def glog(level):
    t = time.time()
    return f"{level}{time.strftime('%m%d %H:%M:%S', time.localtime(t))}.{int(t * 1e6) % 1000000:06d} {os.getpid()}"


def rank_main(a):
    record_pid(a.pid_file)
    rank = a.as_rank
    print(f"[INFO|{time.strftime('%Y-%m-%d %H:%M:%S')}] llamafactory.hparams.parser:423 >> Process rank: {rank}, "
          f"world size: {a.ranks}, device: cuda:{rank}, distributed training: True, compute dtype: torch.bfloat16",
          file=sys.stderr, flush=True)
    if rank == a.victim:
        time.sleep(a.after)
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        time.sleep(3600)


def torchrun_main(a):
    record_pid(a.pid_file)
    me = os.path.abspath(__file__)
    ranks = [subprocess.Popen([sys.executable, me, "--as-rank", str(r), "--ranks", str(a.ranks),
                               "--victim", str(a.victim), "--after", str(a.after), "--pid-file", a.pid_file or ""],
                              start_new_session=True)  # as torchrun starts its ranks
             for r in range(a.ranks)]
    failed = None
    while failed is None:
        for r, p in enumerate(ranks):
            if p.poll() is not None and p.returncode != 0:
                failed = (r, p)
                break
        time.sleep(0.05)
    rank, dead = failed
    for p in ranks:
        if p.poll() is None:
            print(f"{glog('W')} torch/distributed/elastic/multiprocessing/api.py:897] Sending process {p.pid} "
                  "closing signal SIGTERM", file=sys.stderr, flush=True)
            os.killpg(p.pid, signal.SIGTERM)  # torchrun signals each rank's process group
    for p in ranks:
        p.wait()
    entry = "/opt/venv/bin/python3"
    script = "/opt/venv/lib/python3.11/site-packages/llamafactory/launcher.py"
    print(f"{glog('E')} torch/distributed/elastic/multiprocessing/api.py:869] failed (exitcode: {dead.returncode}) "
          f"local_rank: {rank} (pid: {dead.pid}) of binary: {entry}", file=sys.stderr)
    now = time.strftime("%Y-%m-%d_%H:%M:%S")
    sig = -dead.returncode
    report = f"""Traceback (most recent call last):
  File "/opt/venv/bin/torchrun", line 8, in <module>
    sys.exit(main())
             ^^^^^^
  File "/opt/venv/lib/python3.11/site-packages/torch/distributed/elastic/multiprocessing/errors/__init__.py", line 355, in wrapper
    return f(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^
  File "/opt/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 918, in main
    run(args)
  File "/opt/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 909, in run
    elastic_launch(
  File "/opt/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 138, in __call__
    return launch_agent(self._config, self._entrypoint, list(args))
           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/opt/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 269, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
{script} FAILED
------------------------------------------------------------
Failures:
  <NO_OTHER_FAILURES>
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : {now}
  host      : {socket.gethostname()}
  rank      : {rank} (local_rank: {rank})
  exitcode  : {dead.returncode} (pid: {dead.pid})
  error_file: <N/A>
  traceback : Signal {sig} ({signal.Signals(sig).name}) received by PID {dead.pid}
============================================================
Traceback (most recent call last):
  File "/opt/venv/bin/llamafactory-cli", line 8, in <module>
    sys.exit(main())
             ^^^^^^
  File "/opt/venv/lib/python3.11/site-packages/llamafactory/cli.py", line 24, in main
    launcher.launch()
  File "/opt/venv/lib/python3.11/site-packages/llamafactory/launcher.py", line 115, in launch
    process = subprocess.run(
              ^^^^^^^^^^^^^^^
  File "/usr/lib/python3.11/subprocess.py", line 571, in run
    raise CalledProcessError(retcode, process.args,
subprocess.CalledProcessError: Command '['torchrun', '--nnodes', '1', '--node_rank', '0', '--nproc_per_node', '{a.ranks}', '--master_addr', '127.0.0.1', '--master_port', '29500', '{script}', 'train', 'dsplan_train.yaml']' returned non-zero exit status 1.
"""
    sys.stderr.write(report)
    sys.stderr.flush()
    sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--victim", type=int, default=1)
    p.add_argument("--after", type=float, default=0.5)
    p.add_argument("--pid-file")
    p.add_argument("--as-rank", type=int)
    a = p.parse_args()
    if a.as_rank is not None:
        rank_main(a)
    else:
        torchrun_main(a)


if __name__ == "__main__":
    main()
