"""Plan every one of LLaMA-Factory's own example YAMLs with ``dsplan plan`` and sort the outcomes.

The examples are copies of LF's ``examples/train_lora``, ``train_full``, ``train_qlora`` and
``extras`` from two points of its history (``tests/data/lf_examples/<version>/``, see the
README there).  Each is planned as a new user would: ``dsplan plan EXAMPLE --gpus G --json``,
in this process, from a scratch working folder, with ``HF_HUB_CACHE`` (and ``HF_HOME``,
``XDG_CACHE_HOME``, ``HOME``) pointed into it so that no cache of this machine is read.

The models an example names come from dsplan's catalog, or, for those the catalog does not
hold, from ``tests/data/lf_examples/models.json``: a catalog entry's config plus the keys it
sets, put in the scratch hub cache or at the local path the YAML names.  ``--bare`` leaves
those out (what a user with an empty cache sees).

Outcomes:
  ok            exit 0 with a choice, and no chosen or laddered tier marked refused by LF
  not-training  exit 2, "not a training config" (predict/eval/export YAMLs, LF's token lists)
  lf-refuses    exit 2, LF 0.9.5 itself refuses the config for every DeepSpeed tier
  unknown-key   exit 2, a key LF 0.9.5's parser refuses (an older LF's example)
  no-config     exit 2, the model's config.json is nowhere to be found (says where to put it)
  no-fit        exit 4, no tier fits
  failure       anything else: another exit, more than one line, a refused tier on the ladder

Usage: python scripts/sweep_lf_examples.py [--gpus 1x80G --gpus 8x80G] [--bare] [--json]
Exit status: 0 when there is no ``failure``, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

EXAMPLES = REPO / "tests" / "data" / "lf_examples"
MODELS_FILE = EXAMPLES / "models.json"
DEFAULT_GPUS = ("1x80G", "8x80G")
#: The snapshot folder the scratch hub cache uses (any commit-like name; refs/main points at it).
SNAPSHOT = "0" * 40

#: stderr text -> outcome, for exit 2 (first match wins).
_EXIT2 = (
    ("not a training config", "not-training"),
    ("not a LLaMA-Factory training config", "not-training"),
    ("refuses every DeepSpeed tier", "lf-refuses"),
    ("refuses this config", "lf-refuses"),
    ("unknown key", "unknown-key"),
    ("in the Hugging Face cache: put its config.json", "no-config"),
)


@dataclass
class Row:
    """One example planned on one GPU spec."""

    example: str  # path under tests/data/lf_examples
    gpus: str
    outcome: str
    code: int
    choice: str | None = None
    ladder: list[str] = field(default_factory=list)
    refused_on_ladder: list[str] = field(default_factory=list)
    message: str = ""


def example_files(root: Path = EXAMPLES) -> list[Path]:
    """Every copied example YAML, sorted."""
    return sorted(p for p in root.rglob("*.yaml") if p.is_file())


def load_models(path: Path = MODELS_FILE) -> dict[str, dict]:
    """models.json without its ``_about`` note."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in data.items() if not k.startswith("_")}


def model_config(entry: dict) -> dict:
    """The config.json a models.json entry stands for: its catalog entry's config with ``set`` applied."""
    from dsplan.inputs.catalog import CATALOG

    cfg = copy.deepcopy(CATALOG[entry["catalog"]]["config"])
    cfg.update(copy.deepcopy(entry.get("set", {})))
    return cfg


def build_workspace(root: Path, models: dict[str, dict] | None = None) -> dict[str, str]:
    """Make ``root/work`` (the working folder) and ``root/hub`` (the hub cache) with the models'
    config.json in place; returns the environment that points every cache lookup into ``root``."""
    work, hub = root / "work", root / "hub"
    work.mkdir(parents=True, exist_ok=True)
    hub.mkdir(parents=True, exist_ok=True)
    for name, entry in (models or {}).items():
        if entry["place"] == "hub":
            repo = hub / ("models--" + name.replace("/", "--"))
            folder = repo / "snapshots" / SNAPSHOT
            (repo / "refs").mkdir(parents=True, exist_ok=True)
            (repo / "refs" / "main").write_text(SNAPSHOT)
        elif entry["place"] == "folder":
            folder = work / name
        else:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(model_config(entry), indent=1))
    return {"HF_HUB_CACHE": str(hub), "HUGGINGFACE_HUB_CACHE": str(hub), "HF_HOME": str(root / "hf_home"),
            "XDG_CACHE_HOME": str(root / "xdg_cache"), "XDG_CONFIG_HOME": str(root / "xdg_config"),
            "HOME": str(root / "home"), "DSPLAN_PRESETS": ""}


