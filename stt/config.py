"""Typed configuration for every part of stt: dataclasses in, YAML and dotted overrides on top.

A run's whole configuration is one `Config`. Files hold a nested mapping with the same
section names (`model`, `temporal`, `propagation`, ...); command lines add overrides such as
`temporal.alpha=500` or `propagation.aggregation=per-frame`. Unknown keys are errors, so a typo
never silently falls back to a default.

Every accepted value is declared on its field: a choice as a `Literal` type (the modules that use the choices
read them from here with `typing.get_args`), a range as `Annotated` metadata (a `Check`). `validate` derives
every check from those annotations and runs once, when a configuration is loaded (`load_config`) or values are
set (`set_values`); nothing downstream checks them again. This module imports nothing of stt but stt.errors.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from stt.errors import UsageError

# ----------------------------------------------------------------------------------------- the choices
Arch = Literal["resnet18", "resnet50", "mast-resnet18"]  # stt.models (MAST's encoder: evaluation only)
# a student's res4 stride, or a published trunk by name: 8-maxpool (VFS's), 8-maxpool-reflect (CRW's)
Stride = Literal[8, 4, "8-maxpool", "8-maxpool-reflect"]
InputSpace = Literal["rgb", "lab"]
Level = Literal["res3", "res4", "res5"]  # the encoder's pyramid (stt.models.LEVELS)
PyramidLevel = Literal["res3", "res4"]  # the reconstructed levels, fine to coarse (stt.losses.PYRAMID_LEVELS)
SpatialMethod = Literal["moco", "detco"]
ReferencePooling = Literal["mean", "sum"]
EntropyScore = Literal["neglog", "shannon", "none"]
EntropyWindow = Literal["normalised", "padded", "in-frame"]
ThresholdMode = Literal["keep_fraction", "absolute"]
VFSSampling = Literal["distant", "continuous"]
Aggregation = Literal["overall", "per-frame"]
PerFrameNorm = Literal["before-mask", "after-mask"]
Window = Literal["square", "circle"]
LabelSampling = Literal["area", "nearest"]
RecipeName = Literal[  # paper 001 Table 2, and vfs (stt.recipes.RECIPES: one Recipe per name)
    "spatial",
    "temporal",
    "spatiotemporal",
    "spatial-then-temporal",
    "spatial-then-temporal-no-gc",
    "spatial-then-temporal-ewc",
    "spatial-then-temporal-lwf",
    "temporal-then-spatial",
    "temporal-then-spatial-ewc",
    "vfs",
]


# ----------------------------------------------------------------------------------------- the ranges
@dataclass(frozen=True)
class Check:
    """A field's accepted range, as `Annotated` metadata: `ok(value)`, else `<key>: expected <expected>, got ...`
    (the value shown as a list when `as_list`)."""

    ok: Callable[[Any], bool]
    expected: str
    as_list: bool = False


POSITIVE = Check(lambda v: v > 0, "a positive value")
NON_NEGATIVE = Check(lambda v: v is None or v >= 0, "zero or more")  # 0 means off / none / native size
AREA_FRACTIONS = Check(lambda v: 0 < v[0] <= v[1] <= 1, "0 < low <= high <= 1 (fractions of the frame area)", True)
DISTINCT_LEVELS = Check(
    lambda v: bool(v) and len(set(v)) == len(v) and set(v) <= set(typing.get_args(PyramidLevel)),
    f"distinct levels among {typing.get_args(PyramidLevel)}",
    True,
)
WIDTH_OVER_HEIGHT = Check(lambda v: 0 < v[0] <= v[1], "0 < low <= high (width / height)", True)
STEPS = Check(lambda v: all(step >= 1 for step in v), "steps >= 1", True)
PosInt, PosFloat = Annotated[int, POSITIVE], Annotated[float, POSITIVE]
NonNegInt, NonNegFloat = Annotated[int, NON_NEGATIVE], Annotated[float, NON_NEGATIVE]


@dataclass
class ModelConfig:
    """The encoder. Stride presets follow DESIGN.md: `stride` is the output stride of res4."""

    arch: Arch = "resnet18"
    # 8: res3 at 1/4, res4 at 1/8; 4: res3 and res4 at 1/4 (no max-pool, layer3 stride 1); named presets
    # (stt.models.STRIDES) are published trunks: 8-maxpool (VFS's), 8-maxpool-reflect (CRW's)
    stride: Stride = 8
    weights: str = "random"  # random | path to a local torchvision ImageNet state dict
    input_space: InputSpace = "rgb"  # rgb (ImageNet-normalised) | lab (normalised Lab, the temporal stage's input)


@dataclass
class SpatialConfig:
    """Stage 1: MoCo v2-style contrastive learning on still images (DetCo-style local terms optional)."""

    method: SpatialMethod = "moco"
    feature_dim: PosInt = 128
    queue_size: PosInt = 4096
    momentum: Annotated[float, Check(lambda v: 0 <= v < 1, "a value in [0, 1)")] = 0.999
    temperature: PosFloat = 0.2
    # Shuffle-BN substitute within one worker: keys are encoded as this many BatchNorm groups of a
    # shuffled batch, queries as the same number of unshuffled groups (see stt/spatial.py).
    bn_splits: PosInt = 4
    image_size: PosInt = 224
    # MoCo v2's SGD rate for a global batch of `lr_batch` images; the effective rate is
    # lr x global batch / lr_batch (its linear scaling rule), global batch = train.batch_size x workers.
    lr: PosFloat = 0.03
    lr_batch: PosInt = 256
    weight_decay: NonNegFloat = 1e-4


@dataclass
class TemporalConfig:
    """Stage 2: its objective L = L_rec^p + alpha * L_lc^e + beta * L_gc (paper 001, Sec. 3.2-3.3) and its rate."""

    rec_levels: Annotated[tuple[PyramidLevel, ...], DISTINCT_LEVELS] = ("res3", "res4")  # ("res4",): Table 1's row 1
    radius_res3: PosInt = 12
    radius_res4: PosInt = 6
    rec_scale: PosFloat = 20.0  # smooth-L1 is multiplied by this, per level
    channel_dropout_scale: PosFloat = 1.5  # after zeroing a or b, the whole Lab frame is scaled by this (authors, MAST)
    alpha: NonNegFloat = 1000.0  # local correlation distillation weight; 0 disables it
    # How the res3 correlation's 2x2 reference cells merge into one res4 cell for the pseudo-label:
    # mean (authors' code, RAFT-style avg-pool; pooled rows sum to 1/4) | sum (rows stay distributions)
    lc_reference_pooling: ReferencePooling = "mean"
    entropy: EntropyScore = "neglog"  # neglog (Eq. 6 as printed, authors' code) | shannon | none
    entropy_threshold: float = 0.7  # with keep_fraction: in (0, 1] (`validate`)
    # Which keys a row's score is over (stt.losses.entropy_score): normalised (in-frame keys against the
    # uniform row over them: no border bias) | padded (the authors' fixed zero-padded window) | in-frame
    entropy_window: EntropyWindow = "normalised"
    threshold_mode: ThresholdMode = "keep_fraction"  # keep_fraction (per-sample quantile) | absolute
    beta: NonNegFloat = 50.0  # global correlation distillation weight; 0 disables it
    teacher_temperature: PosFloat = 0.07
    # The stage's Adam rate for a global batch of `lr_batch` pairs; effective rate = lr x global batch / lr_batch
    # (the same linear rule as spatial.lr and vfs.lr). Paper 001: 1e-4 at 128 pairs (ResNet-18); the authors'
    # code (configs/train/train.py, ResNet-50, 16 x 4 GPUs = 64 pairs) uses 5e-5, which the same rule gives.
    # Default: 16 x 8 workers = 128.
    lr: PosFloat = 1e-4
    lr_batch: PosInt = 128


@dataclass
class VFSConfig:
    """VFS (paper 003, Xu & Wang 2021): video frame-level similarity, `train.recipe=vfs` (stt.vfs).

    Defaults are the paper's best ResNet-18 DAVIS setting without colour augmentation (Table 3 "D",
    Table 5 row 1) and the authors' configs (xvjiarui/VFS, r18_nc_sgd_cos_100e_r2_1xNx8_k400.py).
    """

    # False: Eq. 5, no negatives (SimSiam: predictor MLP, stop-gradient, symmetric, the paper's main
    # objective); True: Eq. 4, MoCo v2 InfoNCE with a queue (spatial.queue_size/feature_dim/momentum/temperature)
    negatives: bool = False
    # distant: the video cut into 2 halves, one frame drawn uniformly in each (Table 1, n = 2; Table 3 "D", the
    # best); continuous: a random first frame and the second `interval` list steps later (Table 3's delta)
    sampling: VFSSampling = "distant"
    interval: PosInt = 32
    # each frame: its own random resized crop (area 0.2-1, aspect 3/4-4/3) to this, its own flip
    image_size: PosInt = 224
    crop_scale: Annotated[tuple[float, float], AREA_FRACTIONS] = (0.2, 1.0)
    color_aug: bool = False  # MoCo v2's jitter/grayscale/blur per frame; hurts DAVIS (Table 2: 65.0 -> 61.9)
    # SGD (momentum 0.9) rate for a global batch of `lr_batch` pairs, scaled linearly (paper: 0.05 at 256)
    lr: PosFloat = 0.05
    lr_batch: PosInt = 256
    weight_decay: NonNegFloat = 1e-4


@dataclass
class PropagationConfig:
    """Label propagation, Algorithm 1 of paper 004; defaults are DESIGN.md's DAVIS settings."""

    aggregation: Aggregation = "overall"
    per_frame_norm: PerFrameNorm = "before-mask"  # per-frame softmax over the whole frame (UVC) | after-mask (MAST)
    temperature: PosFloat = 0.07
    topk: PosInt = 10
    context: NonNegInt = 20  # previous frames used as context, in addition to the first frame
    # In feature cells; 0 disables the spatial window. None: the authors' radius for the task and the
    # feature stride (stt.propagation.AUTHORS_RADIUS: DAVIS 12 / JHMDB 5 / VIP 16 cells at stride 8,
    # 35 / 12 / 35 at stride 4), resolved by the evaluator once it knows both.
    radius: Annotated[float | None, NON_NEGATIVE] = None
    window: Window = "square"
    window_first_frame: bool = True
    soft_labels: bool = True  # carry soft predictions forward (else one-hot argmax)
    normalize: bool = True  # L2-normalise features
    # The authors' evaluator (vanilla_tracker.py), each rule off by default (DESIGN.md says why);
    # `python -m stt.evaluate --preset authors` or configs/authors.yaml turns on all three:
    repeat_first_frame: bool = False  # early targets see the first frame twice (key_start = max(0, t - context))
    # first labels on the grid: area (fraction of each cell) | nearest (one pixel, PIL)
    label_sampling: LabelSampling = "area"
    minmax_normalise: bool = False  # per-frame, per-channel min-max of the upsampled soft labels before the argmax
    chunk_size: PosInt = 2048  # target positions per chunk in the windowed implementation


