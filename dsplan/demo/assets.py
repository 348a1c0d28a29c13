"""A tiny model and dataset made locally, for ``dsplan demo`` and the end-to-end tests.

Nothing here touches a hub: the tokenizer is a byte-level BPE trained with the
``tokenizers`` library on the demo dataset's own text, and the model is a
randomly initialised (fixed seed) Qwen2 or Llama built from a config: 2 small
layers by default; other shapes (scripts/probe_tiny_training.py makes a wide one
whose frozen weights dominate each rank's memory) take the same path.  The weights
are drawn straight into the checkpoint (no ``nn.Module`` is materialised): a 0.3 B
parameter model (1.2 GB) took 13-16 s on a 2-core box, imports included, of which
drawing took 3 s and writing 4.4 s.

This module is imported by dsplan's CLI, so it imports only the standard library
at module level; ``tokenizers``, ``transformers`` and ``torch`` are imported inside
the functions that need them.

Both makers are safe to call again and from several processes at once: they build
in a temporary folder beside the destination and move it into place in one rename,
and when the destination already exists they check that it was made with the same
parameters (a ``dsplan_demo.json`` stamp in the model folder; the files' own
content for the dataset) instead of touching it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from dsplan.errors import UserError
from dsplan.fsutil import atomic_write

#: Name the demo dataset is registered under in ``dataset_info.json``.
DATASET_NAME = "dsplan_demo"
DATASET_FILE = "dsplan_demo.json"
#: Stamp written into the model folder: the parameters it was made with.
STAMP = "dsplan_demo.json"
STAMP_VERSION = 2  # 2: weights drawn directly (normal, std 0.02), optional shards

#: Special tokens of the Qwen chat format; LLaMA-Factory's ``qwen`` template makes
#: ``<|im_end|>`` the eos token (replace_eos) and falls back to ``<|endoftext|>``.
#: They take ids 0, 1, 2 so the template never has to add (and resize for) a token.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

#: Qwen2's own chat template (system default shortened), so ``template: qwen`` and
#: ``apply_chat_template`` agree on the format.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ARCHS = {
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
}

# ---------------------------------------------------------------- dataset text
_WORDS = (
    "apple river stone cloud green quick silver lamp garden window paper music orange forest bridge candle "
    "yellow tiger ocean winter summer planet rocket violin mirror castle pencil basket dragon island "
    "thunder meadow copper harbor lantern marble falcon velvet canyon glacier compass meteor orchard "
    "saddle tunnel ember willow pebble quartz breeze cobalt lagoon summit prairie beacon"
).split()
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white")
_TASKS = ("reverse", "sort", "count", "repeat", "add", "describe")


def _words(i: int, k: int, n: int) -> list[str]:
    """``n`` words chosen deterministically from sample ``i`` and stream ``k`` (no RNG)."""
    m = len(_WORDS)
    return [_WORDS[(i * 7 + k * 13 + j * (2 * k + 3) + (i * j) % 5) % m] for j in range(n)]


def demo_sample(i: int) -> dict:
    """Sample ``i`` of the demo dataset: an alpaca record with a long-ish, checkable answer.

    The answers run to 200-350 tokens (with the demo tokenizer) so that a ``cutoff_len``
    of 256 or less (not the sample) bounds the sequence length and activation memory grows with the micro-batch.
    """
    task = _TASKS[i % len(_TASKS)]
    ws = _words(i, 1, 8 + i % 9)
    if task == "reverse":
        instruction, inp = "Reverse the order of these words.", " ".join(ws)
        out = " ".join(reversed(ws))
    elif task == "sort":
        instruction, inp = "Sort these words alphabetically.", " ".join(ws)
        out = " ".join(sorted(ws))
    elif task == "count":
        instruction, inp = "Count the letters in each word.", " ".join(ws)
        out = ", ".join(f"{w} has {len(w)} letters" for w in ws)
    elif task == "repeat":
        instruction, inp = f"Repeat each word {2 + i % 3} times.", " ".join(ws)
        out = " ".join(" ".join([w] * (2 + i % 3)) for w in ws)
    elif task == "add":
        a, b = (i * 37) % 1000, (i * 91 + 17) % 1000
        instruction, inp = "Add the two numbers and explain the steps.", f"{a} + {b}"
        out = (f"First take {a}. Then add {b}. The ones give {(a % 10) + (b % 10)}, "
               f"the tens give {(a // 10 % 10) + (b // 10 % 10)}, the hundreds give {a // 100 + b // 100}. "
               f"So {a} plus {b} equals {a + b}.")
    else:
        color = _COLORS[i % len(_COLORS)]
        article = "an" if color[0] in "aeiou" else "a"
        instruction, inp = f"Describe {article} {color} {ws[0]} in one paragraph.", ""
        out = " ".join(f"The {color} {w} is near the {v}." for w, v in zip(ws, _words(i, 2, len(ws))))
    # A fixed tail makes every answer long enough to reach a few hundred tokens.
    tail = " ".join(_words(i, 3, 120 + (i * 11) % 96))
    return {"instruction": instruction, "input": inp, "output": f"{out}\nNotes: {tail}."}


def demo_records(n: int) -> list[dict]:
    return [demo_sample(i) for i in range(n)]


def _corpus(n: int = 256) -> list[str]:
    """Text the tokenizer is trained on: the demo samples in the qwen chat format."""
    lines = []
    for r in demo_records(n):
        user = r["instruction"] + ("\n" + r["input"] if r["input"] else "")
        lines.append(f"system\nYou are a helpful assistant.\nuser\n{user}\nassistant\n{r['output']}\n")
    return lines


# ---------------------------------------------------------------- filesystem helpers
def _write_if_absent(path: Path, text: str) -> bool:
    """Write ``text`` atomically unless ``path`` already holds exactly it.
    Returns True when written; raises UserError when ``path`` holds something else."""
    if path.exists():
        try:
            same = path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            return False
        raise UserError(f"{path} already exists with different content; remove it or choose another folder")
    atomic_write(path, text)  # a racing writer of the same text is harmless
    return True


def _dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- dataset
def make_dataset(dest_dir: Path, n: int = 64, name: str = DATASET_NAME) -> str:
    """Write an alpaca-format dataset of ``n`` synthetic samples into ``dest_dir`` and
    register it in ``dest_dir/dataset_info.json``; return the dataset name.

    Deterministic: the same ``n`` always gives byte-identical files, so a second call
    is a no-op.  An existing ``dataset_info.json`` keeps its other entries; an existing
    data file or entry with different content is an error (never overwritten).
    """
    if n < 1:
        raise UserError(f"the demo dataset needs at least 1 sample, got {n}")
    dest_dir = Path(dest_dir)
    data_file = f"{name}.json"
    _write_if_absent(dest_dir / data_file, _dumps(demo_records(n)))
    entry = {"file_name": data_file, "formatting": "alpaca",
             "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    info_path = dest_dir / "dataset_info.json"
    if info_path.exists():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UserError(f"{info_path}: not readable JSON ({e})") from None
        if not isinstance(info, dict):
            raise UserError(f"{info_path}: expected a JSON object")
        if info.get(name) == entry:
            return name
        if name in info:
            raise UserError(f"{info_path} already registers {name!r} differently; remove that entry")
        info[name] = entry
        atomic_write(info_path, _dumps(info))
    else:
        _write_if_absent(info_path, _dumps({name: entry}))
    return name


# ---------------------------------------------------------------- tokenizer
def make_tokenizer(vocab_size: int = 2048, corpus_samples: int = 256):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on the demo text, with the
    Qwen special tokens at ids 0-2, eos ``<|im_end|>``, pad ``<|endoftext|>`` and a
    Qwen chat template.  Its length is at most ``vocab_size``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(corpus_samples), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, unk_token=None, bos_token=None,
        additional_special_tokens=[SPECIAL_TOKENS[1]], model_max_length=32768, padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---------------------------------------------------------------- model
#: Default shapes: small enough to build in a second and train on a CPU, big enough
#: that activations (not weights) dominate and grow clearly with the micro-batch:
#: at cutoff_len 256 the logits alone are micro_batch x 256 x 8192 x 4 B = 8 MiB per sample.
DEFAULT_SHAPE = dict(vocab_size=8192, hidden=256, layers=2, heads=4, kv_heads=2, intermediate=1024)

#: Standard deviation of the random weights (HF's ``initializer_range`` default).
INIT_STD = 0.02


def model_params(arch: str = "qwen2", **shape) -> dict:
    """The parameters a model folder is stamped with (defaults filled in).  ``shard_mb``
    splits the checkpoint into files of at most that many MB (``None``: one file); ``dtype``
    is the checkpoint's (``float32`` or ``bfloat16``; on a CPU LLaMA-Factory trains in fp32
    either way, so a bf16 checkpoint is converted to fp32 copies when it is loaded)."""
    if arch not in ARCHS:
        raise UserError(f"unknown demo model arch {arch!r}: choose one of {', '.join(ARCHS)}")
    p = {**DEFAULT_SHAPE, **{k: v for k, v in shape.items() if v is not None}}
    unknown = set(p) - set(DEFAULT_SHAPE) - {"seed", "shard_mb", "dtype"}
    if unknown:
        raise TypeError(f"unknown shape parameter(s): {', '.join(sorted(unknown))}")
    p.setdefault("seed", 0)
    p.setdefault("shard_mb", None)
    p.setdefault("dtype", "float32")
    if p["dtype"] not in ("float32", "bfloat16"):
        raise UserError(f"dtype must be float32 or bfloat16, got {p['dtype']!r}")
    if p["hidden"] % p["heads"] or p["heads"] % p["kv_heads"]:
        raise UserError("hidden must be a multiple of heads, and heads of kv_heads")
    if p["shard_mb"] is not None and p["shard_mb"] < 1:
        raise UserError(f"shard_mb must be at least 1, got {p['shard_mb']}")
    return {"stamp_version": STAMP_VERSION, "arch": arch, **p}


def _config(params: dict, tokenizer):
    import transformers

    config_cls = getattr(transformers, ARCHS[params["arch"]][0])
    kw = dict(
        vocab_size=params["vocab_size"], hidden_size=params["hidden"], intermediate_size=params["intermediate"],
        num_hidden_layers=params["layers"], num_attention_heads=params["heads"],
        num_key_value_heads=params["kv_heads"], max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, use_cache=True,
        torch_dtype="float32",  # what transformers loads it as, whatever the checkpoint's dtype
    )
    if params["arch"] == "qwen2":
        kw["use_sliding_window"] = False
    config = config_cls(**kw)
    config.architectures = [ARCHS[params["arch"]][1]]
    return config


def _read_stamp(dest: Path) -> dict | None:
    try:
        have = json.loads((Path(dest) / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return have if isinstance(have, dict) else None


def is_demo_model(dest: Path, params: dict | None = None) -> bool:
    """True when ``dest`` is a finished demo model folder (made with ``params``, if given)."""
    have = _read_stamp(dest)
    return have is not None and (params is None or have == params)


def _older_demo_model(dest: Path) -> bool:
    """A demo model folder stamped by an earlier version of this module (its weights were
    made another way), which a new build may replace."""
    have = _read_stamp(dest)
    version = have.get("stamp_version") if have else None
    return isinstance(version, int) and version < STAMP_VERSION


def _random_state(config, seed: int, dtype: str = "float32") -> dict:
    """A state dict for ``config``'s model drawn from one seeded generator: normal(0, INIT_STD)
    matrices, norm weights 1, biases 0 (what HF's ``_init_weights`` gives, in law).  The
    module is built on the meta device only to learn the names and shapes."""
    import torch
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, config.architectures[0])(config)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        if name.endswith(".bias"):
            state[name] = torch.zeros(meta.shape)
        elif "norm" in name.rsplit(".", 2)[-2]:
            state[name] = torch.ones(meta.shape)
        else:
            state[name] = torch.empty(meta.shape).normal_(0.0, INIT_STD, generator=gen)
        state[name] = state[name].to(getattr(torch, dtype))
    return state


def _save_weights(state: dict, folder: Path, shard_mb: int | None) -> None:
    """``model.safetensors``, or shards of at most ``shard_mb`` MB plus HF's index file."""
    from safetensors.torch import save_file

    meta = {"format": "pt"}
    limit = None if shard_mb is None else shard_mb * 1000**2
    groups: list[list[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if limit is not None and groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    if len(groups) == 1:
        save_file(state, str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, names in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(folder / fname), metadata=meta)
        weight_map.update(dict.fromkeys(names, fname))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(_dumps(index), encoding="utf-8")


def make_tiny_model(dest: Path, arch: str = "qwen2", vocab_size: int | None = None, hidden: int | None = None,
                    layers: int | None = None, heads: int | None = None, kv_heads: int | None = None,
                    intermediate: int | None = None, seed: int = 0, shard_mb: int | None = None,
                    dtype: str | None = None) -> Path:
    """Build a randomly initialised (seeded) ``arch`` model plus a locally trained
    tokenizer and save both into ``dest``; return ``dest``.

    Create-only: when ``dest`` already holds a demo model made with the same parameters
    it is returned untouched; a demo model stamped by an earlier version of this module
    is replaced; anything else already at ``dest`` is an error.
    """
    dest = Path(dest)
    params = model_params(arch, vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                          kv_heads=kv_heads, intermediate=intermediate, seed=seed, shard_mb=shard_mb, dtype=dtype)
    stale = None
    if dest.exists() and _older_demo_model(dest):
        stale = dest.parent / f".{dest.name}.stale-{os.getpid()}"
        try:
            os.rename(dest, stale)  # out of the way; removed once the new model is in place
        except OSError:
            stale = None  # another process moved it first
    if dest.exists():
        if is_demo_model(dest, params):
            return dest
        if (dest / STAMP).is_file():
            raise UserError(f"{dest} holds a demo model made with other parameters; remove it or choose another folder")
        if dest.is_dir() and not any(dest.iterdir()):
            dest.rmdir()  # an empty folder (e.g. made by mkdir -p) is fine to fill
        else:
            raise UserError(f"{dest} already exists and is not a dsplan demo model; choose another folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        tokenizer = make_tokenizer(params["vocab_size"])
        if len(tokenizer) > params["vocab_size"]:  # pragma: no cover - trainer honours vocab_size
            raise UserError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size {params['vocab_size']}")
        config = _config(params, tokenizer)
        _save_weights(_random_state(config, params["seed"], params["dtype"]), tmp, params["shard_mb"])
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(_dumps(params), encoding="utf-8")  # last: marks the folder complete
        try:
            os.rename(tmp, dest)
        except OSError:
            if is_demo_model(dest, params):  # another process finished the same model first
                shutil.rmtree(tmp, ignore_errors=True)
                return dest
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    return dest


def make_demo_assets(root: Path, n: int = 64, name: str = "tiny", **model_kw) -> tuple[Path, Path, str]:
    """Model in ``root/<name>-<arch>``, dataset in ``root/data``: (model dir, dataset dir, dataset name)."""
    root = Path(root)
    arch = model_kw.get("arch", "qwen2")
    model_dir = make_tiny_model(root / f"{name}-{arch}", **model_kw)
    data_dir = root / "data"
    name = make_dataset(data_dir, n)
    return model_dir, data_dir, name
