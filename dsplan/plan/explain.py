"""Human output for plans: a rich table of tiers, the chosen tier's breakdown, the dataset, and why."""

from __future__ import annotations

from dsplan.plan.dataset import data_why_at_cutoff, plan_data, worst_tokens
from dsplan.plan.planner import Plan
from dsplan.units import GiB


def _gib(n: int | float) -> str:
    return f"{n / GiB:.1f}"


def _method(plan: Plan) -> str:
    """The method (with the LoRA rank), and the stage and its reference model unless plain SFT."""
    s, w = plan.settings, plan.workload
    text = s.method if s.adapter == "lora" else f"{s.method} ({s.adapter})"
    if s.method in ("lora", "qlora") and s.adapter == "lora":
        text += f" r{s.lora_rank}"
    if s.stage != "sft":
        loss = f" {s.pref_loss}" if s.stage == "dpo" else ""
        ref = {"adapter": ", reference: the base with adapters off", "copy": ", reference: a copy"}.get(w.reference, "")
        text += f", stage {s.stage}{loss}{ref}"
    return text


def print_plan(plan: Plan, file=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file, highlight=False, soft_wrap=True, width=max(100, Console(file=file).width))
    s, hw, m = plan.settings, plan.profile, plan.model
    console.print(f"[bold]{m.name}[/] ({m.total_params / 1e9:.2f}B) {_method(plan)}, cutoff {s.cutoff_len}, "
                  f"{s.precision}, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}")
    console.print(f"hardware: {hw.describe()}")
    host = f", host {_gib(plan.usable_host)} GiB/node" if plan.usable_host else ""
    console.print(f"usable per GPU: {_gib(plan.usable_gpu)} GiB ({plan.headroom:.0%} headroom){host}")
    table = Table(box=box.SIMPLE_HEAD)
    for col, just in (("tier", "left"), ("fits", "left"), ("GPU GiB", "right"), ("host GiB", "right"),
                      ("micro-batch x GA", "right"), ("speed rank", "right"), ("ladder", "left")):
        table.add_column(col, justify=just)
    for t in plan.tiers:
        fits = "[green]yes[/]" if t.fits else ("[red]no[/]" if t.fits_host else "[red]no (host)[/]")
        if t.refused:
            fits = "[red]refused (LF)[/]"
        mark = "[bold]>[/] " if t.tier.name == plan.choice else "  "
        pos = plan.ladder.index(t.tier.name) + 1 if t.tier.name in plan.ladder else None
        table.add_row(f"{mark}{t.tier.name}", fits, _gib(t.estimate.gpu_bytes), _gib(t.estimate.host_bytes),
                      f"{t.micro_batch} x {t.grad_accum}", str(t.tier.speed_rank), f"{pos}" if pos else "dropped")
    console.print(table)
    chosen = plan.chosen
    if chosen is not None:
        console.print(f"[bold]breakdown of {chosen.tier.name}[/] (per GPU):")
        width = max(len(k) for k in chosen.estimate.gpu)
        for k, v in sorted(chosen.estimate.gpu.items(), key=lambda kv: -kv[1]):
            if v:
                console.print(f"  {k:<{width}}  {_gib(v):>6} GiB")
        console.print(f"  {'total':<{width}}  {_gib(chosen.estimate.gpu_bytes):>6} GiB")
        for n in chosen.notes:
            console.print(f"  note: {n}")
    for line in dataset_lines(plan):
        console.print(line, markup=False)
    console.print("[bold]why[/]:")
    for line in plan.why:
        console.print(f"  - {line}")


def dataset_lines(plan: Plan) -> list[str]:
    """The dataset block: how its lengths were measured, their distribution and histogram, and the
    tokens of the worst micro-batch against cutoff_len x micro-batch (none without a dataset), at
    the plan's cutoff_len."""
    data = plan_data(plan)
    if data is None:
        return []
    names = ", ".join(data.spec.names)
    if data.at_cutoff:
        return [f"dataset {names}: {data_why_at_cutoff(data)}"]
    st = data.stats()
    lines = [f"dataset {names}: {st.count:,} samples, lengths from {data.how}",
             f"  {data.method_note}",
             f"  tokens per sample after the template: max {st.max:,}, p99 {st.p99:,}, median {st.median:,}, "
             f"mean {st.mean:,}; truncation to cutoff_len {data.spec.cutoff_len} cuts {st.truncated:,}"]
    lines += [f"  {row}" for row in data.histogram()]
    mb, tokens, at_cutoff = worst_tokens(plan)
    w = plan.workload
    rows = f"{mb} x 2 (chosen, rejected)" if w.sequences == 2 else f"{mb}"
    basis = "packed rows" if data.spec.packs else "worst batch"
    lines.append(f"  tokens per micro-batch: {tokens:,} ({basis}: {rows} x {w.seq_len:,}) vs cutoff_len x "
                 f"micro-batch = {at_cutoff:,}")
    return lines