# Named evaluation protocols as dotted overrides (`python -m stt.evaluate ... --preset NAME`), applied
# after --config and before command-line overrides. "authors": the evaluator of the authors' code
# (qianduoduolr/Spa-then-Temp vanilla_tracker.py); configs/authors.yaml holds the same settings.
PRESETS: dict[str, tuple[str, ...]] = {
    "authors": (
        "propagation.repeat_first_frame=true",
        "propagation.label_sampling=nearest",
        "propagation.minmax_normalise=true",
    ),
}


@dataclass
class EvalConfig:
    """Feature extraction for evaluation."""

    layer: Level = "res4"
    max_short_side: NonNegInt = 480  # frames are fed at native size, downscaled only if taller than this (DAVIS: 480p)
    vip_size: PosInt = 560
    jhmdb_size: PosInt = 320  # the authors: JHMDB frames resized to 320 x 320, VIP to 560 x 560
    batch_size: PosInt = 8


@dataclass
class DataConfig:
    """Where the data comes from and how training pairs are sampled."""

    root: str = ""  # empty: the embedded synthetic default
    images: str = ""  # image folder for the spatial stage; empty: frames of `root`
    # the global distillation compares res5 maps at stride 32: the crop must tile into whole cells
    crop_size: Annotated[int, Check(lambda v: v >= 32 and v % 32 == 0, "a positive multiple of 32")] = 256
    crop_scale: Annotated[tuple[float, float], AREA_FRACTIONS] = (0.6, 1.0)
    crop_ratio: Annotated[tuple[float, float], WIDTH_OVER_HEIGHT] = (1.5, 2.0)
    frame_gap: PosInt = 1  # in annotated-list steps; YouTube-VOS lists every 5th raw frame
    # CPUs of the Ray Data decode/augment actors, kept free of Train workers (stt.data.pipeline)
    data_cpus: PosFloat = 1.0
    # Decode and augment in a background thread of the (single) Train worker instead of in Ray Data tasks:
    # the same stream without Ray Data's start-up, which dominates short runs on a small machine (the
    # quick and laptop sweep plans); --workers 1 only. data_cpus is then not reserved.
    decode_in_worker: bool = False


