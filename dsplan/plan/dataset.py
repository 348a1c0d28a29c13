"""The dataset in the plan: the worst real micro-batch, and what planning for it changes.

One job: turn the :class:`~dsplan.inputs.data.DataProfile` that request resolution measured
into the sequence length the estimate plans at (:func:`data_seq_len`, read into
:attr:`~dsplan.estimate.workload.Workload.data_len`), and say what that changed against
planning at ``cutoff_len`` (:func:`data_why`, :func:`dataset_json`).

The worst micro-batch is the one that holds the longest sample after truncation: LF's
collators pad every row of a batch to its longest row (:func:`~dsplan.inputs.data.result.padded`:
a multiple of 8, except pt's), so at micro-batch b it is b rows of that length, whatever b
is; the planner's micro-batch search multiplies it by each candidate.  Where LF packs (pt,
and sft with ``packing``/``neat_packing``: :attr:`~dsplan.inputs.data.DataSpec.packs`)
every row is ``cutoff_len``.  Pairs (rm, dpo) are 2b rows, padded to the longer of chosen
and rejected.  KTO's KL batch pairs each prompt with another sample's response, so its rows
may be longer than any real sample: they are planned at twice the longest sample, at most
``cutoff_len``.  A lower cutoff (``--allow-cutoff``) only truncates further, so the same
lengths answer it without measuring again (:func:`plan_data` shows them at the plan's cutoff).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dsplan.inputs.data.result import AT_CUTOFF, padded
from dsplan.units import GiB

if TYPE_CHECKING:
    from dsplan.inputs.data import DataProfile
    from dsplan.plan.planner import Plan

#: A worst batch below this fraction of cutoff_len x micro-batch is far below it: the plan says what that frees.
FAR_BELOW = 0.75


def data_seq_len(data: DataProfile | None, cutoff_len: int) -> int | None:
    """Tokens every row of the worst micro-batch is padded to at ``cutoff_len`` (at most the
    profile's own cutoff); None plans at ``cutoff_len``: no dataset, or its lengths unknown."""
    if data is None or data.at_cutoff:
        return None
    spec = data.spec
    if spec.packs:
        return padded(cutoff_len, spec.stage)
    seq = data.worst_batch(1).seq_len
    if spec.stage == "kto":
        seq = padded(min(2 * max(data.row_lengths()), spec.cutoff_len), spec.stage)
    return min(seq, padded(cutoff_len, spec.stage))


def plan_data(plan: Plan) -> DataProfile | None:
    """The plan's dataset at the plan's own ``cutoff_len``: lower than the one it was measured at
    when ``--allow-cutoff`` lowered it (None: no dataset)."""
    return plan.data.at_cutoff_len(plan.settings.cutoff_len) if plan.data is not None else None


def data_why_at_cutoff(data: DataProfile) -> str:
    """The one line that says why a dataset left the plan at cutoff_len (the block and ``why`` both show it)."""
    reason = data.cutoff_reason
    return reason if reason.startswith(AT_CUTOFF) else f"{AT_CUTOFF}: {reason}"


# ---------------------------------------------------------------- what it changed
def worst_tokens(plan: Plan) -> tuple[int, int, int]:
    """(micro-batch, tokens of its worst batch, cutoff_len x micro-batch) at the plan's micro-batch;
    pairs count their chosen and rejected rows."""
    w = plan.workload
    mb = plan.chosen.micro_batch if plan.chosen else w.micro_batch
    rows = mb * w.sequences
    return mb, rows * w.seq_len, rows * plan.settings.cutoff_len


def _freed(plan: Plan) -> int | None:
    """GPU bytes the chosen tier needs less at its micro-batch than at cutoff_len (None: not compared)."""
    from dsplan.plan.planner import estimate_at

    base, tp = plan.cutoff_plan, plan.chosen
    if base is None or tp is None:
        return None
    return estimate_at(base, tp.tier.name, tp.micro_batch).gpu_bytes - tp.estimate.gpu_bytes


def _faster(plan: Plan) -> str | None:
    """What the data lets run that planning at cutoff_len would not have chosen (None: the same)."""
    base, tp = plan.cutoff_plan, plan.chosen
    if base is None or tp is None:
        return None
    now = f"micro-batch {tp.micro_batch} x GA {tp.grad_accum}"
    if base.chosen is None:
        return f"at cutoff_len nothing would fit; the worst real batch fits {tp.tier.name} ({now})"
    b = base.chosen
    then = f"micro-batch {b.micro_batch} x GA {b.grad_accum}"
    if b.tier.speed_rank > tp.tier.speed_rank:
        return (f"faster tier: {tp.tier.name} fits the worst real batch ({now}); planning at cutoff_len "
                f"would start at {b.tier.name} ({then})")
    if b.micro_batch < tp.micro_batch:
        return (f"larger micro-batch: {tp.tier.name} fits the worst real batch at {now}; planning at "
                f"cutoff_len would lower it to {then}")
    return None


def data_why(plan: Plan) -> list[str]:
    """The plan's lines about the dataset: where the token count came from and what it frees."""
    data = plan_data(plan)
    if data is None:
        return []
    if data.at_cutoff:
        return [data_why_at_cutoff(data)] + [f"dataset: {n}" for n in data.notes if n != data.cutoff_reason]
    notes = [f"dataset: {n}" for n in data.notes]
    mb, tokens, at_cutoff = worst_tokens(plan)
    if data.spec.packs:
        return [f"packing: every sequence is cutoff_len ({plan.settings.cutoff_len}); planned at "
                f"{tokens:,} tokens per micro-batch"] + notes
    lines = [f"planned for the worst real batch ({data.how}): {tokens:,} tokens per micro-batch "
             f"vs cutoff_len x micro-batch = {at_cutoff:,}"]
    if plan.workload.stage == "kto":
        lines.append("kto: the KL batch pairs prompts with other samples' responses; its rows are planned at "
                     "twice the longest sample, at most cutoff_len")
    freed, faster = _freed(plan), _faster(plan)
    if tokens < FAR_BELOW * at_cutoff and freed is not None:
        lines.append(f"the worst real batch is {tokens / at_cutoff:.0%} of cutoff_len x micro-batch: it frees "
                     f"{freed / GiB:.1f} GiB per GPU at {plan.choice} against planning at cutoff_len")
    if faster:
        lines.append(faster)
    return lines + notes


def dataset_json(plan: Plan) -> dict | None:
    """``plan --json``'s ``dataset``: the profile at the plan's micro-batch, what the estimate planned
    and the comparison with planning at cutoff_len."""
    data = plan_data(plan)
    if data is None:
        return None
    mb, tokens, at_cutoff = worst_tokens(plan)
    out = data.to_json(mb)
    out["planned"] = {"micro_batch": mb, "seq_len": plan.workload.seq_len, "tokens": tokens,
                      "cutoff_tokens": at_cutoff, "basis": "cutoff" if plan.workload.data_len is None
                      else out["worst_batch"]["basis"]}
    base = plan.cutoff_plan
    if base is not None:
        out["at_cutoff"] = {"choice": base.choice, "micro_batch": base.chosen.micro_batch if base.chosen else None,
                            "grad_accum": base.chosen.grad_accum if base.chosen else None,
                            "freed_gpu_bytes": _freed(plan)}
    return out
