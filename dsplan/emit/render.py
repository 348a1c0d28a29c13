"""Render: DeepSpeed JSON per tier and the LLaMA-Factory YAML that points at it.

Templates in ``templates/`` hold the layout; this module decides every key and
number.  Rendering is pure (it returns ``{path: text}``); writing is a separate,
atomic step, so a user error found while rendering leaves nothing on disk.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from dsplan import __version__
from dsplan.errors import UserError, excerpt, one_line
from dsplan.fsutil import check_path_text, resource_dir
from dsplan.inputs.hardware import HardwareProfile
from dsplan.inputs.model import ModelSpec
from dsplan.inputs.settings import TrainSettings
from dsplan.plan.tiers import Tier, TierConfig
from dsplan.schema import lf

MANIFEST = "dsplan.json"


def ds_filename(tier: Tier) -> str:
    return f"ds_{tier.name}.json"


def lf_filename(tier: Tier) -> str:
    return f"lf_{tier.name}.yaml"


# ---------------------------------------------------------------- templates
_PLAIN_RE = re.compile(r"^[A-Za-z_/][A-Za-z0-9_./-]*$")
#: Words YAML 1.1 (PyYAML) reads as something other than a string.
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null", "~"}


def _yaml_scalar(value) -> str:
    """One value as safe YAML on a single line (flow style for lists/maps).  Plain words,
    booleans and integers take a fast path; everything else goes through PyYAML, with every
    non-ASCII character escaped when the value holds one that is not printable (U+0085 and
    U+2028 would otherwise be read back as line breaks)."""
    if value is True or value is False:
        return "true" if value else "false"
    if type(value) is int:
        return str(value)
    if isinstance(value, str) and _PLAIN_RE.match(value) and value.lower() not in _YAML_WORDS:
        return value
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=_printable(value), width=float("inf"),
                          sort_keys=False)
    if text.endswith("\n...\n"):
        text = text[: -len("\n...\n")]
    return text.rstrip("\n")


def _printable(value) -> bool:
    """Whether every string inside ``value`` (keys included) is printable text."""
    if isinstance(value, str):
        return value.isprintable()
    if isinstance(value, dict):
        return all(_printable(k) and _printable(v) for k, v in value.items())
    if isinstance(value, (list, tuple, set)):
        return all(_printable(v) for v in value)
    return True


def _comment(value) -> str:
    """Text for a ``#`` comment: one line, whitespace collapsed, anything unprintable escaped."""
    return one_line(" ".join(str(value).split()))


def _same(a, b) -> bool:
    """Equal and of the same types all the way down (1 is not True), NaN equal to NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def check_round_trip(text: str, values: dict, where: str) -> None:
    """Refuse a rendered YAML that would not read back as exactly ``values``."""
    try:
        back = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 -- safe loaders
    except yaml.YAMLError:
        back = None
    if not isinstance(back, dict):
        raise UserError(f"{where}: the rendered YAML does not parse; a value cannot be written safely")
    for key, value in values.items():
        if key not in back or not _same(back[key], value):
            raise UserError(f"{where}: {excerpt(key)}: the value {excerpt(value)} cannot be written as YAML "
                            "that reads back the same")
    if len(back) != len(values):
        raise UserError(f"{where}: the rendered YAML has keys that were not asked for")


@lru_cache(maxsize=1)
def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["yaml"] = _yaml_scalar
    env.filters["comment"] = _comment
    return env


def render_deepspeed(tc: TierConfig) -> str:
    """One tier's DeepSpeed JSON: the tier's :class:`~dsplan.schema.ds.DsConfig` laid out by the template."""
    return _env().get_template("deepspeed.json.j2").render(ds=tc.ds)


# ---------------------------------------------------------------- LF YAML
def _rule_value(name: str, settings: TrainSettings, tc: TierConfig, ds_path: str):
    """Values decided by a rule rather than read from settings or the schema's default."""
    adapters = settings.method in ("lora", "qlora")
    rules = {
        "deepspeed": ds_path,
        "per_device_train_batch_size": tc.micro_batch,
        "gradient_accumulation_steps": tc.grad_accum,
        "learning_rate": 1.0e-4 if adapters else 1.0e-5,
        "bf16": True if settings.precision == "bf16" else None,  # fp32 is LF's default: neither key
        "fp16": True if settings.precision == "fp16" else None,
        "quantization_method": settings.quantization_method if settings.quantization_bit else None,
    }
    # LF reads lora_target for OFT too; lora_rank only for LoRA.
    if (name == "lora_rank" and settings.finetuning_type != "lora") or (name == "lora_target" and not adapters):
        return None
    return rules.get(name, _MISSING)


_MISSING = object()


def lf_values(settings: TrainSettings, tc: TierConfig, ds_path: str) -> dict:
    """The keys dsplan writes for one tier (before the user's own keys are merged in), in table order."""
    values: dict = {}
    for key in lf.KEYS:
        if key.section is None:
            continue
        value = _rule_value(key.name, settings, tc, ds_path)
        if value is _MISSING:
            value = getattr(settings, key.field) if key.field else key.default
        if value is not None:
            values[key.name] = value
    return values


def merge_lf(user: dict, ours: dict) -> tuple[dict, list[str]]:
    """Merge the user's YAML with dsplan's values.  The user's keys win except managed
    and settings-derived keys; returns the merged dict and a list of what changed."""
    merged: dict = {}
    changes: list[str] = []
    for key, value in ours.items():
        row = lf.BY_NAME[key]
        if key in user and not row.managed and not row.settings_derived:
            merged[key] = user[key]  # plain defaults (learning_rate, report_to, ...) yield to the user
        else:
            merged[key] = value
    quantized = "quantization_bit" in ours
    for key, value in user.items():
        if key in ("quantization_bit", "quantization_method") and not quantized and value is not None:
            changes.append(f"{key}: {excerpt(value, 200)} -> removed (only LoRA can train on a quantized "
                           "model)")
            continue
        if key in merged:
            if merged[key] != value:
                changes.append(f"{key}: {excerpt(value, 200)} -> {excerpt(merged[key], 200)}")
        elif key in lf.MANAGED:
            changes.append(f"{key}: {excerpt(value, 200)} -> removed")
        else:
            merged[key] = value
    return merged, changes


