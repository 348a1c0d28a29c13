"""What this machine's CPU training stack can do, asked of the training interpreter itself.

The real-tool tests run DeepSpeed's CPU accelerator.  When one of them needs
something this CPU or build lacks, it should fail saying so (``require``), not
minutes later with an unrelated error from deep inside a training run.
"""

from __future__ import annotations

import json
import subprocess

import pytest

#: dsplan's precision names -> the torch dtype DeepSpeed must list as supported.
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

_PROBE = r"""
import json, resource
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
print(json.dumps({
    "accelerator": acc.device_name(),
    "dtypes": [str(d).replace("torch.", "") for d in acc.supported_dtypes()],
    "mkldnn_fp16": bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
    "gloo": bool(dist.is_available() and dist.is_gloo_available()),
    "rlimit_as": hasattr(resource, "RLIMIT_AS"),
}))
"""


def cpu_capabilities(python: str, env: dict[str, str]) -> dict:
    """Ask ``python`` (with ``env``, as a training child would have it) what it supports."""
    r = subprocess.run([python, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        pytest.fail(f"could not ask {python} what its CPU supports (torch/deepspeed import failed):\n"
                    f"{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def require(caps: dict, precision: str | None = None, gloo: bool = False, rlimit_as: bool = False) -> None:
    """Fail the calling test, naming each capability it needs that ``caps`` lacks."""
    missing = []
    if caps.get("accelerator") != "cpu":
        missing.append(f"DeepSpeed's CPU accelerator (it picked {caps.get('accelerator')!r})")
    if precision is not None and PRECISION_DTYPE[precision] not in caps.get("dtypes", []):
        why = " (oneDNN fp16 kernels: AVX512-FP16 or AMX)" if precision == "fp16" else ""
        missing.append(f"{precision} training on this CPU{why}: DeepSpeed's CPU accelerator supports only "
                       f"{', '.join(caps.get('dtypes', []))}")
    if gloo and not caps.get("gloo"):
        missing.append("torch.distributed's gloo backend (needed for 2 CPU ranks)")
    if rlimit_as and not caps.get("rlimit_as"):
        missing.append("RLIMIT_AS (the demo's address-space cap)")
    if missing:
        pytest.fail("this machine lacks what the test needs: " + "; ".join(missing), pytrace=False)
