"""What to measure: the LF run's data arguments that decide its samples' token lengths.

One job: :class:`DataSpec`, the input every later stage reads (which datasets, where,
the template, the stage and the cutoff), filled from LF's argument mapping with LF's
own defaults; and :class:`Refused`, which every later stage raises for a spec whose data
LF will surely refuse.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dsplan.errors import UserError

#: The stages that train on (chosen, rejected) pairs.
PAIRWISE_STAGES = ("rm", "dpo")
#: How a sure refusal ends (LF's loader, parser or converter raises on this data).
LF_REFUSES = "LF will refuse it"


class Refused(UserError):
    """The data is one LF 0.9.5 will surely refuse (its loader, argument parser or converter
    raises on it); the message is one line ending in what LF does.  :func:`~dsplan.inputs.data.measure`
    turns it into :attr:`DataProfile.refused <dsplan.inputs.data.result.DataProfile.refused>`;
    :func:`~dsplan.inputs.data.read_samples` lets it through as the UserError it is."""


@dataclass(frozen=True)
class DataSpec:
    """The LF arguments that decide the data's token lengths (LF's defaults where unset)."""

    dataset: str  # comma-separated names in dataset_info.json
    dataset_dir: str = "data"  # absolute, or relative to the current folder as LF reads it
    template: str | None = "default"
    cutoff_len: int = 2048
    stage: str = "sft"
    packing: bool | None = None  # LF: None means on for pt, off otherwise
    neat_packing: bool = False
    max_samples: int | None = None
    enable_thinking: bool | None = True
    preserve_thinking: bool = False
    mask_history: bool = False
    tool_format: str | None = None
    default_system: str | None = None
    model_name_or_path: str | None = None  # where the tokenizer is (folder or hub id)
    image_tokens: int = 0  # LM tokens each image adds (a VLM's, at image_max_pixels); 0: images not countable

    @classmethod
    def from_lf_args(cls, args: Mapping, base_dir: str | Path | None = None, image_tokens: int = 0) -> DataSpec:
        """From an LF argument mapping (the user's YAML merged with dsplan's settings);
        a relative ``dataset_dir`` is taken from ``base_dir`` (default: the current folder).
        ``image_tokens``: what one image adds to a sample (:meth:`Vision.image_tokens
        <dsplan.inputs.model.Vision.image_tokens>`), 0 when the model is not a VLM."""
        names = args.get("dataset") or ""
        if isinstance(names, (list, tuple)):
            names = ",".join(str(n) for n in names)
        ddir = str(args.get("dataset_dir") or "data")
        if not (ddir == "ONLINE" or ddir.startswith("REMOTE:") or os.path.isabs(ddir)):
            ddir = str(Path(base_dir or os.getcwd()) / ddir)

        def get(key, default):
            value = args.get(key)
            return default if value is None else value

        return cls(dataset=str(names), dataset_dir=ddir, template=args.get("template"),
                   cutoff_len=int(get("cutoff_len", 2048)), stage=str(get("stage", "sft")),
                   packing=args.get("packing"), neat_packing=bool(get("neat_packing", False)),
                   max_samples=args.get("max_samples"), enable_thinking=get("enable_thinking", True),
                   preserve_thinking=bool(get("preserve_thinking", False)),
                   mask_history=bool(get("mask_history", False)), tool_format=args.get("tool_format"),
                   default_system=args.get("default_system"), model_name_or_path=args.get("model_name_or_path"),
                   image_tokens=image_tokens)

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in str(self.dataset).split(",") if n.strip()]

    @property
    def packs(self) -> bool:
        """Whether LF packs samples into ``cutoff_len`` rows.  LF 0.9.5's ``_get_dataset_processor``
        packs for pt (unless ``packing: false``) and for sft with ``packing`` (``neat_packing``
        turns it on); the pairwise (rm, dpo), feedback (kto) and unsupervised (ppo) processors
        never pack, whatever ``packing`` says (and LF refuses ``neat_packing`` outside sft)."""
        if self.stage == "pt":
            return self.packing is not False
        return self.stage == "sft" and bool(self.packing or self.neat_packing)

    @property
    def pairwise(self) -> bool:
        return self.stage in PAIRWISE_STAGES

    @property
    def sample_cutoff(self) -> int:
        """The cutoff LF truncates each sample to: one less when packing was asked for (LF's
        DataArguments keeps a slot free so every packed row is ``cutoff_len`` long).  That happens
        before the stage is known, so dpo with ``packing: true`` truncates one short too, unpacked."""
        return self.cutoff_len - 1 if (self.packing is True or self.neat_packing) else self.cutoff_len
