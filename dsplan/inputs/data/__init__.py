"""The training data's token lengths, and the worst micro-batch they can form.

Reads the dataset(s) a LLaMA-Factory (LF) run names the way LF 0.9.5 reads them, gives
every sample its token length after the chat template and truncation to ``cutoff_len``,
and sums that up as the padded tokens of the largest micro-batch plus a length
distribution the plan can show.  The modules follow the data, in order:

    spec (:class:`DataSpec`: what to measure)
      → sources    dataset_info.json, the files, their rows
      → formats    rows to conversations (alpaca, sharegpt); the rows a stage drops
      → templates  conversations to text pieces with dsplan's copy of LF's chat templates
      → lengths    pieces to token counts, per-sample shapes, truncation at the cutoff
      → result     :class:`DataProfile`: stats, worst batch, histogram, longest samples
    with cache (keys and entries), lf (LF's own pipeline, run in ``worker.py`` under LF's
    Python) and engine (the entry: picks the way to measure and runs the flow).

Three ways to the lengths, best first; :attr:`DataProfile.method` says which one ran:

- ``lf``: LF's own data pipeline (template, tokenizer, truncation) in a subprocess under
  the Python that has LF (:mod:`dsplan.inputs.data.worker`).  Exact; skips the stages
  from formats to lengths.
- ``tokenizer``: the model folder's ``tokenizer.json`` through the light ``tokenizers``
  package, with the template rendered by :mod:`~dsplan.inputs.data.templates`.  An
  estimate: LF's own code does not run.
- ``chars``: no tokenizer at hand: a characters-per-token rate per script
  (:data:`~dsplan.inputs.data.lengths.CHARS_PER_TOKEN`).  A rough estimate.

Data that is not here to read (a hub dataset missing from the local caches, ``REMOTE:``,
a ``dataset_dir`` without dataset_info.json, a loading script, parquet without pyarrow)
gives a one-line note and a profile that plans at ``cutoff_len``.  Data LF 0.9.5 will
surely refuse (a name dataset_info.json lacks, a missing or undecodable file, a ranking
dataset for another stage, a ``max_samples`` that is not an integer, a message that is not
text, no usable sample at all) gives a profile whose :attr:`DataProfile.refused` says why
in one line; ``plan``, ``render`` and ``run`` stop on it (exit 2).  :func:`measure` itself
never raises for either.

Token counts are cached (:func:`default_cache_dir`), keyed by the data files' size and
mtime, the tokenizer files, the template and the options that change the text.  The
estimate caches each sample's per-turn counts, so a new ``cutoff_len`` is arithmetic,
not a new tokenization; LF's lengths are cached per cutoff.

This package runs on login nodes: it never imports torch, transformers, datasets or
llamafactory (``tokenizers`` and, for parquet/arrow, ``pyarrow`` are imported lazily).
"""

from dsplan.inputs.data.cache import default_cache_dir
from dsplan.inputs.data.lengths import find_tokenizer
from dsplan.inputs.data.lf import lf_available
from dsplan.inputs.data.engine import measure, measure_many, read_samples
from dsplan.inputs.data.result import DataProfile, LengthStats, SampleRef, WorstBatch
from dsplan.inputs.data.spec import DataSpec, Refused

__all__ = ["DataProfile", "DataSpec", "LengthStats", "Refused", "SampleRef", "WorstBatch", "default_cache_dir",
           "find_tokenizer", "lf_available", "measure", "measure_many", "read_samples"]
