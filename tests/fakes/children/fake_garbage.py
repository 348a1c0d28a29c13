# FAKE child for tests: a training command whose output is hostile to a log reader:
# random bytes (invalid UTF-8, stray \r and \n), a "\r\n" split across two writes,
# a 1 MiB line, and stdout ending in a 1 MiB line with no final newline.  It then
# prints a real-format LLaMA-Factory line on stderr and exits 0.  It trains nothing.
#
#   fake_garbage.py [--stdout-copy F] [--stderr-copy G]
#   (F and G receive exactly the bytes written to stdout and to stderr)
import argparse
import os
import random
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--stdout-copy")
p.add_argument("--stderr-copy")
p.add_argument("--seed", type=int, default=1234)
a = p.parse_args()

rng = random.Random(a.seed)
sent = bytearray()
sent_err = bytearray()


def out(data: bytes) -> None:
    sent.extend(data)
    view = memoryview(data)
    while view:
        n = os.write(1, view)
        view = view[n:]


def err(text: str) -> None:
    sent_err.extend(text.encode())
    os.write(2, text.encode())


err("STDERR-LINE-1 starting\n")
out(bytes(rng.getrandbits(8) for _ in range(256 * 1024)))
out(b"\nsplit crlf\r")
time.sleep(0.05)
out(b"\nafter split\n")
err("STDERR-LINE-2 half a UTF-8 char next\n")
out("caf\u00e9 ".encode() + "\u5f20".encode()[:2])
time.sleep(0.05)
out("\u5f20".encode()[2:] + b"\n")
# A 1 MiB line of mixed ASCII and multi-byte characters, then a newline.
out(("x\u00e9\u5f20" * (1024 * 1024 // 6)).encode() + b"\n")
err("STDERR-LINE-3 long line done\n")
# Stdout ends with a 1 MiB line and no newline.
out(b"y" * (1024 * 1024))
err(f"[INFO|{time.strftime('%Y-%m-%d %H:%M:%S')}] llamafactory.train.sft.workflow:143 >> STDERR-LINE-4 done\n")
if a.stdout_copy:
    with open(a.stdout_copy, "wb") as f:
        f.write(bytes(sent))
if a.stderr_copy:
    with open(a.stderr_copy, "wb") as f:
        f.write(bytes(sent_err))
sys.exit(0)
