"""The result: per-sample lengths and what they sum up to for the plan.

One job: :class:`DataProfile` (the lengths and how they were measured) and its summaries:
:class:`LengthStats`, the padded :class:`WorstBatch` of a micro-batch size as LF's
collators pad it, a text histogram, the longest samples as :class:`SampleRef` rows, and
the JSON the plan shows.  (Not named profile.py: :mod:`~dsplan.inputs.data.worker` runs by
path with this folder first on ``sys.path``, where that name would shadow the standard library's.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from dsplan.inputs.data.spec import DataSpec

#: LF's collators pad every training batch but pt's (SFT, pairwise, KTO) to a multiple of this
#: (``pad_to_multiple_of=8``); pt's pads to the batch's longest row.
PAD_MULTIPLE = 8
#: How each :attr:`DataProfile.method` measures: (the short name plan's lines use, the one-line
#: ``method_note``; the engines fill in the braces).
METHODS = {
    "lf": ("LF's own pipeline (exact)", "exact: LLaMA-Factory's own data pipeline ({python})"),
    "tokenizer": ("tokenizer estimate", "estimated: the model's tokenizer.json with LF's template rendered by dsplan"),
    "chars": ("characters-per-token rate",
              "rough estimate: characters per token (Latin {latin}, digits {digit}, CJK {cjk}, other {other})"),
}
#: The start of a note that says why the data planned at cutoff_len.
AT_CUTOFF = "planned at cutoff_len"


def padded(n: int, stage: str) -> int:
    """A row of ``n`` tokens as LF's collator pads it: to a multiple of :data:`PAD_MULTIPLE`, pt's as is."""
    return n if stage == "pt" else -(-n // PAD_MULTIPLE) * PAD_MULTIPLE


# ---------------------------------------------------------------- results
@dataclass(frozen=True)
class SampleRef:
    """One sample: its dataset's name and its row as LF reads it (after ``max_samples``)."""

    dataset: str
    row: int


@dataclass(frozen=True)
class LengthStats:
    """Token lengths per sample after template and truncation (pairwise: the longer of chosen/rejected)."""

    count: int
    max: int
    p99: int
    median: int
    mean: float
    min: int
    truncated: int  # samples that truncation to cutoff_len cuts
    dropped: int | None  # rows LF drops as malformed for the stage (None: unknown)


@dataclass(frozen=True)
class WorstBatch:
    """The largest micro-batch the data can form, padded as LF's collator pads it."""

    rows: int  # sequences in the batch: micro-batch (pairwise: 2 x micro-batch, chosen + rejected)
    seq_len: int  # every row is padded to this
    tokens: int  # rows x seq_len
    cutoff_tokens: int  # rows x cutoff_len: what planning at cutoff_len assumes
    basis: str  # "data" (longest real sample), "packing" (rows are cutoff_len) or "cutoff" (no data read)


@dataclass(frozen=True)
class DataProfile:
    """What :func:`~dsplan.inputs.data.engine.measure` learnt about the data.  Empty ``lengths``
    means it planned at cutoff; ``refused`` says why when LF will surely refuse the data."""

    spec: DataSpec
    method: str  # "lf" | "tokenizer" | "chars" | "none"
    method_note: str  # one line: how the lengths were measured, and how exact they are
    lengths: tuple[int, ...] = ()  # per sample after truncation (pairwise: chosen)
    rejected: tuple[int, ...] | None = None  # pairwise: rejected, same order as lengths
    truncated: int = 0
    dropped: int | None = None
    rows_read: int | None = None
    longest_untruncated: int | None = None  # before truncation (None where unknown: LF's lengths)
    notes: tuple[str, ...] = ()
    cached: bool = False
    seconds: float = 0.0
    #: (dataset name, rows read, rows dropped) per dataset, in order: maps lengths to rows.
    sources: tuple[tuple[str, int, tuple[int, ...]], ...] | None = field(default=None, repr=False)
    #: One line when LF 0.9.5 will surely refuse this data (then ``lengths`` is empty); None otherwise.
    refused: str | None = None

    @property
    def exact(self) -> bool:
        return self.method == "lf"

    @property
    def how(self) -> str:
        """The method's short name, for the plan's lines."""
        return METHODS[self.method][0] if self.method in METHODS else "not measured"

    @property
    def at_cutoff(self) -> bool:
        """No lengths: the plan keeps ``cutoff_len`` (:attr:`cutoff_reason` says why)."""
        return not self.lengths

    @property
    def cutoff_reason(self) -> str:
        """Why there are no lengths: LF's refusal, else the note that says why it planned at
        cutoff_len, else how it was measured.  (Meaningful where :attr:`at_cutoff`.)"""
        if self.refused:
            return self.refused
        return next((n for n in self.notes if n.startswith(AT_CUTOFF)), self.method_note)

    def at_cutoff_len(self, cutoff_len: int) -> DataProfile:
        """The profile at a lower ``cutoff_len`` (``--allow-cutoff``): every length cut to the new
        sample cutoff, without measuring again.  Per sample an upper bound: LF may cut a multi-turn
        sample a little shorter.  The profile itself at its own cutoff or above."""
        if cutoff_len >= self.spec.cutoff_len or self.at_cutoff:
            return self
        spec = replace(self.spec, cutoff_len=cutoff_len)
        cut = spec.sample_cutoff
        # what the old cutoff cut, the new one cuts too (those rows are near the old cutoff, above this one)
        # (LF's own lengths cannot tell a row cut to the cutoff from one that long, as measure_lf counts)
        truncated = max(self.truncated, sum(n > cut or (self.exact and n == cut) for n in self.row_lengths()))
        return replace(self, spec=spec, lengths=tuple(min(n, cut) for n in self.lengths),
                       rejected=None if self.rejected is None else tuple(min(n, cut) for n in self.rejected),
                       truncated=truncated)

    def row_lengths(self) -> list[int]:
        """Per sample, the length its batch is padded toward (pairwise: the longer of the pair)."""
        if self.rejected is None:
            return list(self.lengths)
        return [max(c, r) for c, r in zip(self.lengths, self.rejected)]

    def stats(self) -> LengthStats | None:
        return _stats(self.row_lengths(), self.truncated, self.dropped) if self.lengths else None

    def worst_batch(self, micro_batch: int) -> WorstBatch:
        return _worst_batch(self, micro_batch)

    def histogram(self, bins: int = 8, width: int = 30) -> list[str]:
        return _histogram(self.row_lengths(), self.spec.cutoff_len, bins, width)

    def longest(self, n: int) -> list[SampleRef]:
        """The ``n`` longest samples, longest first; empty when rows cannot be told apart."""
        return _longest(self, n)

    def to_json(self, micro_batch: int | None = None) -> dict:
        return _profile_json(self, micro_batch)


