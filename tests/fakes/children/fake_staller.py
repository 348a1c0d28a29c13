# FAKE child for tests: a training command that prints one real-format log line and
# then goes silent forever (no output, no trainer_log.jsonl step), like a rank stuck
# in a collective that never times out.  It trains nothing.
#
#   fake_staller.py [--pid-file F] [--ignore-term]
import argparse
import os
import signal
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--pid-file")
p.add_argument("--ignore-term", action="store_true")
a = p.parse_args()
if a.ignore_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if a.pid_file:
    with open(a.pid_file, "a") as f:
        f.write(f"{os.getpid()}\n")
print(f"[INFO|{time.strftime('%Y-%m-%d %H:%M:%S')}] llamafactory.data.loader:143 >> Loading dataset alpaca_en_demo.json...",
      file=sys.stderr, flush=True)
while True:
    time.sleep(3600)
