"""What the plan holds against the model and the estimate: LLaMA-Factory's refusals that depend on the
model (a pre-quantized checkpoint), and the inputs the estimate does not model, as warnings.

LF's refusals that depend on the arguments alone are in :mod:`dsplan.inputs.settings`,
the ones that depend on the DeepSpeed tier in :mod:`dsplan.plan.tiers`.  Every warning
here is one line; ``plan`` prints them under "why" and ``plan --json`` lists them in
``warnings``.
"""

from __future__ import annotations

from dsplan.errors import UserError, excerpt
from dsplan.estimate.model_states import APPROXIMATED_OPTIMIZERS
from dsplan.estimate.stages import liger_fused
from dsplan.estimate.workload import LAYER_MODULES, OUTER_MODULES, Workload, pre_quantized
from dsplan.inputs.model import ModelSpec
from dsplan.inputs.settings import TrainSettings
from dsplan.schema.lf import closest
from dsplan.schema.lf_names import LF_VERSION, OLDER_TRANSFORMERS_VERSION, TRANSFORMERS_VERSION

#: LF's on-the-fly quantization libraries (``configure_quantization``); the others quantize nothing.
ON_THE_FLY = ("bnb", "hqq", "eetq")
#: The bits each of them takes, and LF 0.9.5's message for others (``model_utils/quantization.py``).
ON_THE_FLY_BITS = {
    "bnb": ((4, 8), "Bitsandbytes only accepts 4-bit or 8-bit quantization."),
    "hqq": ((1, 2, 3, 4, 5, 6, 8), "HQQ only accepts 1/2/3/4/5/6/8-bit quantization."),
    "eetq": ((8,), "EETQ only accepts 8-bit quantization."),
}


def check_model_rules(settings: TrainSettings, spec: ModelSpec) -> None:
    """LF's refusals at model load: bits its on-the-fly quantizer does not take, and a checkpoint
    that ships quantized (``model/adapter.py``; its quantization_bit is then ignored)."""
    ptq = pre_quantized(spec)
    bits, method = settings.quantization_bit, settings.quantization_method
    if ptq is None and bits is not None and method in ON_THE_FLY_BITS and bits not in ON_THE_FLY_BITS[method][0]:
        raise UserError(f"LLaMA-Factory {LF_VERSION} refuses this config: {ON_THE_FLY_BITS[method][1]} "
                        f"(quantization_bit {bits}, quantization_method {method})")
    if ptq is None or ptq[0] in ("fp8", "mxfp4"):  # LF dequantizes those at load
        return
    if settings.method in ("full", "freeze"):
        message = "Quantized models can only be used for the LoRA or OFT tuning."
    elif settings.use_dora and ptq[0] != "bitsandbytes":
        message = "DoRA is not compatible with PTQ-quantized models."
    else:
        return
    raise UserError(f"LLaMA-Factory {LF_VERSION} refuses this config: {message} ({spec.name} ships "
                    f"{ptq[0]}-quantized weights)")


