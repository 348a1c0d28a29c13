"""Test helper: every Python started with this folder on ``PYTHONPATH`` sees a CPU
without oneDNN fp16 kernels (no AVX512-FP16, no AMX), whatever CPU it runs on.

DeepSpeed's CPU accelerator decides fp16 support by calling
``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` at the moment it is asked, so
replacing that function once torch is imported is enough.  Importing torch here
would slow every interpreter start (the launcher, torchrun, each rank), so the
patch waits: a finder at the head of ``sys.meta_path`` catches the import of
``torch`` and patches the module right after it has run.

With ``DSPLAN_NO_FP16_LOG`` set, each process that imports torch appends one JSON
line there (pid, RANK, argv and what the patched check now answers), so a test can
see that the patch reached the training ranks and not only the first process.
"""

import importlib.machinery
import json
import os
import sys


class _NoFp16:
    """Stands in for the op packet: calling it says "no fp16"; every other attribute
    (``.default``, ``.overloads()``, ...) is the real packet's, because torch's own
    code walks all registered ops (torch.export does, when inductor loads)."""

    def __init__(self, packet):
        self._packet = packet

    def __call__(self, *args, **kwargs) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self._packet, name)


def _patch(torch) -> None:
    torch.ops.mkldnn._is_mkldnn_fp16_supported = _NoFp16(torch.ops.mkldnn._is_mkldnn_fp16_supported)
    log = os.environ.get("DSPLAN_NO_FP16_LOG")
    if log:
        rec = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "argv": sys.argv[:3],
               "mkldnn_fp16": torch.ops.mkldnn._is_mkldnn_fp16_supported(),
               "check_from": torch.ops.mkldnn._is_mkldnn_fp16_supported.__module__}
        with open(log, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


class _PatchTorchOnImport:
    """Meta-path finder: lets the normal finders locate ``torch``, then wraps its loader."""

    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # once is enough, and keeps the search below from finding us
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if "torch" in sys.modules:  # pragma: no cover - only if something imported torch before site ran
    _patch(sys.modules["torch"])
else:
    sys.meta_path.insert(0, _PatchTorchOnImport())
