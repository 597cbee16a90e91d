"""Paper 001's training configurations as configuration, and the temporal training step.

Table 1 (temporal feature learning, ablated) is four `TemporalConfig`s: `TABLE1_ROWS` holds each
row's overrides. Table 2 (training configurations) is `train.recipe`: `RECIPES` says which stages
run in which order, whether the temporal stage keeps global correlation distillation, and which
stage, if any, is regularised by EWC toward the stage before it (stt.ewc) or distils the stage before
it LwF-style (stt.lwf). Beside Table 2, `vfs` trains another method (paper 003, stt.vfs) on the same
data for comparison under the same evaluation. `stage_spec` turns a
recipe and a config into one `StageSpec` per stage, once: its input, streams, optimiser and rate,
objective, teacher, pyramid levels, EWC anchor and Fisher batches. The trainer and the steps read
the spec; nothing forks the code and nothing works a fact out twice.

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
from stt.config import Config, ModelConfig, TemporalConfig, from_dict, to_dict
from stt.data.augment import IMAGENET_MEAN, IMAGENET_STD
from stt.losses import student_levels, temporal_losses
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
    lwf_stage: str | None = None  # this stage adds LwF's distillation of the stage before's outputs (stt.lwf)


RECIPES: dict[str, Recipe] = {
    "spatial": Recipe(("spatial",), global_distillation=False),
    "temporal": Recipe(("temporal",), global_distillation=False),
    "spatiotemporal": Recipe(("spatiotemporal",), global_distillation=False),
    "spatial-then-temporal": Recipe(("spatial", "temporal"), global_distillation=True),
    "spatial-then-temporal-no-gc": Recipe(("spatial", "temporal"), global_distillation=False),
    "spatial-then-temporal-ewc": Recipe(("spatial", "temporal"), global_distillation=False, ewc_stage="temporal"),
    "spatial-then-temporal-lwf": Recipe(("spatial", "temporal"), global_distillation=False, lwf_stage="temporal"),
    "temporal-then-spatial": Recipe(("temporal", "spatial"), global_distillation=False),
    "temporal-then-spatial-ewc": Recipe(("temporal", "spatial"), global_distillation=False, ewc_stage="spatial"),
    # not a Table 2 row: VFS (paper 003), trained on the same videos for the one-protocol comparison
    "vfs": Recipe(("vfs",), global_distillation=False),
}


STAGES = ("spatial", "temporal", "spatiotemporal", "vfs")
# What each stage's encoder is fed; the evaluator feeds the same. The joint stage's trunk sees both;
# it is evaluated on Lab, the input of the objective that learns correspondence. VFS: ImageNet-normalised RGB.
INPUT_SPACE = {"spatial": "rgb", "temporal": "lab", "spatiotemporal": "lab", "vfs": "rgb"}
STREAMS = {"spatial": ("spatial",), "temporal": ("temporal",), "spatiotemporal": ("spatial", "temporal"), "vfs": ("vfs",)}


def recipe_of(cfg: Config) -> Recipe:
    if cfg.train.recipe not in RECIPES:
        raise ValueError(f"train.recipe: expected one of {sorted(RECIPES)}, got {cfg.train.recipe!r}")
    return RECIPES[cfg.train.recipe]


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a recipe, resolved once from the recipe and the config (`stage_spec`)."""

    name: str  # "spatial" | "temporal" | "spatiotemporal" | "vfs"
    config: Config  # the run's config, model.input_space set to the stage's input (stored in its checkpoints)
    streams: tuple[str, ...]  # the data streams a step reads one batch of each
    optimiser: str  # "sgd": MoCo v2's (spatial, joint stage) or VFS's (vfs.lr) | "adam": the temporal stage's
    temporal: TemporalConfig | None  # the temporal objective as the recipe runs it (beta 0 without a teacher)
    teacher: bool  # global correlation distillation from the frozen earlier-stage encoder
    student_levels: tuple[str, ...]  # the student pyramid levels its temporal terms read
    ewc: bool  # the EWC penalty toward the stage before (whose checkpoint must hold a Fisher)
    fisher_batches: int  # batches the Fisher it leaves is averaged over at its last step (0: it leaves none)
    lwf: bool = False  # LwF toward the stage before (stt.lwf: its checkpoint must hold MoCo's head and queue)

    @property
    def lr_section(self) -> str:
        if self.name == "vfs":
            return "vfs"
        return "spatial" if self.optimiser == "sgd" else "train"

    def peak_lr(self, workers: int) -> float:
        """The optimiser's rate for its reference global batch (`<section>.lr_batch`), scaled linearly
        (MoCo v2's rule) to the real global batch, train.batch_size x workers."""
        section = getattr(self.config, self.lr_section)
        return section.lr * self.config.train.batch_size * workers / section.lr_batch

    def describe_lr(self, workers: int) -> str:
        """One line for the start of the stage: the rate it really uses, and where it comes from."""
        section, train = getattr(self.config, self.lr_section), self.config.train
        batch = train.batch_size * workers
        return (f"stt.train: {self.name} stage: global batch {batch} ({train.batch_size} x {workers} workers), effective lr "
                f"{self.peak_lr(workers):.3g} ({self.lr_section}.lr {section.lr:g} x {batch} / {self.lr_section}.lr_batch "
                f"{section.lr_batch})")

    @property
    def find_unused_parameters(self) -> bool:
        """DistributedDataParallel must be told: without global distillation the temporal objective
        never reaches res5 (layer4), whose parameters then get no gradient."""
        return self.name == "temporal" and not self.teacher and not self.lwf


