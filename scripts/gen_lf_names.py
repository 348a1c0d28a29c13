"""Write dsplan/schema/lf_names.py: the argument names LLaMA-Factory's training parser accepts.

Login nodes have no LLaMA-Factory, yet dsplan must refuse a YAML key LF would refuse
at launch.  So the names are shipped as data, and this script regenerates them from
the installed stack (the ``train`` extra):

- every init field of the dataclasses ``llamafactory.hparams.parser._TRAIN_ARGS``
  hands to ``HfArgumentParser.parse_dict`` (ModelArguments, DataArguments, LF's
  TrainingArguments, FinetuningArguments, GeneratingArguments), plus the fields of
  transformers' ``Seq2SeqTrainingArguments`` that LF's TrainingArguments extends;
- the names only ``llamafactory-cli eval`` takes (``EvaluationArguments``), so dsplan
  can say "not a training config" instead of "unknown key";
- transformers' ``OptimizerNames`` (the values ``optim`` accepts);
- the ``model_type`` values LF's ``apply_liger_kernel`` patches;
- the chat template names LF registers (``llamafactory.data.template.TEMPLATES``), the
  values ``template`` accepts;
- the training arguments of the oldest transformers LF 0.9.5 supports (4.55) that the
  installed one no longer has: valid on some supported stacks, so dsplan warns rather
  than refuses.  ``--older WHEEL`` reads them from that transformers wheel's source
  (``pip download transformers==4.55.4 --no-deps``), without importing it; without
  the option the block already shipped is kept.

Run with the training venv: ``.venv/bin/python scripts/gen_lf_names.py`` (``--check``
exits 1 when the shipped file is out of date).  ``tests/test_stages.py`` runs the
check when LF is installed.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import re
import sys
import zipfile
from pathlib import Path

TARGET = Path(__file__).resolve().parents[1] / "dsplan" / "schema" / "lf_names.py"


def _init_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def collect() -> dict:
    """The names, read from the installed llamafactory and transformers."""
    import llamafactory
    import transformers
    from llamafactory.data.template import TEMPLATES
    from llamafactory.hparams import EvaluationArguments
    from llamafactory.hparams.parser import _TRAIN_ARGS
    from llamafactory.model.model_utils import liger_kernel
    from transformers import Seq2SeqTrainingArguments
    from transformers.training_args import OptimizerNames

    train: set[str] = _init_fields(Seq2SeqTrainingArguments)
    for cls in _TRAIN_ARGS:
        train |= _init_fields(cls)
    source = inspect.getsource(liger_kernel.apply_liger_kernel)
    liger = set(re.findall(r'model_type == "(\w+)"', source))
    for group in re.findall(r"model_type in \[([^\]]*)\]", source):
        liger |= set(re.findall(r'"(\w+)"', group))
    return {
        "LF_VERSION": llamafactory.__version__,
        "TRANSFORMERS_VERSION": transformers.__version__,
        "TRAIN_KEYS": sorted(train),
        "EVAL_ONLY_KEYS": sorted(_init_fields(EvaluationArguments) - train),
        "OPTIM_NAMES": [o.value for o in OptimizerNames],
        "LIGER_MODEL_TYPES": sorted(liger),
        "TEMPLATE_NAMES": sorted(TEMPLATES),
    }


def _dataclass_fields(source: str, cls: str) -> set[str]:
    """The init fields of dataclass ``cls`` in ``source``, read from its syntax tree."""
    out: set[str] = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    call = stmt.value if isinstance(stmt.value, ast.Call) else None
                    no_init = call is not None and any(k.arg == "init" and getattr(k.value, "value", True) is False
                                                       for k in call.keywords)
                    if not no_init:
                        out.add(stmt.target.id)
    return out


def older_transformers(wheel: Path, current: list[str]) -> dict:
    """The training arguments of an older transformers wheel that ``current`` lacks."""
    with zipfile.ZipFile(wheel) as z:
        version = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        version = re.search(r"^Version: (\S+)", z.read(version).decode(), re.M).group(1)
        names = _dataclass_fields(z.read("transformers/training_args.py").decode(), "TrainingArguments")
        names |= _dataclass_fields(z.read("transformers/training_args_seq2seq.py").decode(),
                                   "Seq2SeqTrainingArguments")
    return {"OLDER_TRANSFORMERS_VERSION": version, "OLDER_TRANSFORMERS_ONLY_KEYS": sorted(names - set(current))}


def shipped_older() -> dict:
    """The older-transformers block of the shipped file (kept when no wheel is given)."""
    from dsplan.schema import lf_names

    return {"OLDER_TRANSFORMERS_VERSION": lf_names.OLDER_TRANSFORMERS_VERSION,
            "OLDER_TRANSFORMERS_ONLY_KEYS": list(lf_names.OLDER_TRANSFORMERS_ONLY_KEYS)}


def _tuple(name: str, values: list[str], doc: str) -> list[str]:
    lines = [f"#: {doc}", f"{name}: tuple[str, ...] = ("]
    lines += [f"    {v!r}," for v in values]
    return lines + [")", ""]


def render(names: dict) -> str:
    """The module text for ``names``."""
    out = [
        '"""LLaMA-Factory\'s training argument names, as data (generated: do not edit).',
        "",
        "Written by ``scripts/gen_lf_names.py`` from the installed llamafactory and",
        "transformers, so that login nodes without them can still refuse a key LF would",
        'refuse.  Standard library only."""',
        "",
        f"LF_VERSION = {names['LF_VERSION']!r}",
        f"TRANSFORMERS_VERSION = {names['TRANSFORMERS_VERSION']!r}",
        "",
    ]
    out += _tuple("TRAIN_KEYS", names["TRAIN_KEYS"], "Every key `llamafactory-cli train` accepts in a YAML.")
    out += _tuple("EVAL_ONLY_KEYS", names["EVAL_ONLY_KEYS"], "Keys only `llamafactory-cli eval` takes.")
    out += _tuple("OPTIM_NAMES", names["OPTIM_NAMES"], "The values transformers accepts for `optim`.")
    out += _tuple("LIGER_MODEL_TYPES", names["LIGER_MODEL_TYPES"],
                  "model_type values LF's apply_liger_kernel patches (others: Liger does nothing).")
    out += _tuple("TEMPLATE_NAMES", names["TEMPLATE_NAMES"], "The chat templates LF registers (the values "
                  "`template` accepts).")
    out += [f"OLDER_TRANSFORMERS_VERSION = {names['OLDER_TRANSFORMERS_VERSION']!r}", ""]
    out += _tuple("OLDER_TRANSFORMERS_ONLY_KEYS", names["OLDER_TRANSFORMERS_ONLY_KEYS"],
                  "Training arguments of that older transformers (LF supports it too) the installed one lacks.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the shipped file is out of date")
    parser.add_argument("--older", type=Path, metavar="WHEEL", help="an older transformers wheel LF supports")
    args = parser.parse_args(argv)
    names = collect()
    names.update(older_transformers(args.older, names["TRAIN_KEYS"]) if args.older else shipped_older())
    text = render(names)
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            print(f"{TARGET} is out of date: run scripts/gen_lf_names.py", file=sys.stderr)
            return 1
        print(f"{TARGET} is up to date")
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