def _flag_warnings(s: TrainSettings) -> list[str]:
    """Switches whose memory effect the estimate leaves out."""
    table = [
        (s.use_unsloth, "use_unsloth: Unsloth's kernels and checkpointing are not modelled; the estimate is plain "
                        "transformers' (usually higher)"),
        (s.use_unsloth_gc, "use_unsloth_gc: Unsloth's checkpointing to host memory is not modelled"),
        (s.use_kt, "use_kt: KTransformers' CPU experts are not modelled"),
        (s.use_llama_pro, "use_llama_pro: LLaMA Pro's expanded blocks are not modelled"),
        (s.fp8, "fp8: FP8 training is not modelled; estimated as 16-bit"),
        (s.precision == "fp32", "precision fp32: weights, activations and logits are estimated as 16-bit; fp32 "
                                "training needs up to twice as much"),
        (s.torch_compile, "torch_compile: compiled graphs' memory is not modelled"),
        (s.pissa_init, "pissa_init: PiSSA's SVD at load time is not modelled"),
        (s.method in ("lora", "qlora") and s.lora_dropout > 0,
         "lora_dropout: the dropped copy of each adapted linear's input is not modelled"),
        (s.use_badam, "use_badam: BAdam updates one block at a time; estimated as full AdamW (an upper bound)"),
        (s.use_adam_mini, "use_adam_mini: Adam-mini keeps fewer states; estimated as AdamW's (an upper bound)"),
        (s.use_muon, "use_muon: Muon keeps fewer states; estimated as AdamW's (an upper bound)"),
        (s.optim.startswith(APPROXIMATED_OPTIMIZERS), f"optim {s.optim}: its states are not modelled; estimated "
                                                      "as AdamW's"),
        (s.finetuning_type == "oft", "finetuning_type oft: OFT's activations are estimated as LoRA's (not traced)"),
        (s.do_eval, "do_eval: evaluation's own forward passes are not in the estimate"),
        (s.predict_with_generate, "predict_with_generate: generation at evaluation is not in the estimate"),
    ]
    lines = [text for applies, text in table if applies]
    lines += [f"{key}: not modelled by dsplan's estimate" for key in s.unmodelled_keys]
    for key in s.older_transformers_keys:
        lines.append(f"{key}: an argument of transformers {OLDER_TRANSFORMERS_VERSION} that transformers "
                     f"{TRANSFORMERS_VERSION} refuses; LF {LF_VERSION} runs on both, so check the cluster's stack")
    for key in s.unknown_keys:
        close = closest(key)
        lines.append(f"{key}: unknown to LLaMA-Factory {LF_VERSION}" + (f" (did you mean {close}?)" if close else "")
                     + "; kept because ALLOW_EXTRA_ARGS is set, and LF ignores it")
    return lines


def _model_warnings(s: TrainSettings, spec: ModelSpec, w: Workload) -> list[str]:
    """What the estimate assumes about this model and the stage's other models."""
    lines = list(spec.warnings)  # parts of its config.json dsplan sized by assumption
    if s.enable_liger_kernel and not liger_fused(spec, w):
        why = (f"LF keeps the logits for stage {s.stage}" if s.stage not in ("pt", "sft")
               else f"LF {LF_VERSION} has no Liger kernels for model_type {spec.model_type}")
        lines.append(f"enable_liger_kernel: {why}; the full logits are counted")
    ptq = pre_quantized(spec)
    if ptq is not None:
        lines.append(f"{spec.name} ships {ptq[0]}-quantized weights: estimated at {ptq[1]:.2f} B per linear "
                     "weight" + ("; quantization_bit is ignored" if s.quantization_bit else ""))
    elif s.quantization_bit and s.quantization_method not in ON_THE_FLY:
        lines.append(f"quantization_method {s.quantization_method}: LF {LF_VERSION} quantizes on the fly with "
                     f"{', '.join(ON_THE_FLY)} only; the weights are planned at 16 bits, as LF loads them")
    vision = getattr(spec, "vision", None)
    if vision is not None and not w.freeze_vision_tower:
        lines.append(f"freeze_vision_tower false: the vision tower's own activations (its {vision.depth} blocks over "
                     f"up to {vision.image_tokens(w.image_max_pixels) * vision.spatial_merge_size ** 2} patches per "
                     "image) are not modelled; its weights, gradients and optimizer states are")
    if w.reference == "copy" and w.ref_model:
        lines.append(f"ref_model {excerpt(w.ref_model, 60)}: assumed the size of the model trained")
    if w.reward == "copy":
        lines.append("reward_model: a full reward model is assumed the size of the model trained")
    elif w.reward == "adapter":
        lines.append(f"reward_model: its adapter is assumed of rank {s.lora_rank}")
    for name in w.extra_modules:
        if name not in OUTER_MODULES:
            lines.append(f"{name}: a module dsplan cannot size (known: {', '.join(OUTER_MODULES)}); not counted")
    if w.method == "freeze":
        for name in w.freeze_modules:
            if name not in LAYER_MODULES and name != "all":
                lines.append(f"freeze_trainable_modules {name}: unknown to dsplan; not counted")
    return lines


def unmodelled(settings: TrainSettings, spec: ModelSpec, w: Workload) -> list[str]:
    """One line for every input the estimate does not model, or models by assumption."""
    return _flag_warnings(settings) + _model_warnings(settings, spec, w)