# ---------------------------------------------------------------- summaries
def _stats(rows: list[int], truncated: int, dropped: int | None) -> LengthStats:
    s = sorted(rows)
    n = len(s)

    def rank(q: float) -> int:  # nearest-rank percentile
        return s[max(0, math.ceil(q * n) - 1)]

    return LengthStats(count=n, max=s[-1], p99=rank(0.99), median=rank(0.5), mean=round(sum(s) / n, 1),
                       min=s[0], truncated=truncated, dropped=dropped)


def _worst_batch(p: DataProfile, micro_batch: int) -> WorstBatch:
    spec = p.spec
    rows = micro_batch * (2 if spec.pairwise else 1)
    cutoff_tokens = rows * spec.cutoff_len
    if spec.packs:  # packed rows are cutoff_len long; SFT's collator still rounds them up
        seq, basis = padded(spec.cutoff_len, spec.stage), "packing"
    elif p.at_cutoff:
        seq, basis = spec.cutoff_len, "cutoff"
    else:
        seq, basis = padded(max(p.row_lengths()), spec.stage), "data"
    return WorstBatch(rows=rows, seq_len=seq, tokens=rows * seq, cutoff_tokens=cutoff_tokens, basis=basis)


def _histogram(rows: list[int], cutoff: int, bins: int, width: int) -> list[str]:
    """Plain-text bars over (0, cutoff], equal steps (the last bin holds what truncation cut)."""
    if not rows or bins < 1:
        return []
    top = max(cutoff, max(rows))
    step = max(1, math.ceil(top / bins))
    counts = [0] * bins
    for n in rows:
        counts[min(max(n - 1, 0) // step, bins - 1)] += 1
    peak = max(counts)
    label = len(str(top))
    lines = []
    for i, c in enumerate(counts):
        lo, hi = i * step + 1, top if i == bins - 1 else (i + 1) * step
        bar = "#" * (math.ceil(width * c / peak) if c else 0)
        lines.append(f"{lo:>{label}}-{hi:<{label}} |{bar:<{width}}| {c}")
    return lines


def _longest(p: DataProfile, n: int) -> list[SampleRef]:
    if not p.sources or n < 1:
        return []
    refs: list[tuple[str, int]] = []
    for name, rows, dropped in p.sources:
        skip = set(dropped)
        refs += [(name, r) for r in range(rows) if r not in skip]
    lengths = p.row_lengths()
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:n]
    return [SampleRef(*refs[i]) for i in order]


def _profile_json(p: DataProfile, micro_batch: int | None) -> dict:
    stats = p.stats()
    out = {"method": p.method, "exact": p.exact, "method_note": p.method_note, "datasets": p.spec.names,
           "stage": p.spec.stage, "cutoff_len": p.spec.cutoff_len, "packing": p.spec.packs,
           "stats": stats.__dict__ if stats else None, "longest_untruncated": p.longest_untruncated,
           "histogram": p.histogram(), "notes": list(p.notes), "cached": p.cached, "seconds": round(p.seconds, 3)}
    if micro_batch is not None:
        out["worst_batch"] = p.worst_batch(micro_batch).__dict__
    return out
