"""Typed configuration for every part of stt: dataclasses in, YAML and dotted overrides on top.

A run's whole configuration is one `Config`. Files hold a nested mapping with the same
section names (`model`, `temporal`, `propagation`, ...); command lines add overrides such as
`temporal.alpha=500` or `propagation.aggregation=per-frame`. Unknown keys are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stt.errors import UsageError


@dataclass
class ModelConfig:
    """The encoder. Stride presets follow DESIGN.md: `stride` is the output stride of res4."""

    arch: str = "resnet18"  # resnet18 | resnet50 | mast-resnet18 (MAST's encoder, evaluation only; stt.models)
    # 8: res3 at 1/4, res4 at 1/8; 4: res3 and res4 at 1/4 (no max-pool, layer3 stride 1); named presets
    # (stt.models.STRIDES) are published trunks: 8-maxpool (VFS's), 8-maxpool-reflect (CRW's)
    stride: int | str = 8
    weights: str = "random"  # random | path to a local torchvision ImageNet state dict
    input_space: str = "rgb"  # rgb (ImageNet-normalised) | lab (normalised Lab, the temporal stage's input)


@dataclass
class SpatialConfig:
    """Stage 1: MoCo v2-style contrastive learning on still images (DetCo-style local terms optional)."""

    method: str = "moco"  # moco | detco
    feature_dim: int = 128
    queue_size: int = 4096
    momentum: float = 0.999
    temperature: float = 0.2
    # Shuffle-BN substitute within one worker: keys are encoded as this many BatchNorm groups of a
    # shuffled batch, queries as the same number of unshuffled groups (see stt/spatial.py).
    bn_splits: int = 4
    image_size: int = 224
    # MoCo v2's SGD rate for a global batch of `lr_batch` images; the effective rate is
    # lr x global batch / lr_batch (its linear scaling rule), global batch = train.batch_size x workers.
    lr: float = 0.03
    lr_batch: int = 256
    weight_decay: float = 1e-4


@dataclass
class TemporalConfig:
    """Stage 2: its objective L = L_rec^p + alpha * L_lc^e + beta * L_gc (paper 001, Sec. 3.2-3.3) and its rate."""

    rec_levels: tuple[str, ...] = ("res3", "res4")  # ("res4",) is Table 1's first row
    radius_res3: int = 12
    radius_res4: int = 6
    rec_scale: float = 20.0  # smooth-L1 is multiplied by this, per level
    channel_dropout_scale: float = 1.5  # after zeroing a or b, the whole Lab frame is scaled by this (authors, MAST)
    alpha: float = 1000.0  # local correlation distillation weight; 0 disables it
    # How the res3 correlation's 2x2 reference cells merge into one res4 cell for the pseudo-label:
    # mean (authors' code, RAFT-style avg-pool; pooled rows sum to 1/4) | sum (rows stay distributions)
    lc_reference_pooling: str = "mean"
    entropy: str = "neglog"  # neglog (Eq. 6 as printed, authors' code) | shannon | none
    entropy_threshold: float = 0.7
    # Which keys a row's score is over (stt.losses.entropy_score): normalised (in-frame keys against the
    # uniform row over them: no border bias) | padded (the authors' fixed zero-padded window) | in-frame
    entropy_window: str = "normalised"
    threshold_mode: str = "keep_fraction"  # keep_fraction (per-sample quantile) | absolute
    beta: float = 50.0  # global correlation distillation weight; 0 disables it
    teacher_temperature: float = 0.07
    # The stage's Adam rate for a global batch of `lr_batch` pairs; effective rate = lr x global batch / lr_batch
    # (the same linear rule as spatial.lr and vfs.lr). Paper 001: 1e-4 at 128 pairs (ResNet-18); the authors'
    # code (configs/train/train.py, ResNet-50, 16 x 4 GPUs = 64 pairs) uses 5e-5, which the same rule gives.
    # Default: 16 x 8 workers = 128.
    lr: float = 1e-4
    lr_batch: int = 128


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
    sampling: str = "distant"
    interval: int = 32
    image_size: int = 224  # each frame: its own random resized crop (area 0.2-1, aspect 3/4-4/3) to this, its own flip
    crop_scale: tuple[float, float] = (0.2, 1.0)
    color_aug: bool = False  # MoCo v2's jitter/grayscale/blur per frame; hurts DAVIS (Table 2: 65.0 -> 61.9)
    # SGD (momentum 0.9) rate for a global batch of `lr_batch` pairs, scaled linearly (paper: 0.05 at 256)
    lr: float = 0.05
    lr_batch: int = 256
    weight_decay: float = 1e-4


@dataclass
class PropagationConfig:
    """Label propagation, Algorithm 1 of paper 004; defaults are DESIGN.md's DAVIS settings."""

    aggregation: str = "overall"  # overall | per-frame
    per_frame_norm: str = "before-mask"  # per-frame softmax over the whole frame (UVC) | after-mask (MAST)
    temperature: float = 0.07
    topk: int = 10
    context: int = 20  # previous frames used as context, in addition to the first frame
    # In feature cells; 0 disables the spatial window. None: the authors' radius for the task and the
    # feature stride (stt.propagation.AUTHORS_RADIUS: DAVIS 12 / JHMDB 5 / VIP 16 cells at stride 8,
    # 35 / 12 / 35 at stride 4), resolved by the evaluator once it knows both.
    radius: float | None = None
    window: str = "square"  # square | circle
    window_first_frame: bool = True
    soft_labels: bool = True  # carry soft predictions forward (else one-hot argmax)
    normalize: bool = True  # L2-normalise features
    # The authors' evaluator (vanilla_tracker.py), each rule off by default (DESIGN.md says why);
    # `python -m stt.evaluate --preset authors` or configs/authors.yaml turns on all three:
    repeat_first_frame: bool = False  # early targets see the first frame twice (key_start = max(0, t - context))
    label_sampling: str = "area"  # first labels on the grid: area (fraction of each cell) | nearest (one pixel, PIL)
    minmax_normalise: bool = False  # per-frame, per-channel min-max of the upsampled soft labels before the argmax
    chunk_size: int = 2048  # target positions per chunk in the windowed implementation


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

    layer: str = "res4"
    max_short_side: int = 480  # frames are fed at native size, downscaled only if taller than this (DAVIS: 480p)
    vip_size: int = 560
    jhmdb_size: int = 320  # the authors: JHMDB frames resized to 320 x 320, VIP to 560 x 560
    batch_size: int = 8