def _sectioned(values: dict, user_keys: set[str]) -> list[tuple[str, list[tuple[str, object]]]]:
    placed: set[str] = set()
    out = []
    for title in lf.SECTIONS:
        items = [(k, values[k]) for k in lf.section_keys(title) if k in values]
        placed.update(k for k, _ in items)
        out.append((title, items))
    rest = [(k, v) for k, v in values.items() if k not in placed]
    out.append(("kept from your YAML" if user_keys else "other", rest))
    return out


def render_lf_yaml(profile: HardwareProfile, model: ModelSpec, settings: TrainSettings, tc: TierConfig,
                   ds_path: str, user: dict) -> tuple[str, list[str]]:
    values, changes = merge_lf(user, lf_values(settings, tc, ds_path))
    text = _env().get_template("llamafactory.yaml.j2").render(
        version=__version__,
        hardware=profile.describe(),
        model=f"{model.name} ({model.total_params / 1e9:.2f}B params)",
        tier=tc.tier,
        notes=tc.notes,
        sections=_sectioned(values, set(user)),
    )
    check_round_trip(text, values, lf_filename(tc.tier))
    return text, changes


# ---------------------------------------------------------------- the bundle
@dataclass
class Bundle:
    """The files of one render, not yet written."""

    files: dict[Path, str]
    changes: list[str]
    manifest: dict


def render_bundle(profile: HardwareProfile, model: ModelSpec, settings: TrainSettings,
                  tier_configs: list[TierConfig], out_dir: Path, user: dict | None = None,
                  extra_manifest: dict | None = None) -> Bundle:
    """Render every tier's DeepSpeed JSON and LF YAML, plus the manifest ``dsplan.json``."""
    user = user or {}
    tier_configs = _accepted(tier_configs)
    out_dir = out_dir.resolve()
    check_path_text(str(out_dir), "output folder")
    files: dict[Path, str] = {}
    changes: list[str] = []
    entries = []
    for tc in tier_configs:
        ds_path = out_dir / ds_filename(tc.tier)
        lf_path = out_dir / lf_filename(tc.tier)
        files[ds_path] = render_deepspeed(tc)
        files[lf_path], tier_changes = render_lf_yaml(profile, model, settings, tc, str(ds_path), user)
        for c in tier_changes:
            if c.startswith("deepspeed:"):
                c = f"deepspeed: {excerpt(user.get('deepspeed'), 200)} -> the tier's file"
            if c not in changes:
                changes.append(c)
        entries.append({
            "tier": tc.tier.name,
            "deepspeed": ds_path.name,
            "lf_yaml": lf_path.name,
            "micro_batch": tc.micro_batch,
            "grad_accum": tc.grad_accum,
            "ds_knobs": tc.ds.to_dict(),
            "notes": list(tc.notes),
        })
    manifest = {
        "dsplan_version": __version__,
        "hardware": profile.to_dict(),
        "model": model.to_dict(),
        "settings": asdict(settings),
        "tiers": entries,
        "changes": changes,
        **(extra_manifest or {}),
    }
    files[out_dir / MANIFEST] = json.dumps(manifest, indent=2) + "\n"
    return Bundle(files=files, changes=changes, manifest=manifest)


def _accepted(tier_configs: list[TierConfig]) -> list[TierConfig]:
    """The tiers LLaMA-Factory accepts; one line when every tier asked for is refused."""
    kept = [tc for tc in tier_configs if tc.refused is None]
    if not kept and tier_configs:
        tc = tier_configs[0]
        which = f"--tier {tc.tier.name}" if len(tier_configs) == 1 else "every tier asked for"
        raise UserError(f"{which}: refused by LLaMA-Factory for this config: {tc.refused}")
    return kept


def render_plan(plan, tier_configs: list[TierConfig], out_dir: Path, user: dict | None = None,
                settings: TrainSettings | None = None) -> Bundle:
    """:func:`render_bundle` for a plan's hardware and model, with the plan's choice and ladder in the manifest."""
    return render_bundle(plan.profile, plan.model, settings or plan.settings, tier_configs, out_dir, user,
                         extra_manifest={"plan": {"choice": plan.choice, "ladder": plan.ladder,
                                                  "warnings": list(plan.warnings)}})


def describe_render(plan, written: list[Path], changes: list[str]) -> list[str]:
    """What ``dsplan render`` tells a person: the plan in one line, the files, what changed in their YAML."""
    lines = [f"dsplan render: {plan.model.name} {plan.settings.method} on {plan.profile.describe()}"]
    if plan.choice:
        lines.append(f"plan: start with {plan.choice}; fallback ladder {' -> '.join(plan.ladder)} "
                     "(details: dsplan plan)")
    else:
        lines.append("plan: no tier is estimated to fit (see dsplan plan); every tier rendered anyway")
    lines += [f"  wrote {p}" for p in written]
    lines += [f"  {t.tier.name} is refused by LLaMA-Factory (not written): {t.refused}" for t in plan.tiers
              if t.refused]
    lines += [f"warning: {w}" for w in plan.warnings]
    if changes:
        lines.append("changed in your YAML (memory knobs dsplan manages, or flags you gave):")
        lines += [f"  {c}" for c in changes]
    return lines
