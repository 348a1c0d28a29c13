#!/usr/bin/env python3
"""FAKE llamafactory-cli whose "ranks" slip out of reach of the parent-death signal.

    fake_escapees.py --ranks N --pid-file F train <yaml>

The top process records its pid in --pid-file and starts N ranks the hard way:
each is forked, calls setsid, forks again and the middle process exits (the
classic daemon double fork), so the rank has neither its starter as parent nor
its session.  Each rank then clears its own parent-death signal, ignores
SIGTERM, SIGHUP and SIGINT, records its pid and sleeps forever: only SIGKILL
ends it.  The top process prints a line and hangs, like a quiet training run.
"""

import argparse
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1


def record_pid(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)


def rank(pid_file):
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    record_pid(pid_file)
    while True:
        time.sleep(3600)


def double_fork(pid_file):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            rank(pid_file)
        os._exit(0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=3)
    p.add_argument("--pid-file", required=True)
    p.add_argument("cmd")
    p.add_argument("yaml")
    a = p.parse_args()
    record_pid(a.pid_file)
    for _ in range(a.ranks):
        double_fork(a.pid_file)
        os.wait()  # the middle process
    print("[INFO|2025-01-01 00:00:00] llamafactory.hparams.parser:406 >> Process rank: 0, world size: 3",
          flush=True)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
