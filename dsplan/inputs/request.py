"""One request: what a command was asked for, turned into the inputs every later stage reads.

``render``, ``plan``, ``run`` and the demo all start here.  A :class:`Request`
holds the raw answers (the user's YAML path, a preset, hardware flags, the
method and any LLaMA-Factory flags by settings field); :func:`resolve` turns it
into the hardware profile, the model spec, the merged settings and the user's
YAML, applying the one precedence rule: flag > the user's YAML > preset > default.
When the YAML or a flag names a ``dataset``, it also measures the data's token
lengths (:func:`measure_data`), which the planner plans the worst real batch from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from dsplan.errors import UserError, one_line, shorten
from dsplan.inputs.hardware import HardwareProfile, make_profile
from dsplan.inputs.model import ModelSpec, load_model_spec
from dsplan.inputs.settings import TrainSettings, load_user_yaml, merge_settings

#: Hardware flags, by option name; each is a plain string the profile parses.
HARDWARE_FIELDS = ("preset", "gpus", "backend", "host_ram", "gpu_name")
#: The merged settings that decide the data's token lengths (the rest are read from the user's YAML).
DATA_FIELDS = ("dataset", "dataset_dir", "template", "cutoff_len", "stage", "packing", "neat_packing")
#: The interpreter whose LLaMA-Factory measures the data exactly, in a worker; unset: the login-node estimate.
DATA_PYTHON_ENV = "DSPLAN_TRAIN_PYTHON"


@dataclass(frozen=True)
class Request:
    """The raw answers of one command line (None: not given)."""

    lf_yaml: str | None = None
    preset: str | None = None
    gpus: str | None = None
    backend: str | None = None
    host_ram: str | None = None
    gpu_name: str | None = None
    model: str | None = None
    method: str | None = None
    flags: dict[str, Any] = field(default_factory=dict)  # LF values by TrainSettings field
    precision: str | None = None  # --precision (fp32 on a CPU); None: the hardware's

    @classmethod
    def from_options(cls, lf_yaml: str | None, options: dict[str, Any]) -> Request:
        """A request from click's keyword arguments; unknown names are LF flags by settings field."""
        opts = dict(options)
        known = {name: opts.pop(name, None) for name in (*HARDWARE_FIELDS, "model", "method", "precision")}
        flags = {k: v for k, v in opts.items() if v is not None}
        return cls(lf_yaml=lf_yaml, flags=flags, **known)


@dataclass(frozen=True)
class Inputs:
    """Everything the estimate, the plan and the renderer read."""

    profile: HardwareProfile
    spec: ModelSpec
    settings: TrainSettings
    user: dict  # the user's YAML as written (render keeps the keys dsplan does not manage)
    data: Any = None  # the named dataset's DataProfile (dsplan.inputs.data), else None
    calibration: Any = None  # the site calibration's entry for this hardware (dsplan.learn.calibration), else None


def _hardware(req: Request) -> tuple[HardwareProfile, dict]:
    """The profile from flags over the preset; returns it and the preset's training block."""
    hw: dict = {}
    training: dict = {}
    if req.preset:
        from dsplan.inputs.presets import get_preset

        p = get_preset(req.preset)
        hw, training = p.hardware, p.training
    gpus = req.gpus or hw.get("gpus")
    if not gpus:
        raise UserError("missing --gpus (e.g. --gpus 8x64G) or --preset; `dsplan detect` shows this machine's")
    if req.gpu_name is None and req.backend is not None and hw.get("backend") not in (None, req.backend):
        hw = {k: v for k, v in hw.items() if k != "gpu_name"}  # another backend: the preset's card is moot
    profile = make_profile(gpus, req.backend or hw.get("backend") or "cuda", req.host_ram or hw.get("host_ram"),
                           req.gpu_name or hw.get("gpu_name"))
    return profile, training


def resolve(req: Request) -> Inputs:
    """Profile, model spec, merged settings and the user's YAML; every problem is a UserError."""
    user = load_user_yaml(req.lf_yaml) if req.lf_yaml else {}
    profile, preset_training = _hardware(req)
    from dsplan.learn.calibration import lookup_calibration

    calibration = lookup_calibration(profile)  # a malformed file is one line here, before any work
    model_ref = req.model or user.get("model_name_or_path")
    if not model_ref:
        raise UserError("missing --model (a local folder with config.json, or a catalog name)")
    from dsplan.learn.trace import attach_model_calibration

    spec = attach_model_calibration(load_model_spec(str(model_ref)))  # its `dsplan calibrate MODEL_DIR` entries
    # The YAML's own value stays as the user wrote it; a --model flag is written as resolved.
    written_model = str(model_ref) if req.model is None else (spec.path or spec.hf_id or spec.name)
    settings = merge_settings(
        user, model_name_or_path=written_model, default_template=spec.template,
        precision_supported=req.precision or profile.precision, method=req.method, flags=req.flags,
        defaults={"flash_attn": profile.flash_attn, **preset_training},
    )
    return Inputs(profile, spec, settings, user, measure_data(req, user, settings, spec), calibration=calibration)


def measure_data(req: Request, user: dict, settings: TrainSettings, spec: ModelSpec):
    """The token lengths of the dataset the YAML or a flag names (None when neither names one: the
    schema's default dataset is not the user's).  With ``$DSPLAN_TRAIN_PYTHON`` LF's own pipeline
    measures them in a worker under that Python; else the login-node estimate.  Cached, and never
    imports torch or LF here.  Data that is not here to read (a hub dataset outside the local
    caches) plans at cutoff_len with a note; data LF will surely refuse is a UserError."""
    if not (user.get("dataset") or req.flags.get("dataset")):
        return None
    from dsplan.inputs.data import DataProfile, DataSpec, measure

    args = {**user, **{k: getattr(settings, k) for k in DATA_FIELDS},
            "model_name_or_path": spec.path or spec.hf_id or settings.model_name_or_path}
    vision = getattr(spec, "vision", None)
    data_spec = DataSpec.from_lf_args(args, image_tokens=vision.image_tokens(settings.image_max_pixels) if vision
                                      else 0)
    try:
        data = measure(data_spec, python=os.environ.get(DATA_PYTHON_ENV) or None)
    except (OSError, ValueError) as e:  # the package notes or refuses what it knows; this is the rest
        note = one_line(f"planned at cutoff_len: the dataset could not be read ({type(e).__name__}: {e})")
        return DataProfile(spec=data_spec, method="none", method_note=note, notes=(note,))
    if data.refused:
        raise UserError(one_line(f"dataset {shorten(data_spec.dataset, 80)}: {data.refused}"))
    return data