def stage_spec(cfg: Config, stage: str) -> StageSpec:
    """The `StageSpec` of `stage` under `cfg`'s recipe (`cfg` itself is left alone)."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    recipe = recipe_of(cfg)
    staged = from_dict(to_dict(cfg))
    staged.model.input_space = INPUT_SPACE[stage]
    temporal = None
    if stage != "spatial":
        # L_gc needs a frozen teacher from an earlier stage: recipes without one drop it (beta = 0)
        temporal = cfg.temporal if recipe.global_distillation else dataclasses.replace(cfg.temporal, beta=0.0)
    position = recipe.stages.index(stage) if stage in recipe.stages else -1
    # the stage whose weights and Fisher the recipe's EWC stage is anchored to leaves them at its last step
    anchors_ewc = recipe.ewc_stage is not None and position >= 0 and recipe.stages.index(recipe.ewc_stage) == position + 1
    if stage == "vfs":
        temporal = None
    lwf = recipe.lwf_stage == stage
    return StageSpec(
        name=stage, config=staged, streams=STREAMS[stage], optimiser="adam" if stage == "temporal" else "sgd",
        temporal=temporal, teacher=temporal is not None and temporal.beta > 0,
        student_levels=stage_levels(temporal, lwf) if temporal is not None else (),
        ewc=recipe.ewc_stage == stage, fisher_batches=cfg.train.ewc_fisher_batches if anchors_ewc else 0, lwf=lwf,
    )


def stage_levels(temporal: TemporalConfig, lwf: bool = False) -> tuple[str, ...]:
    """The student levels a temporal step reads: its terms' (stt.losses.student_levels), and res5 for LwF."""
    levels = student_levels(temporal)
    return (*levels, "res5") if lwf and "res5" not in levels else levels


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
    temporal: TemporalConfig,
    generator: torch.Generator | None = None,
    penalty: Callable[[], Tensor] | None = None,
    lwf: nn.Module | None = None,
) -> dict[str, Tensor]:
    """The temporal loss of one batch of (target, reference) pairs.

    batch: "target", "reference": B x 3 x H x W RGB (uint8, or float in [0, 1]); optionally
        "target_lab", "reference_lab" (normalised Lab, stt.data.pipeline with lab=True), else the
        Lab frames are computed here, on the frames' device.
    student: encoder with forward(x, layers) -> {level: features} (stt.models.Encoder), fed Lab.
    temporal: the objective as the stage runs it (`StageSpec.temporal`: beta is 0 without a teacher).
    teacher: the frozen spatial encoder, fed ImageNet-normalised RGB (what it was trained on, as in
        the authors' code); needed when temporal.beta > 0, ignored otherwise.
    generator: the random source of the dropped colour channel (None: torch's global one).
    penalty: an extra regulariser added to "loss" (e.g. the EWC penalty), reported as "penalty".
    lwf: stt.lwf.LwF (the frozen earlier network's outputs as soft targets for the student's res5):
        adds lwf.weight x its term to "loss", reported unweighted as "lwf".
    Returns stt.losses.temporal_losses's dict ("loss" to backpropagate, detached terms).
    """
    rgb_t, rgb_r = _rgb01(batch["target"], "target"), _rgb01(batch["reference"], "reference")
    if "target_lab" in batch and "reference_lab" in batch:
        lab_t, lab_r = batch["target_lab"].float(), batch["reference_lab"].float()
    else:
        lab_t, lab_r = normalize_lab(rgb_to_lab(rgb_t)), normalize_lab(rgb_to_lab(rgb_r))
    input_t, input_r, dropped = drop_color_channel(lab_t, lab_r, generator, temporal.channel_dropout_scale)

    # One pass over both frames, as the authors do: BatchNorm normalises them together.
    pyramid = student(torch.cat([input_t, input_r]), layers=stage_levels(temporal, lwf is not None))
    student_t = {level: features.chunk(2)[0] for level, features in pyramid.items()}
    student_r = {level: features.chunk(2)[1] for level, features in pyramid.items()}

    teacher_t = teacher_r = None
    if temporal.beta > 0:
        if teacher is None:
            raise ValueError(f"temporal.beta={temporal.beta} needs the frozen teacher (global correlation distillation)")
        with torch.no_grad():
            res5 = teacher(imagenet_normalize(torch.cat([rgb_t, rgb_r])), layers=("res5",))["res5"]
        teacher_t, teacher_r = {"res5": res5.chunk(2)[0]}, {"res5": res5.chunk(2)[1]}

    losses = temporal_losses(
        student_t, student_r, take_channel(lab_t, dropped), take_channel(lab_r, dropped), temporal, teacher_t, teacher_r
    )
    if lwf is not None:  # the old network sees the RGB it was trained on; the student its Lab input
        term = lwf(imagenet_normalize(torch.cat([rgb_t, rgb_r])), pyramid["res5"])
        losses = {**losses, "loss": losses["loss"] + lwf.weight * term, "lwf": term.detach()}
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
    temporal: TemporalConfig,
    gamma: float,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Recipe (ii): L = L_nce + gamma * L_t with one trunk (student = shared_trunk_student(moco's encoder)).

    spatial_batch: {"view_q", "view_k"} (stt.spatial.MoCo's input); temporal_batch, temporal: as
    `temporal_step` (no teacher: beta must be 0). Returns "loss", "nce" and the temporal terms.
    """
    nce = moco(spatial_batch["view_q"], spatial_batch["view_k"])["loss"]
    terms = temporal_step(student, None, temporal_batch, temporal, generator)
    return {**terms, "loss": nce + gamma * terms["loss"], "nce": nce.detach()}


class SpatiotemporalModel(nn.Module):
    """Recipe (ii) as one module, so DistributedDataParallel sees one forward per step:
    forward(spatial_batch, temporal_batch) -> `spatiotemporal_step`'s losses."""

    def __init__(self, moco: nn.Module, spec: StageSpec):
        super().__init__()
        self.moco = moco
        self.student = shared_trunk_student(moco.encoder, spec.config.model)  # the same parameters, registered twice
        self.temporal, self.gamma = spec.temporal, spec.config.train.gamma

    def forward(self, spatial_batch: dict[str, Tensor], temporal_batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return spatiotemporal_step(self.moco, self.student, spatial_batch, temporal_batch, self.temporal, self.gamma)