@dataclass
class TrainConfig:
    """The optimisation schedule of one stage."""

    recipe: RecipeName = "spatial-then-temporal"
    gamma: NonNegFloat = 1.0  # spatiotemporal recipe only: L = L_nce + gamma * L_t (paper 001 Sec. 3.3 (ii))
    # EWC recipes only (stt.ewc): penalty weight lambda (paper 001 does not state it: tune it) and the
    # batches of the earlier stage's own stream its diagonal Fisher is averaged over, at its last step.
    ewc_weight: NonNegFloat = 100.0
    ewc_fisher_batches: PosInt = 8
    # LwF recipe only (stt.lwf): weight lambda_o of the distillation term (LwF: 1) and its temperature T (LwF: 2)
    lwf_weight: NonNegFloat = 1.0
    lwf_temperature: PosFloat = 2.0
    batch_size: PosInt = 16  # per worker: the global batch is batch_size x workers
    # Each stage's rate is its own section's: spatial.lr (also the joint stage's), temporal.lr, vfs.lr.
    warmup_steps: NonNegInt = 100
    max_steps: PosInt = 1000
    checkpoint_every: PosInt = 100
    seed: int = 0
    # steps between ray.train.report calls (a barrier across workers): metrics averaged over them
    log_every: PosInt = 10
    eval_every: NonNegInt = 500  # steps between DAVIS J&F evaluations on rank 0 (at a checkpoint); 0 disables them
    # More steps to evaluate (and checkpoint) at, whatever eval_every says: the sweep's rungs (stt.sweep.plans)
    eval_steps: Annotated[tuple[int, ...], STEPS] = ()
    eval_davis_root: str = ""  # the small held-out DAVIS-layout set for those; empty: the embedded synthetic set
    eval_davis_set: str = "val"  # its split (ImageSets/2017/<set>.txt); the sweep tunes on "train"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    vfs: VFSConfig = field(default_factory=VFSConfig)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def check_choice(name: str, value: Any, allowed: tuple) -> None:
    """UsageError naming the config field `name` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise UsageError(f"{name}: expected one of {allowed}, got {value!r}")


def validate(config: Config) -> Config:
    """Check every value against its field's declaration (a `Literal`'s choices, `Check` ranges); a UsageError
    names the first bad key.

    Run once on every loaded configuration, before anything expensive starts (Ray, feature extraction): a
    value outside these ranges would otherwise surface as a crash deep in a worker, or as a number.
    """
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for key, hint in typing.get_type_hints(type(values), include_extras=True).items():
            name, value = f"{section.name}.{key}", getattr(values, key)
            declared, *checks = typing.get_args(hint) if typing.get_origin(hint) is Annotated else (hint,)
            if typing.get_origin(declared) is Literal:
                check_choice(name, value, typing.get_args(declared))
            for check in checks:
                if isinstance(check, Check) and not check.ok(value):
                    shown = list(value) if check.as_list else value
                    raise UsageError(f"{name}: expected {check.expected}, got {shown!r}")
    t = config.temporal
    if t.threshold_mode == "keep_fraction" and not 0 < t.entropy_threshold <= 1:
        raise UsageError(f"temporal.entropy_threshold: expected a kept fraction in (0, 1], got {t.entropy_threshold!r}")
    return config


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise naming `where`."""
    origin = typing.get_origin(annotation)
    if origin is Literal:  # the choice is `validate`'s; here the value gets its type (8 an int, "8-maxpool" a str)
        kinds = tuple(dict.fromkeys(type(choice) for choice in typing.get_args(annotation)))
        return _coerce(value, kinds[0] if len(kinds) == 1 else typing.Union[kinds], where)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or value == "None":
            return None
        for option in options[:-1]:  # the first type the value converts to: int | str keeps 8 an int
            try:
                return _coerce(value, option, where)
            except UsageError:
                pass
        return _coerce(value, options[-1], where)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise UsageError(f"{where}: expected {len(item_types)} items, got {value!r}")
        return tuple(_coerce(v, t, where) for v, t in zip(value, item_types))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise UsageError(f"{where}: expected true or false, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UsageError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: expected a number, got {value!r}") from None
        except OverflowError:  # an integer beyond any float
            number = math.inf
        if not math.isfinite(number):
            # temporal.lr=inf passed every range check (inf > 0), trained, and wrote a checkpoint of NaNs
            raise UsageError(f"{where}: expected a finite number, got {value!r}")
        if annotation is int:
            if number != int(number):
                raise UsageError(f"{where}: expected an integer, got {value!r}")
            return int(number)
        return number
    if annotation is str:
        return str(value)
    raise TypeError(f"{where}: unsupported field type {annotation!r}")


