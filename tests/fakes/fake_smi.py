"""Shared logic of the FAKE nvidia-smi / rocm-smi / hy-smi used by dsplan's tests.

These fakes never touch a GPU.  They replay recorded tool output from
``tests/fakes/recorded/`` (see SOURCES.md there for where each format comes from)
so that ``dsplan.inputs.detect`` runs its real subprocess path end to end.

Environment:

``DSPLAN_FAKE_SMI``
    The recording to replay: a file name under ``tests/fakes/recorded/`` or an
    absolute path (tests use the latter for hand-made malformed output).  The part
    of the name before the first ``_`` says which tool printed it.
``DSPLAN_FAKE_SMI_DELAY``
    Seconds to sleep before answering (for timeout tests).

Behaviour:

* The arguments must be exactly what ``dsplan.inputs.detect`` is meant to send; anything
  else exits 1 with a message, so a changed invocation fails the tests.
* A recording that belongs to another tool makes this one behave like a tool that
  is installed on a machine without its kind of device (exit status non-zero).
* A ``.txt`` recording is plain-text output: asked for ``--json``, the fake
  answers like a build without JSON mode (usage error, exit 2), so that
  ``dsplan.inputs.detect`` has to fall back to the plain query.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

RECORDED = Path(__file__).resolve().parent / "recorded"

_AMD_ARGS = ["--showproductname", "--showmeminfo", "vram"]
EXPECTED_ARGS: dict[str, list[list[str]]] = {
    "nvidia-smi": [["--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]],
    "rocm-smi": [[*_AMD_ARGS, "--json"], _AMD_ARGS],
    "hy-smi": [[*_AMD_ARGS, "--json"], _AMD_ARGS],
}

# What the real nvidia-smi prints when the driver is not loaded (exit status 9).
_NVIDIA_NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running.\n"
)


def main(tool: str) -> int:
    """Answer one invocation of the fake ``tool``; returns the exit status."""
    args = sys.argv[1:]
    if args not in EXPECTED_ARGS[tool]:
        expected = " | ".join(" ".join(a) for a in EXPECTED_ARGS[tool])
        sys.stderr.write(f"FAKE {tool}: unexpected arguments {args!r}; dsplan.inputs.detect should send: {expected}\n")
        return 1

    recording = os.environ.get("DSPLAN_FAKE_SMI", "")
    if not recording:
        sys.stderr.write(f"FAKE {tool}: set DSPLAN_FAKE_SMI to a recording in {RECORDED}\n")
        return 1
    path = Path(recording) if os.path.isabs(recording) else RECORDED / recording
    if not path.is_file():
        sys.stderr.write(f"FAKE {tool}: no recording {path}\n")
        return 1

    delay = float(os.environ.get("DSPLAN_FAKE_SMI_DELAY", "0") or 0)
    if delay > 0:
        time.sleep(delay)

    recorded_by = path.name.split("_", 1)[0]
    if recorded_by != tool:
        if tool == "nvidia-smi":
            sys.stdout.write(_NVIDIA_NO_DRIVER)
            return 9
        sys.stderr.write(f"FAKE {tool}: no device of this kind here (recording {path.name} is {recorded_by} output)\n")
        return 1

    if path.suffix == ".txt" and "--json" in args:
        sys.stderr.write(f"usage: {tool} [options]\n{tool}: error: unrecognized arguments: --json\n")
        return 2

    sys.stdout.write(path.read_text(encoding="utf-8"))
    return 0