@dataclass
class DataConfig:
    """Where the data comes from and how training pairs are sampled."""

    root: str = ""  # empty: the embedded synthetic default
    images: str = ""  # image folder for the spatial stage; empty: frames of `root`
    crop_size: int = 256
    crop_scale: tuple[float, float] = (0.6, 1.0)
    crop_ratio: tuple[float, float] = (1.5, 2.0)
    frame_gap: int = 1  # in annotated-list steps; YouTube-VOS lists every 5th raw frame
    data_cpus: float = 1.0  # CPUs of the Ray Data decode/augment actors, kept free of Train workers (stt.data.pipeline)
    # Decode and augment in a background thread of the (single) Train worker instead of in Ray Data tasks:
    # the same stream without Ray Data's start-up, which dominates short runs on a small machine (the
    # quick and laptop sweep plans); --workers 1 only. data_cpus is then not reserved.
    decode_in_worker: bool = False


@dataclass
class TrainConfig:
    """The optimisation schedule of one stage."""

    recipe: str = "spatial-then-temporal"
    gamma: float = 1.0  # spatiotemporal recipe only: L = L_nce + gamma * L_t (paper 001 Sec. 3.3 (ii))
    # EWC recipes only (stt.ewc): penalty weight lambda (paper 001 does not state it: tune it) and the
    # batches of the earlier stage's own stream its diagonal Fisher is averaged over, at its last step.
    ewc_weight: float = 100.0
    ewc_fisher_batches: int = 8
    # LwF recipe only (stt.lwf): weight lambda_o of the distillation term (LwF: 1) and its temperature T (LwF: 2)
    lwf_weight: float = 1.0
    lwf_temperature: float = 2.0
    batch_size: int = 16  # per worker: the global batch is batch_size x workers
    # Each stage's rate is its own section's: spatial.lr (also the joint stage's), temporal.lr, vfs.lr.
    warmup_steps: int = 100
    max_steps: int = 1000
    checkpoint_every: int = 100
    seed: int = 0
    log_every: int = 10  # steps between ray.train.report calls (a barrier across workers): metrics averaged over them
    eval_every: int = 500  # steps between DAVIS J&F evaluations on rank 0 (at a checkpoint); 0 disables them
    # More steps to evaluate (and checkpoint) at, whatever eval_every says: the sweep's rungs (stt.sweep.plans)
    eval_steps: tuple[int, ...] = ()
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
    """Check every value's range and every choice; a UsageError names the first bad key.

    Run on every loaded configuration, before anything expensive starts (Ray, feature extraction): a
    value outside these ranges would otherwise surface as a crash deep in a worker, or as a number.
    The choices are the ones the modules that use them declare.
    """
    from stt.losses import ENTROPY_SCORES, ENTROPY_WINDOWS, PYRAMID_LEVELS, REFERENCE_POOLINGS, THRESHOLD_MODES
    from stt.models import ARCHS, LEVELS, STRIDES
    from stt.propagation import AGGREGATIONS, LABEL_SAMPLINGS, PER_FRAME_NORMS, WINDOWS
    from stt.recipes import RECIPES
    from stt.vfs import SAMPLINGS as VFS_SAMPLINGS

    m, s, t, p, e, d, r = (
        config.model,
        config.spatial,
        config.temporal,
        config.propagation,
        config.eval,
        config.data,
        config.train,
    )
    for name, value, allowed in (
        ("model.arch", m.arch, tuple(ARCHS)),
        ("model.stride", m.stride, STRIDES),
        ("model.input_space", m.input_space, ("rgb", "lab")),
        ("spatial.method", s.method, ("moco", "detco")),
        ("temporal.lc_reference_pooling", t.lc_reference_pooling, REFERENCE_POOLINGS),
        ("temporal.entropy", t.entropy, ENTROPY_SCORES),
        ("temporal.entropy_window", t.entropy_window, ENTROPY_WINDOWS),
        ("temporal.threshold_mode", t.threshold_mode, THRESHOLD_MODES),
        ("propagation.aggregation", p.aggregation, AGGREGATIONS),
        ("propagation.per_frame_norm", p.per_frame_norm, PER_FRAME_NORMS),
        ("propagation.window", p.window, WINDOWS),
        ("propagation.label_sampling", p.label_sampling, LABEL_SAMPLINGS),
        ("eval.layer", e.layer, LEVELS),
        ("train.recipe", r.recipe, tuple(RECIPES)),
        ("vfs.sampling", config.vfs.sampling, VFS_SAMPLINGS),
    ):
        check_choice(name, value, allowed)
    if not t.rec_levels or set(t.rec_levels) - set(PYRAMID_LEVELS) or len(set(t.rec_levels)) != len(t.rec_levels):
        raise UsageError(
            f"temporal.rec_levels: expected distinct levels among {PYRAMID_LEVELS}, got {list(t.rec_levels)}"
        )
    positive = {  # > 0
        "spatial.feature_dim": s.feature_dim,
        "spatial.queue_size": s.queue_size,
        "spatial.bn_splits": s.bn_splits,
        "spatial.image_size": s.image_size,
        "spatial.lr": s.lr,
        "spatial.lr_batch": s.lr_batch,
        "spatial.temperature": s.temperature,
        "temporal.radius_res3": t.radius_res3,
        "temporal.radius_res4": t.radius_res4,
        "temporal.rec_scale": t.rec_scale,
        "temporal.channel_dropout_scale": t.channel_dropout_scale,
        "temporal.teacher_temperature": t.teacher_temperature,
        "propagation.temperature": p.temperature,
        "propagation.topk": p.topk,
        "propagation.chunk_size": p.chunk_size,
        "eval.vip_size": e.vip_size,
        "eval.jhmdb_size": e.jhmdb_size,
        "eval.batch_size": e.batch_size,
        "data.frame_gap": d.frame_gap,
        "data.data_cpus": d.data_cpus,
        "train.batch_size": r.batch_size,
        "temporal.lr": t.lr,
        "temporal.lr_batch": t.lr_batch,
        "train.max_steps": r.max_steps,
        "train.checkpoint_every": r.checkpoint_every,
        "train.log_every": r.log_every,
        "train.ewc_fisher_batches": r.ewc_fisher_batches,
        "train.lwf_temperature": r.lwf_temperature,
        "vfs.interval": config.vfs.interval,
        "vfs.image_size": config.vfs.image_size,
        "vfs.lr": config.vfs.lr,
        "vfs.lr_batch": config.vfs.lr_batch,
    }
    non_negative = {  # >= 0; 0 means off / none / native size
        "spatial.weight_decay": s.weight_decay,
        "temporal.alpha": t.alpha,
        "temporal.beta": t.beta,
        "propagation.context": p.context,
        "propagation.radius": p.radius or 0,
        "eval.max_short_side": e.max_short_side,
        "train.gamma": r.gamma,
        "train.ewc_weight": r.ewc_weight,
        "train.lwf_weight": r.lwf_weight,
        "vfs.weight_decay": config.vfs.weight_decay,
        "train.warmup_steps": r.warmup_steps,
        "train.eval_every": r.eval_every,
    }
    for name, value in positive.items():
        if not value > 0:
            raise UsageError(f"{name}: expected a positive value, got {value!r}")
    for name, value in non_negative.items():
        if not value >= 0:
            raise UsageError(f"{name}: expected zero or more, got {value!r}")
    if any(step < 1 for step in r.eval_steps):
        raise UsageError(f"train.eval_steps: expected steps >= 1, got {list(r.eval_steps)}")
    if not 0 <= s.momentum < 1:
        raise UsageError(f"spatial.momentum: expected a value in [0, 1), got {s.momentum!r}")
    if t.threshold_mode == "keep_fraction" and not 0 < t.entropy_threshold <= 1:
        raise UsageError(f"temporal.entropy_threshold: expected a kept fraction in (0, 1], got {t.entropy_threshold!r}")
    if d.crop_size < 32 or d.crop_size % 32:
        # the global distillation compares res5 maps at stride 32: the crop must tile into whole cells
        raise UsageError(f"data.crop_size: expected a positive multiple of 32, got {d.crop_size!r}")
    low, high = d.crop_scale
    if not 0 < low <= high <= 1:
        raise UsageError(
            f"data.crop_scale: expected 0 < low <= high <= 1 (fractions of the frame area), got {list(d.crop_scale)}"
        )
    low, high = config.vfs.crop_scale
    if not 0 < low <= high <= 1:
        raise UsageError(
            "vfs.crop_scale: expected 0 < low <= high <= 1 (fractions of the frame area), "
            f"got {list(config.vfs.crop_scale)}"
        )
    low, high = d.crop_ratio
    if not 0 < low <= high:
        raise UsageError(f"data.crop_ratio: expected 0 < low <= high (width / height), got {list(d.crop_ratio)}")
    return config


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type, or raise naming `where`."""
    origin = typing.get_origin(annotation)
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