@contextlib.contextmanager
def working_folder(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _runner():
    from click.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)  # click < 8.2
    except TypeError:
        return CliRunner()


def invoke_plan(example: Path, gpus: str, env: dict[str, str]) -> tuple[int, str, str]:
    """``dsplan plan EXAMPLE --gpus GPUS --json`` in this process: (exit code, stdout, stderr)."""
    from dsplan.cli import cli

    r = _runner().invoke(cli, ["plan", str(example), "--gpus", gpus, "--json"], prog_name="dsplan", env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        return -1, r.stdout, f"{type(r.exception).__name__}: {r.exception}"
    return r.exit_code, r.stdout, r.stderr


def classify(example: str, gpus: str, code: int, stdout: str, stderr: str) -> Row:
    """Sort one plan's result into an outcome (see the module's doc)."""
    lines = stderr.strip().splitlines()
    message = lines[-1] if lines else ""
    row = Row(example, gpus, "failure", code, message=message)
    if code == 0:
        try:
            data = json.loads(stdout)
        except ValueError:
            row.message = "exit 0 without a JSON plan"
            return row
        row.choice, row.ladder = data.get("choice"), list(data.get("ladder") or [])
        tiers = {t["tier"]: t for t in data.get("tiers", [])}
        kept = {row.choice, *row.ladder} - {None}
        row.refused_on_ladder = sorted(t for t in kept if tiers.get(t, {}).get("refused_by_lf"))
        ok = row.choice is not None and not row.refused_on_ladder
        row.outcome = "ok" if ok else "failure"
        row.message = "" if ok else f"refused by LF on the ladder: {', '.join(row.refused_on_ladder) or 'no choice'}"
        return row
    if code == 4:
        row.outcome = "no-fit"
    elif code == 2 and len(lines) == 1:
        row.outcome = next((out for text, out in _EXIT2 if text in message), "failure")
    return row


def sweep(gpus_list=DEFAULT_GPUS, bare: bool = False, files: list[Path] | None = None) -> list[Row]:
    """Plan every example on every GPU spec from a scratch workspace; one Row each."""
    files = example_files() if files is None else files
    with tempfile.TemporaryDirectory(prefix="dsplan-lf-examples-") as tmp:
        env = build_workspace(Path(tmp), None if bare else load_models())
        rows = []
        with working_folder(Path(tmp) / "work"):
            for path in files:
                name = path.relative_to(EXAMPLES).as_posix() if path.is_relative_to(EXAMPLES) else str(path)
                for gpus in gpus_list:
                    rows.append(classify(name, gpus, *invoke_plan(path, gpus, env)))
    return rows


OUTCOMES = ("ok", "not-training", "lf-refuses", "unknown-key", "no-config", "no-fit", "failure")


def counts(rows: list[Row]) -> dict[str, int]:
    return {o: sum(r.outcome == o for r in rows) for o in OUTCOMES}


def table(rows: list[Row]) -> str:
    """One line per example and GPU spec, then the counts."""
    width = max((len(r.example) for r in rows), default=10)
    out = [f"{'example':<{width}}  {'gpus':<7} {'outcome':<13} {'exit':>4}  choice / ladder or message"]
    for r in rows:
        detail = f"{r.choice} / {' > '.join(r.ladder)}" if r.outcome == "ok" else r.message
        out.append(f"{r.example:<{width}}  {r.gpus:<7} {r.outcome:<13} {r.code:>4}  {detail[:160]}")
    n = len({r.example for r in rows})
    out.append("")
    out.append(f"{n} examples x {len({r.gpus for r in rows})} GPU specs = {len(rows)} plans: "
               + ", ".join(f"{o} {c}" for o, c in counts(rows).items()))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", action="append", help=f"GPU spec, repeatable (default: {', '.join(DEFAULT_GPUS)})")
    ap.add_argument("--bare", action="store_true", help="no models.json configs: an empty HF cache")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args(argv)
    rows = sweep(tuple(args.gpus or DEFAULT_GPUS), bare=args.bare)
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else table(rows))
    return 1 if any(r.outcome == "failure" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
