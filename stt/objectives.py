"""Paper 001's training configurations as configuration, and the temporal training step.

Table 1 (temporal feature learning, ablated) is four `TemporalConfig`s: `TABLE1_ROWS` holds each
row's overrides. Table 2 (training configurations) is `train.recipe`: `RECIPES` says which stages
run in which order, whether the temporal stage keeps global correlation distillation, and which
stage, if any, is regularised by EWC toward the stage before it (stt.ewc). The trainer reads a
recipe; nothing forks the code.

`temporal_step` is the temporal stage's loss on one batch: Lab conversion, the colour bottleneck,
one student pass over both frames, the frozen teacher on RGB, and stt.losses.temporal_losses.
`spatiotemporal_step` is recipe (ii): L_nce + gamma L_t on one shared trunk.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor, nn

from stt.color import drop_color_channel, normalize_lab, rgb_to_lab, take_channel
from stt.config import Config, ModelConfig, TemporalConfig
from stt.data.augment import IMAGENET_MEAN, IMAGENET_STD
from stt.losses import PYRAMID_LEVELS, temporal_losses
from stt.models import Encoder

# Paper 001 Table 1 (ResNet-18, temporal stage only, hence no teacher): rows top to bottom.
TABLE1_ROWS: dict[str, dict] = {
    "frame-reconstruction": {"rec_levels": ("res4",), "alpha": 0.0, "entropy": "none", "beta": 0.0},
    "pyramid-reconstruction": {"rec_levels": ("res3", "res4"), "alpha": 0.0, "entropy": "none", "beta": 0.0},
    "local-distillation": {"rec_levels": ("res3", "res4"), "entropy": "none", "beta": 0.0},
    "entropy-selection": {"rec_levels": ("res3", "res4"), "beta": 0.0},
}


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One row group of paper 001 Table 2."""

    stages: tuple[str, ...]  # run in this order: "spatial", "temporal", or the joint "spatiotemporal"
    global_distillation: bool  # the temporal stage keeps beta * L_gc (needs a spatial stage before it)
    ewc_stage: str | None = None  # this stage adds the EWC penalty toward the weights of the stage before


RECIPES: dict[str, Recipe] = {
    "spatial": Recipe(("spatial",), global_distillation=False),
    "temporal": Recipe(("temporal",), global_distillation=False),
    "spatiotemporal": Recipe(("spatiotemporal",), global_distillation=False),
    "spatial-then-temporal": Recipe(("spatial", "temporal"), global_distillation=True),
    "spatial-then-temporal-no-gc": Recipe(("spatial", "temporal"), global_distillation=False),
    "spatial-then-temporal-ewc": Recipe(("spatial", "temporal"), global_distillation=False, ewc_stage="temporal"),
    "temporal-then-spatial": Recipe(("temporal", "spatial"), global_distillation=False),
    "temporal-then-spatial-ewc": Recipe(("temporal", "spatial"), global_distillation=False, ewc_stage="spatial"),
}


def recipe_of(cfg: Config) -> Recipe:
    if cfg.train.recipe not in RECIPES:
        raise ValueError(f"train.recipe: expected one of {sorted(RECIPES)}, got {cfg.train.recipe!r}")
    return RECIPES[cfg.train.recipe]


def feeds_ewc(cfg: Config, stage: str) -> bool:
    """Whether `stage` is the one the recipe's EWC stage is anchored to (it must leave its Fisher)."""
    recipe = recipe_of(cfg)
    if recipe.ewc_stage is None:
        return False
    anchored_to = recipe.stages.index(recipe.ewc_stage) - 1
    return anchored_to >= 0 and recipe.stages[anchored_to] == stage


def add_penalty(losses: dict[str, Tensor], penalty: Callable[[], Tensor] | None) -> dict[str, Tensor]:
    """losses with penalty() added to "loss" and reported as "penalty" (unchanged if penalty is None)."""
    if penalty is None:
        return losses
    extra = penalty()
    return {**losses, "loss": losses["loss"] + extra, "penalty": extra.detach()}


def table1_config(row: str, base: TemporalConfig | None = None) -> TemporalConfig:
    """The TemporalConfig of one Table 1 row (radii, weights and scores otherwise from `base`)."""
    if row not in TABLE1_ROWS:
        raise ValueError(f"Table 1 row: expected one of {list(TABLE1_ROWS)}, got {row!r}")
    return dataclasses.replace(base or TemporalConfig(), **TABLE1_ROWS[row])


def temporal_config(cfg: Config) -> TemporalConfig:
    """cfg.temporal as the recipe runs it: beta is zeroed unless the recipe distils from a teacher."""
    if recipe_of(cfg).global_distillation:
        return cfg.temporal
    return dataclasses.replace(cfg.temporal, beta=0.0)


def imagenet_normalize(rgb: Tensor) -> Tensor:
    """B x 3 x H x W RGB in [0, 1] -> the spatial stage's (and so the teacher's) input."""
    mean = rgb.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = rgb.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb - mean) / std


