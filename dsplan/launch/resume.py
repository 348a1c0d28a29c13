"""Where the next attempt starts from: an earlier attempt's checkpoint, resumed exactly or by its weights.

Before each attempt the run loop asks :func:`find_resume` for the newest complete
checkpoint the run folder's attempts left (newest attempt first).  How it is used
depends on the tier that wrote it:

* **the same tier**: exact resume, as LLaMA-Factory does it: ``resume_from_checkpoint``
  loads the weights, DeepSpeed's optimizer shards, the scheduler, the step count and
  the data position.  The shards fit because the ZeRO stage and the world size are
  the same (a smaller micro-batch changes neither).
* **another tier** (a fall back changed the ZeRO stage or the offload): DeepSpeed's
  optimizer shards cannot be loaded across stages, and universal checkpointing does
  not cover ZeRO-3.  The weights can: LoRA/QLoRA take the saved adapter as
  ``adapter_name_or_path``, full/freeze the Hugging Face format weights of the
  checkpoint (dsplan's ZeRO-3 configs set ``stage3_gather_16bit_weights_on_model_save``)
  as ``model_name_or_path``.  ``resume_from_checkpoint`` still names the folder, so the
  Trainer restores the step count, the epoch and data position, the learning-rate
  scheduler (``scheduler.pt``) and the random state from ``trainer_state.json``;
  :mod:`dsplan.launch.rank_hook` makes it skip the DeepSpeed part for that folder.
  What is lost is said in the ledger: the optimizer's moments.

A checkpoint is complete once ``trainer_state.json`` is in it: the Trainer writes it
last.  Standard library only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

#: The folder that :mod:`dsplan.launch.rank_hook` lives in; first on PYTHONPATH for a weights resume.
HOOK_DIR = Path(__file__).resolve().parent / "rank_hook"
#: The variable that names the checkpoint whose DeepSpeed state the hook skips.
HOOK_VAR = "DSPLAN_WEIGHTS_FROM"
#: What a weights resume does not carry over (for the ledger and the terminal).
LOST = ("the optimizer's moments (Adam's running averages of the gradients and their squares); "
        "the optimizer starts fresh at the restored step and learning rate")
_ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_ADAPTER_METHODS = ("lora", "qlora")


def checkpoints(output_dir: Path) -> list[Path]:
    """The complete ``checkpoint-N`` folders of one output folder, highest N first."""
    found = []
    try:
        entries = list(Path(output_dir).glob("checkpoint-*"))
    except OSError:
        return []
    for p in entries:
        tail = p.name.split("-", 1)[1]
        if tail.isdigit() and (p / "trainer_state.json").is_file():
            found.append((int(tail), p))
    return [p for _, p in sorted(found, reverse=True)]


def has_weights(checkpoint: Path, method: str) -> bool:
    """Whether the folder holds what a weights resume of ``method`` loads (and the scheduler state)."""
    names = _ADAPTER_FILES if method in _ADAPTER_METHODS else _MODEL_FILES
    return (checkpoint / "scheduler.pt").is_file() and any((checkpoint / n).is_file() for n in names)


def _progress(checkpoint: Path) -> tuple[Optional[int], Optional[int]]:
    """(steps done, total steps) from the checkpoint's ``trainer_state.json``; None where unreadable."""
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    done, total = state.get("global_step"), state.get("max_steps")
    return (done if isinstance(done, int) else None), (total if isinstance(total, int) else None)


@dataclass(frozen=True)
class Resume:
    """How the next attempt starts from one checkpoint."""

    checkpoint: Path
    exact: bool  # same tier: resume everything; else weights, schedule and step only
    attempt: int  # the attempt that wrote it
    tier: str  # the tier that wrote it
    method: str
    step: Optional[int] = None  # global_step in trainer_state.json
    total: Optional[int] = None  # max_steps in trainer_state.json

    def user_keys(self, user: dict) -> dict:
        """The user's YAML for the attempt: ``resume_from_checkpoint``, and for a weights
        resume of LoRA/QLoRA the adapter (it replaces the last adapter the user listed:
        LLaMA-Factory merges the ones before it and trains the last)."""
        out = dict(user)
        out["resume_from_checkpoint"] = str(self.checkpoint)
        if not self.exact and self.method in _ADAPTER_METHODS:
            listed = [a.strip() for a in str(out.get("adapter_name_or_path") or "").split(",") if a.strip()]
            out["adapter_name_or_path"] = ",".join(listed[:-1] + [str(self.checkpoint)])
        return out

    @property
    def model_path(self) -> Optional[str]:
        """The ``model_name_or_path`` of a full/freeze weights resume; None otherwise."""
        return None if self.exact or self.method in _ADAPTER_METHODS else str(self.checkpoint)

    def env(self, env: dict) -> dict:
        """The child's environment: for a weights resume, the rank hook first on PYTHONPATH."""
        if self.exact:
            return env
        out = dict(env)
        out[HOOK_VAR] = str(self.checkpoint)
        out["PYTHONPATH"] = os.pathsep.join([str(HOOK_DIR)] + [p for p in [env.get("PYTHONPATH")] if p])
        return out

    def ledger(self) -> dict:
        """What the attempt's ledger lines say about where it started."""
        rec = {"checkpoint": str(self.checkpoint), "mode": "exact" if self.exact else "weights",
               "from_attempt": self.attempt, "from_tier": self.tier, "step": self.step, "total_steps": self.total}
        if not self.exact:
            rec["lost"] = LOST
        return rec

    def describe(self) -> str:
        at = f" at step {self.step}" + (f" of {self.total}" if self.total else "") if self.step is not None else ""
        if self.exact:
            return f"resuming tier {self.tier} from {self.checkpoint}{at}"
        what = "adapter" if self.method in _ADAPTER_METHODS else "weights"
        return (f"continuing from the {what} of {self.checkpoint}{at} (written at {self.tier}); learning-rate "
                f"schedule and step count continue; lost: {LOST}")


def find_resume(records: Iterable, tier: str, method: str) -> Optional[Resume]:
    """The newest usable checkpoint of the attempts in ``records`` (ledger records, oldest
    first), as a :class:`Resume` for an attempt at ``tier``; None when there is none."""
    for rec in reversed(list(records)):
        for ck in checkpoints(Path(rec.output_dir)):
            exact = rec.tier == tier
            if exact or has_weights(ck, method):
                step, total = _progress(ck)
                return Resume(ck, exact, rec.attempt, rec.tier, method, step, total)
    return None