# Keys that moved to another section: a config file or override naming the old one is refused with the new
# name; a checkpoint's stored config (written before the move) is read with the value moved (`from_dict`).
MOVED_KEYS = {"train.lr": "temporal.lr", "train.lr_batch": "temporal.lr_batch"}


def _update(obj: Any, mapping: dict, prefix: str) -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in mapping.items():
        where = f"{prefix}{key}"
        if where in MOVED_KEYS:
            raise UsageError(
                f"config key '{where}' is now '{MOVED_KEYS[where]}' (each stage has its own rate: "
                "spatial.lr, temporal.lr, vfs.lr)"
            )
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise UsageError(f"unknown config key '{where}' (known here: {known})")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UsageError(f"{where}: expected a mapping, got {value!r}")
            _update(current, value, where + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], where))


def apply_overrides(config: Config, overrides: list[str]) -> Config:
    """Apply `section.key=value` strings in order; values are parsed as YAML scalars."""
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"override {item!r}: expected section.key=value")
        dotted, raw = item.split("=", 1)
        nested: dict = {}
        cursor = nested
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        try:
            cursor[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise UsageError(
                f"override {item!r}: the value is not valid YAML ({' '.join(str(error).split())})"
            ) from None
        _update(config, nested, "")
    return config


def set_values(config: Config, values: dict[str, Any]) -> Config:
    """A copy of `config` with `values` ({"section.key": value}, already typed: no YAML parsing) set, validated."""
    config = copy.deepcopy(config)
    for dotted, value in values.items():
        *sections, key = dotted.split(".")
        nested: dict = {key: value}
        for section in reversed(sections):
            nested = {section: nested}
        _update(config, nested, "")
    return validate(config)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """A `Config` from defaults, then the YAML file at `path` (if any), then `overrides`."""
    config = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            mapping = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise UsageError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
        if not isinstance(mapping, dict):
            raise UsageError(f"{path}: expected a mapping of sections, got {type(mapping).__name__}")
        try:
            _update(config, mapping, "")
        except UsageError as error:
            raise UsageError(f"{path}: {error}") from None
    return validate(apply_overrides(config, overrides or []))


def to_dict(config: Any) -> dict:
    """Plain nested dict (tuples as lists), safe for YAML, JSON and `torch.save(weights_only)`."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def from_dict(mapping: dict, source: str = "") -> Config:
    """The `Config` of a plain mapping (`to_dict`'s inverse); `source` (e.g. a checkpoint's path) is
    named in the error when the mapping holds a key this version does not know."""
    config = Config()
    try:
        _update(config, _moved(mapping), "")
    except UsageError as error:
        if not source:
            raise
        raise UsageError(f"{source}: its stored config: {error}") from None
    return config


def _moved(mapping: dict) -> dict:
    """`mapping` with the values of MOVED_KEYS under their new names (a stored config's new name wins)."""
    moved = {section: dict(values) if isinstance(values, dict) else values for section, values in mapping.items()}
    for old, new in MOVED_KEYS.items():
        (old_section, old_key), (new_section, new_key) = old.split("."), new.split(".")
        values = moved.get(old_section)
        if isinstance(values, dict) and old_key in values:
            value = values.pop(old_key)
            target = moved.setdefault(new_section, {})
            if isinstance(target, dict):
                target.setdefault(new_key, value)
    return moved
