# FAKE child for tests: a well-behaved training command.  It trains nothing; over a few
# seconds it appends real-format records (LLaMA-Factory's LogCallback keys) to
# <output-dir>/trainer_log.jsonl, each in two writes so a reader can catch half a
# line, prints Hugging Face Trainer-style lines (unless --quiet), and exits 0.
#
#   fake_trainer.py --output-dir D [--steps 6] [--interval 0.3] [--quiet]
import argparse
import json
import os
import sys
import time
from datetime import timedelta

p = argparse.ArgumentParser()
p.add_argument("--output-dir", required=True)
p.add_argument("--steps", type=int, default=6)
p.add_argument("--interval", type=float, default=0.3)
p.add_argument("--quiet", action="store_true", help="print nothing while training: only the trainer log moves")
a = p.parse_args()

os.makedirs(a.output_dir, exist_ok=True)
log = os.path.join(a.output_dir, "trainer_log.jsonl")
print(f"[INFO|{time.strftime('%Y-%m-%d %H:%M:%S')}] transformers.trainer:2414 >> ***** Running training *****",
      file=sys.stderr, flush=True)
start = time.time()
for step in range(1, a.steps + 1):
    time.sleep(a.interval)
    elapsed = time.time() - start
    remaining = (a.steps - step) * elapsed / step
    loss = round(2.0 / step, 4)
    lr = 1e-5 * (1 - (step - 1) / a.steps)
    epoch = round(step / a.steps * 3, 2)
    rec = dict(current_steps=step, total_steps=a.steps, loss=loss, lr=lr, epoch=epoch,
               percentage=round(step / a.steps * 100, 2), elapsed_time=str(timedelta(seconds=int(elapsed))),
               remaining_time=str(timedelta(seconds=int(remaining))))
    line = (json.dumps(rec) + "\n").encode()
    with open(log, "ab") as f:
        f.write(line[: len(line) // 2])
        f.flush()
        time.sleep(min(0.05, a.interval / 4))
        f.write(line[len(line) // 2:])
    if not a.quiet:
        print({"loss": loss, "grad_norm": 1.25, "learning_rate": lr, "epoch": epoch}, flush=True)
print("***** train metrics *****", flush=True)
print(f"  epoch                    = {3.0:.4g}", flush=True)
sys.exit(0)
