"""In a training process that continues another tier's checkpoint, skip loading that tier's DeepSpeed state.

dsplan puts this folder first on ``PYTHONPATH`` for one kind of attempt only: the
first attempt at a new tier after an out-of-memory, when an earlier attempt left a
checkpoint.  That attempt passes the checkpoint to LLaMA-Factory three ways: its
weights as ``adapter_name_or_path`` (LoRA) or ``model_name_or_path`` (full,
freeze), and the folder itself as ``resume_from_checkpoint``, so that the
Hugging Face Trainer restores the step count, the epoch, the data position, the
learning-rate scheduler and the random state from ``trainer_state.json``,
``scheduler.pt`` and ``rng_state*.pth``.  The one thing the Trainer cannot do is
load the DeepSpeed part: optimizer shards written at another ZeRO stage do not
fit, and it raises.  This module replaces ``transformers.trainer``'s
``deepspeed_load_checkpoint`` with one that does nothing for that one folder
(``$DSPLAN_WEIGHTS_FROM``), so the optimizer starts fresh and everything else
carries on.  Every other path is loaded as before.

Python imports ``sitecustomize`` at start-up in every process that sees this
folder (llamafactory-cli, torchrun, the ranks): it only installs an import
hook, standard library only, and then runs the ``sitecustomize`` this one
shadows, if there is one.
"""

import importlib.machinery
import importlib.util
import os
import sys

_VAR = "DSPLAN_WEIGHTS_FROM"
_TARGET = "transformers.trainer"


def _same(a, b):
    try:
        return os.path.realpath(os.fspath(a)) == os.path.realpath(b)
    except (TypeError, ValueError):
        return False


def _patch(module, checkpoint):
    original = getattr(module, "deepspeed_load_checkpoint", None)
    if original is None:
        print(f"[dsplan] warning: {_TARGET} has no deepspeed_load_checkpoint; cannot continue from "
              f"{checkpoint} without its optimizer state", file=sys.stderr, flush=True)
        return

    def deepspeed_load_checkpoint(engine, checkpoint_path, *args, **kwargs):
        if not _same(checkpoint_path, checkpoint):
            return original(engine, checkpoint_path, *args, **kwargs)
        if os.environ.get("RANK", "0") == "0":
            print(f"[dsplan] continuing from {checkpoint}: weights, step count and learning-rate schedule "
                  "restored; DeepSpeed optimizer state not loaded (written at another ZeRO tier), the "
                  "optimizer starts fresh", file=sys.stderr, flush=True)
        return None

    module.deepspeed_load_checkpoint = deepspeed_load_checkpoint


class _Finder:
    """Finds ``transformers.trainer`` through the other finders and patches it once it has run."""

    def __init__(self, checkpoint):
        self.checkpoint = checkpoint

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                self._wrap(spec.loader)
                return spec
            if spec is not None:
                return spec
        return None

    def _wrap(self, loader):
        run = loader.exec_module
        checkpoint = self.checkpoint

        def exec_module(module):
            run(module)
            _patch(module, checkpoint)

        loader.exec_module = exec_module


def _run_shadowed():
    """The ``sitecustomize`` a later ``sys.path`` entry holds, which this module hides."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if os.environ.get(_VAR):
    sys.meta_path.insert(0, _Finder(os.environ[_VAR]))
_run_shadowed()
