"""Length worker: runs *inside* the Python that has llamafactory, and measures the data with LF itself.

Started by :mod:`dsplan.inputs.data.lf` as ``python .../worker.py`` (by path, not ``-m``) with
one JSON request on stdin; prints one ``DSPLAN-LENGTHS {json}`` line per job.  Stand-alone on
purpose (no dsplan imports): it may run under another interpreter than dsplan's own.

Request: ``{"private_cache": bool, "jobs": [{"args": {LF arguments}, "pairwise": bool}, ...]}``;
several jobs share one start, since importing LF takes seconds.  Each job's arguments go
through LF's own ``get_train_args``; the tokenizer comes from ``load_tokenizer``, the
template from ``get_template_and_fix_tokenizer`` and the tokenized dataset from
``get_dataset``: the calls LF's training workflows make, so each length is the one LF
would train on.  No model is loaded.

Answer per job: ``{"index": i, "ok": true, "lengths": [...], "rejected": [...] | null,
"notes": [...]}`` (per sample, in LF's order: the ``input_ids`` lengths, or for pairwise
stages the chosen and rejected lengths), or ``{"index": i, "ok": false, "error": "..."}``.

``private_cache`` points ``datasets``' cache at a temporary folder: when every source is a
local file nothing in the user's cache is needed, and nothing is left there.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback

TAG = "DSPLAN-LENGTHS "


def _column_lengths(dataset, column: str) -> list[int]:
    """Lengths of a list column: straight from the arrow table where possible, else row by row."""
    try:
        import pyarrow.compute as pc

        if getattr(dataset, "_indices", None) is None:
            return pc.list_value_length(dataset.data.column(column)).to_pylist()
    except Exception:  # another datasets/pyarrow layout: the slow way below is always right
        pass
    return [len(ids) for ids in dataset[column]]


def measure(job: dict, workdir: str) -> dict:
    from llamafactory.data import get_dataset, get_template_and_fix_tokenizer
    from llamafactory.hparams import get_train_args
    from llamafactory.model import load_tokenizer

    args = dict(job["args"], output_dir=os.path.join(workdir, "out"))
    model_args, data_args, training_args, finetuning_args, _ = get_train_args(args)
    tokenizer_module = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(tokenizer_module["tokenizer"], data_args)
    # the stage each LF workflow hands get_dataset (dpo's workflow asks for "rm")
    stage = "rm" if finetuning_args.stage in ("rm", "dpo") else finetuning_args.stage
    module = get_dataset(template, model_args, data_args, training_args, stage=stage, **tokenizer_module)
    train = module.get("train_dataset")
    if train is None:
        return {"ok": False, "error": "LF's get_dataset returned no train dataset"}
    if job.get("pairwise"):
        lengths = _column_lengths(train, "chosen_input_ids")
        rejected = _column_lengths(train, "rejected_input_ids")
    else:
        lengths, rejected = _column_lengths(train, "input_ids"), None
    return {"ok": True, "lengths": lengths, "rejected": rejected, "notes": []}


def _fresh_templates():
    """LF's get_template_and_fix_tokenizer edits its registered templates in place (tool format,
    default system, thinking); give each job the registry as it was at import."""
    import copy

    from llamafactory.data import template as lf_template

    pristine = copy.deepcopy(lf_template.TEMPLATES)

    def reset():
        lf_template.TEMPLATES.clear()
        lf_template.TEMPLATES.update(copy.deepcopy(pristine))

    return reset


def _answer(index: int, result: dict) -> None:
    sys.stdout.write(TAG + json.dumps({"index": index, **result}) + "\n")
    sys.stdout.flush()


def _unshadow() -> None:
    """Run by path, Python put this file's folder first on sys.path: dsplan's modules beside it
    must not shadow what LF imports (one named like a standard module would win over it)."""
    here = os.path.realpath(os.path.dirname(os.path.abspath(__file__)))
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != here]


def main() -> int:
    _unshadow()
    request = json.load(sys.stdin)
    with tempfile.TemporaryDirectory(prefix="dsplan-lengths-") as workdir:
        if request.get("private_cache"):
            os.environ["HF_DATASETS_CACHE"] = os.path.join(workdir, "datasets")
        reset = None
        for index, job in enumerate(request["jobs"]):
            try:
                reset = reset or _fresh_templates()
                reset()
                result = measure(job, os.path.join(workdir, str(index)))
            except BaseException as e:  # every failure is an answer: the caller falls back to its estimate
                tb = traceback.extract_tb(e.__traceback__)
                where = f" at {os.path.basename(tb[-1].filename)}:{tb[-1].lineno}" if tb else ""
                result = {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:500]}{where}"}
            _answer(index, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
