"""``dsplan run --preflight``: a short attempt on the longest samples, before the real run.

A run whose longest batch does not fit dies when the sampler reaches that batch,
perhaps hours in.  The preflight runs that batch first: an attempt at the same tier,
micro-batch, gradient accumulation and world size as the real attempt, for
``--preflight-steps`` optimizer steps (2 by default), on a dataset made of the
training data's longest samples.  The run loop (:mod:`dsplan.launch.loop`) treats
it as an attempt of its own (``"preflight": true`` in the ledger): an OOM falls
back as usual and the next configuration is preflighted again; a pass starts the
real run at that configuration.

The preflight dataset (:meth:`Preflight.write`), in ``attempt-NNN/preflight_data/``:

- **Rows.** Without packing, ``steps x grad_accum x micro_batch`` samples per rank,
  the longest first (cycled when the data has fewer).  ``disable_shuffling`` keeps
  LF's order, and accelerate gives rank ``k`` the ``k``-th micro-batch of each
  group of ``world_size``, so each block of ``micro_batch`` samples is written once
  per rank: every rank's first micro-batch is the data's ``micro_batch`` longest
  samples, the worst batch the real run can meet, on every rank at once.
- **Packing** (``packing``/``neat_packing``, and ``pt`` by default): LF pads every
  packed row to ``cutoff_len``, so the longest samples are taken until their tokens
  fill ``world_size x steps x grad_accum x micro_batch`` rows of ``cutoff_len``.
- **Format.** The rows are the source's own rows, written as JSON, with a
  ``dataset_info.json`` entry that keeps the source entry's ``formatting``,
  ``ranking``, ``columns`` and ``tags``, so LF reads them as it reads the source.
  Sources with different entries get one file each (then only the order inside each
  file is kept).  ``media_dir`` points at the source folder, so relative image,
  video and audio paths still resolve.

The attempt's YAML points ``dataset``/``dataset_dir`` there, sets ``max_steps``,
``save_strategy: "no"`` (no ``checkpoint-N`` for a later resume to find), no
evaluation, no trackers and no hub push, and drops the keys that would change the
rows (``max_samples``, ``val_size``, ``tokenized_path``, ``streaming``, ...).

When the data cannot be read (a hub dataset not in the local cache, no dataset,
``ppo``), :func:`load_preflight` raises a :class:`~dsplan.errors.UserError`: a
preflight on made-up samples would test dsplan's guess, not the data, so
``--preflight`` refuses (exit 2) before anything starts.

Standard library only at import; the lengths come from :mod:`dsplan.inputs.data`
(LF's own pipeline when the training Python is known, else the tokenizer estimate).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

from dsplan.errors import UserError, one_line, shorten
from dsplan.inputs.data import DataProfile, DataSpec, SampleRef, measure, read_samples
from dsplan.inputs.data.result import AT_CUTOFF as _AT_CUTOFF

#: Optimizer steps a preflight runs unless ``--preflight-steps`` says otherwise.
DEFAULT_STEPS = 2
#: The preflight's data folder inside its attempt folder.
DATA_DIR = "preflight_data"
#: The dataset_info.json entry (and file) name; several groups get ``_2``, ``_3``, ...
ENTRY = "dsplan_preflight"
#: The entry keys that decide how LF reads a row (the rest say where the rows are).
_READ_KEYS = ("formatting", "ranking", "columns", "tags")
#: Keys of the user's YAML a preflight drops: they change which rows train, or read
#: or write elsewhere.
DROPPED_KEYS = ("max_samples", "val_size", "eval_dataset", "tokenized_path", "streaming", "buffer_size",
                "interleave_probs", "resume_from_checkpoint", "load_best_model_at_end", "push_to_hub",
                "hub_model_id", "eval_steps")


@dataclass(frozen=True)
class PreflightData:
    """One preflight dataset as written: where, the names LF is given, and what it holds."""

    dataset_dir: Path
    names: list[str]
    rows: int  # rows written (a packed dataset packs them into fewer)
    distinct: int  # different samples among them
    longest: int  # tokens of the longest sample, after truncation


@dataclass
class Preflight:
    """What ``--preflight`` knows before the run starts: the data, its lengths, the step count."""

    spec: DataSpec
    profile: DataProfile
    steps: int
    entries: dict[str, dict]  # source dataset name -> its dataset_info.json entry
    media_dir: str | None  # where relative media paths of the source rows resolve
    _rows: dict[SampleRef, dict] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------ which samples
    def slots(self, micro_batch: int, grad_accum: int, world_size: int) -> int:
        """Rows (packed rows with packing) the preflight's optimizer steps consume."""
        return self.steps * grad_accum * micro_batch * world_size

    def pick(self, micro_batch: int, grad_accum: int, world_size: int) -> list[SampleRef]:
        """The rows of the preflight dataset, in the order LF should read them."""
        if self.spec.packs:
            return self._pick_packed(self.slots(micro_batch, grad_accum, world_size) * self.spec.cutoff_len)
        per_rank = self.steps * grad_accum * micro_batch
        ranked = _cycled(self.profile.longest(per_rank), per_rank)
        rows: list[SampleRef] = []
        for start in range(0, per_rank, micro_batch):
            rows += ranked[start:start + micro_batch] * world_size  # rank k reads the k-th block
        return rows

    def _pick_packed(self, tokens: int) -> list[SampleRef]:
        """The longest samples, cycled, until their lengths reach ``tokens``."""
        lengths = sorted(self.profile.row_lengths(), reverse=True)
        ranked = self.profile.longest(len(lengths))
        rows, total, i = [], 0, 0
        while total < tokens and ranked and lengths[0] > 0:
            rows.append(ranked[i % len(ranked)])
            total += lengths[i % len(ranked)]
            i += 1
        return rows

    def longest_tokens(self) -> int:
        return max(self.profile.row_lengths())

    # ------------------------------------------------------------ writing it
    def raw_rows(self, refs: list[SampleRef]) -> list[dict]:
        """The source rows ``refs`` name (read once, then kept)."""
        missing = sorted({r for r in refs if r not in self._rows}, key=lambda r: (r.dataset, r.row))
        if missing:
            self._rows.update(zip(missing, read_samples(self.spec, missing)))
        return [self._rows[r] for r in refs]

    def write(self, folder: Path, micro_batch: int, grad_accum: int, world_size: int) -> PreflightData:
        """Write the preflight dataset and its ``dataset_info.json`` into ``folder``."""
        refs = self.pick(micro_batch, grad_accum, world_size)
        groups = _groups(refs, self.entries)
        folder.mkdir(parents=True, exist_ok=True)
        info, names = {}, []
        for i, (entry, group) in enumerate(groups, 1):
            name = ENTRY if len(groups) == 1 else f"{ENTRY}_{i}"
            (folder / f"{name}.json").write_text(_dumps(self.raw_rows(group), name), encoding="utf-8")
            info[name] = {**entry, "file_name": f"{name}.json"}
            names.append(name)
        (folder / "dataset_info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
        return PreflightData(folder, names, len(refs), len(set(refs)), self.longest_tokens())

    def attempt_user(self, user: dict, attempt_dir: Path, micro_batch: int, grad_accum: int,
                     world_size: int) -> dict:
        """Write the attempt's preflight dataset; return the user's YAML for the preflight attempt."""
        data = self.write(attempt_dir / DATA_DIR, micro_batch, grad_accum, world_size)
        out = {k: v for k, v in user.items() if k not in DROPPED_KEYS}
        out.update(dataset=",".join(data.names), dataset_dir=str(data.dataset_dir), max_steps=self.steps,
                   save_strategy="no", disable_shuffling=True, do_eval=False, eval_strategy="no",
                   report_to="none", logging_steps=1, mix_strategy="concat", plot_loss=False)
        if self.media_dir:
            out["media_dir"] = self.media_dir
        return out

    def describe(self, micro_batch: int, grad_accum: int, world_size: int) -> str:
        """One line: what the preflight at this configuration trains on."""
        refs = self.pick(micro_batch, grad_accum, world_size)
        what = (f"{len(refs)} longest samples packed into rows of {self.spec.cutoff_len} tokens" if self.spec.packs
                else f"the {len(set(refs))} longest samples ({len(refs)} rows, every rank's first micro-batch "
                     f"the {micro_batch} longest)")
        return (f"preflight: {self.steps} optimizer step(s) on {what}; longest sample {self.longest_tokens()} "
                f"tokens ({self.profile.method}: {self.profile.method_note})")


def _cycled(refs: list[SampleRef], n: int) -> list[SampleRef]:
    """``refs`` repeated in order until there are ``n``."""
    return [refs[i % len(refs)] for i in range(n)] if refs else []


def _groups(refs: list[SampleRef], entries: dict[str, dict]) -> list[tuple[dict, list[SampleRef]]]:
    """``refs`` split by how LF reads their rows (the entry's read keys), in order of first use."""
    out: dict[str, tuple[dict, list[SampleRef]]] = {}
    for ref in refs:
        entry = mirror_entry(entries.get(ref.dataset, {}))
        out.setdefault(json.dumps(entry, sort_keys=True), (entry, []))[1].append(ref)
    return list(out.values())


def mirror_entry(entry: dict) -> dict:
    """The keys of a dataset_info.json entry that decide how LF reads a row."""
    return {k: entry[k] for k in _READ_KEYS if k in entry}


def _dumps(rows: list[dict], name: str) -> str:
    try:
        return json.dumps(rows, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise UserError(f"--preflight: the rows for {name} cannot be written as JSON ({e})") from None


# ---------------------------------------------------------------- before the run
def data_spec(settings, user: dict) -> DataSpec:
    """The data LF will read: the user's YAML with dsplan's merged settings on top."""
    args = dict(user)
    for key in ("dataset", "dataset_dir", "template", "cutoff_len", "stage", "packing", "neat_packing",
                "model_name_or_path"):
        args[key] = getattr(settings, key)
    return DataSpec.from_lf_args(args)


def training_python(lf_cli: str | None) -> str | None:
    """The Python that has LF: ``$DSPLAN_TRAIN_PYTHON``, else the one named on ``lf_cli``'s ``#!`` line."""
    if os.environ.get("DSPLAN_TRAIN_PYTHON"):
        return os.environ["DSPLAN_TRAIN_PYTHON"]
    try:
        with open(lf_cli or "", "rb") as f:
            head = f.readline(512).decode("utf-8", "replace")
    except OSError:
        return None
    if not head.startswith("#!") or "python" not in head:
        return None
    words = head[2:].split()
    cand = words[1] if os.path.basename(words[0]) == "env" and len(words) > 1 else words[0]
    found = cand if os.path.isabs(cand) else shutil.which(cand)
    return found if found and os.access(found, os.X_OK) else None


def _entries(spec: DataSpec) -> dict[str, dict]:
    """Each named dataset's dataset_info.json entry ({} where there is none: LF's defaults)."""
    path = Path(spec.dataset_dir) / "dataset_info.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    return {n: dict(info.get(n) or {}) if isinstance(info, dict) else {} for n in spec.names}


def load_preflight(settings, user: dict, steps: int, lf_cli: str | None, profile: DataProfile | None = None,
                   say=None) -> Preflight:
    """What ``--preflight`` needs, from ``profile`` (the plan's measurement of the data) or measured
    here; a :class:`UserError` when the data's samples cannot be read."""
    if profile is None:
        spec = data_spec(settings, user)
        python = training_python(lf_cli)
        if say is not None:
            how = "LLaMA-Factory's own pipeline" if python else "the tokenizer estimate"
            say(f"dsplan run: --preflight: measuring the token lengths of {shorten(spec.dataset, 80)} ({how})")
        profile = measure(spec, python=python)
    spec = profile.spec
    if not profile.at_cutoff and not profile.longest(1):  # LF's lengths could not be mapped to rows
        profile = measure(spec, engine="tokenizer")
    if profile.refused:
        raise UserError(one_line(f"--preflight: dataset {shorten(spec.dataset, 80)}: {profile.refused}"))
    if profile.at_cutoff or not profile.longest(1):
        why = profile.cutoff_reason if profile.at_cutoff else "its lengths could not be matched to its rows"
        raise UserError(one_line(f"--preflight needs the training data's own samples, and "
                                 f"{why.removeprefix(_AT_CUTOFF).removeprefix(': ')}; "
                                 "make the dataset local, or run without --preflight"))
    pf = Preflight(spec, profile, steps, _entries(spec), _media_dir(spec, user))
    pf.raw_rows(pf.pick(settings.micro_batch, settings.grad_accum, 1))  # readable and JSON now, not mid-run
    for name in spec.names:
        _dumps([pf._rows[r] for r in pf._rows if r.dataset == name], name)
    return pf


def _media_dir(spec: DataSpec, user: dict) -> str | None:
    """Where the source rows' relative media paths resolve: LF's ``media_dir``, else the dataset folder."""
    given = user.get("media_dir")
    if given:
        return os.path.abspath(str(given))
    if spec.dataset_dir == "ONLINE" or spec.dataset_dir.startswith("REMOTE:"):
        return None
    return spec.dataset_dir


def with_data(settings, user_keys: dict):
    """The settings of a preflight attempt: its dataset and folder (dsplan writes those keys)."""
    return replace(settings, dataset=user_keys["dataset"], dataset_dir=user_keys["dataset_dir"])


def dry_run_lines(pf: Preflight, config: str, micro_batch: int, grad_accum: int, world_size: int,
                  attempt_dir: str) -> list[str]:
    """``--dry-run``: the preflight attempt that comes first."""
    one = len(_groups(pf.pick(micro_batch, grad_accum, world_size), pf.entries)) == 1
    name = ENTRY if one else f"{ENTRY}_1, {ENTRY}_2, ..."
    files = f"{ENTRY}.json" if one else f"{ENTRY}_N.json (one per way the sources are read)"
    yaml_keys = f"dataset {name}, max_steps {pf.steps}, save_strategy no, disable_shuffling"
    return [f"attempt 1: preflight at {config}",
            f"  {pf.describe(micro_batch, grad_accum, world_size)}",
            f"  files: {attempt_dir}/{DATA_DIR}/dataset_info.json, {files}; its YAML: {yaml_keys}",
            "  then: on an OOM, fall back and preflight the next configuration; when it passes, the real run"]