def _rgb01(frames: Tensor, name: str) -> Tensor:
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"batch[{name!r}]: expected B x 3 x H x W RGB frames, got shape {tuple(frames.shape)}")
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def temporal_step(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, Tensor],
    cfg: Config,
    generator: torch.Generator | None = None,
    penalty: Callable[[], Tensor] | None = None,
) -> dict[str, Tensor]:
    """The temporal loss of one batch of (target, reference) pairs under `cfg`'s recipe.

    batch: "target", "reference": B x 3 x H x W RGB (uint8, or float in [0, 1]); optionally
        "target_lab", "reference_lab" (normalised Lab, stt.data.pipeline with lab=True), else the
        Lab frames are computed here, on the frames' device.
    student: encoder with forward(x, layers) -> {level: features} (stt.models.Encoder), fed Lab.
    teacher: the frozen spatial encoder, fed ImageNet-normalised RGB (what it was trained on, as in
        the authors' code); needed when the recipe keeps L_gc, ignored otherwise.
    generator: the random source of the dropped colour channel (None: torch's global one).
    penalty: an extra regulariser added to "loss" (e.g. the EWC penalty), reported as "penalty".
    Returns stt.losses.temporal_losses's dict ("loss" to backpropagate, detached terms).
    """
    temporal = temporal_config(cfg)
    rgb_t, rgb_r = _rgb01(batch["target"], "target"), _rgb01(batch["reference"], "reference")
    if "target_lab" in batch and "reference_lab" in batch:
        lab_t, lab_r = batch["target_lab"].float(), batch["reference_lab"].float()
    else:
        lab_t, lab_r = normalize_lab(rgb_to_lab(rgb_t)), normalize_lab(rgb_to_lab(rgb_r))
    input_t, input_r, dropped = drop_color_channel(lab_t, lab_r, generator, temporal.channel_dropout_scale)

    levels = [level for level in PYRAMID_LEVELS if level in temporal.rec_levels or temporal.alpha > 0]
    if temporal.beta > 0:
        levels.append("res5")
    # One pass over both frames, as the authors do: BatchNorm normalises them together.
    pyramid = student(torch.cat([input_t, input_r]), layers=tuple(levels))
    student_t = {level: features.chunk(2)[0] for level, features in pyramid.items()}
    student_r = {level: features.chunk(2)[1] for level, features in pyramid.items()}

    teacher_t = teacher_r = None
    if temporal.beta > 0:
        if teacher is None:
            raise ValueError(f"recipe {cfg.train.recipe!r} with temporal.beta={temporal.beta} needs the frozen teacher")
        with torch.no_grad():
            res5 = teacher(imagenet_normalize(torch.cat([rgb_t, rgb_r])), layers=("res5",))["res5"]
        teacher_t, teacher_r = {"res5": res5.chunk(2)[0]}, {"res5": res5.chunk(2)[1]}

    losses = temporal_losses(
        student_t, student_r, take_channel(lab_t, dropped), take_channel(lab_r, dropped), temporal, teacher_t, teacher_r
    )
    return add_penalty(losses, penalty)


def shared_trunk_student(encoder: Encoder, model: ModelConfig) -> Encoder:
    """A stride-8 student whose every parameter *is* `encoder`'s (a standard-stride trunk, e.g. MoCo's).

    The stride-8 layout differs from the standard one only in module-free parts (no stem max-pool,
    an average pool before layer4), so the two can share conv and BatchNorm modules; the stride-4
    layout changes layer3's conv strides and cannot.
    """
    if model.stride != 8:
        raise ValueError(f"model.stride: the spatiotemporal recipe shares one trunk, which needs stride 8, got {model.stride}")
    student = Encoder(encoder.arch, 8)
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
        setattr(student, name, getattr(encoder, name))
    return student


def spatiotemporal_step(
    moco: nn.Module,
    student: nn.Module,
    spatial_batch: dict[str, Tensor],
    temporal_batch: dict[str, Tensor],
    cfg: Config,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Recipe (ii): L = L_nce + gamma * L_t with one trunk (student = shared_trunk_student(moco's encoder)).

    spatial_batch: {"view_q", "view_k"} (stt.spatial.MoCo's input); temporal_batch: as `temporal_step`.
    Returns "loss", "nce" and the temporal terms.
    """
    if recipe_of(cfg).stages != ("spatiotemporal",):
        raise ValueError(f"spatiotemporal_step runs recipe 'spatiotemporal', not train.recipe={cfg.train.recipe!r}")
    nce = moco(spatial_batch["view_q"], spatial_batch["view_k"])["loss"]
    temporal = temporal_step(student, None, temporal_batch, cfg, generator)
    return {**temporal, "loss": nce + cfg.train.gamma * temporal["loss"], "nce": nce.detach()}


class SpatiotemporalModel(nn.Module):
    """Recipe (ii) as one module, so DistributedDataParallel sees one forward per step:
    forward(spatial_batch, temporal_batch) -> `spatiotemporal_step`'s losses."""

    def __init__(self, moco: nn.Module, cfg: Config):
        super().__init__()
        self.moco = moco
        self.student = shared_trunk_student(moco.encoder, cfg.model)  # the same parameters, registered twice
        self.cfg = cfg

    def forward(self, spatial_batch: dict[str, Tensor], temporal_batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return spatiotemporal_step(self.moco, self.student, spatial_batch, temporal_batch, self.cfg)
