"""Paper 001's training configurations as configuration: Table 1 rows, Table 2 recipes, each stage's spec.

Table 1 (temporal feature learning, ablated) is four `TemporalConfig`s: `TABLE1_ROWS` holds each
row's overrides. Table 2 (training configurations) is `train.recipe`: `RECIPES` says which stages
run in which order, whether the temporal stage keeps global correlation distillation, and which
stage, if any, is regularised by EWC toward the stage before it (stt.ewc) or distils the stage before
it LwF-style (stt.lwf). Beside Table 2, `vfs` trains another method (paper 003, stt.vfs) on the same
data for comparison under the same evaluation. `stage_spec` turns a
recipe and a config into one `StageSpec` per stage, once: its kind of stage (the stt.stages.Stage object: input,
streams, optimiser and rate, model and losses), objective, teacher, EWC anchor and Fisher batches, LwF. The
trainer and the steps read the spec; nothing forks the code on a stage's name and nothing works a fact out twice.
"""

from __future__ import annotations

import dataclasses
from typing import get_args

from stt.config import Config, RecipeName, TemporalConfig, from_dict, to_dict
from stt.errors import UsageError
from stt.models import MAST_ARCH, TORCHVISION_ARCHS
from stt.stages import STAGES, Stage

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
# train.recipe's choices are declared once, in stt.config; each has its Recipe here
if tuple(RECIPES) != get_args(RecipeName):
    raise AssertionError(f"stt.config.RecipeName {get_args(RecipeName)} and RECIPES {tuple(RECIPES)} differ")
if unknown := {stage for recipe in RECIPES.values() for stage in recipe.stages} - set(STAGES):
    raise AssertionError(f"RECIPES name stages stt.stages.STAGES does not have: {sorted(unknown)}")


def recipe_of(cfg: Config) -> Recipe:
    if cfg.train.recipe not in RECIPES:
        raise ValueError(f"train.recipe: expected one of {sorted(RECIPES)}, got {cfg.train.recipe!r}")
    return RECIPES[cfg.train.recipe]


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of a recipe, resolved once from the recipe and the config (`stage_spec`)."""

    stage: Stage  # its kind (stt.stages.STAGES): input, streams, optimiser, model, losses
    config: Config  # the run's config, model.input_space set to the stage's input (stored in its checkpoints)
    temporal: TemporalConfig | None  # the temporal objective as the recipe runs it (beta 0 without a teacher)
    teacher: bool  # global correlation distillation from the frozen earlier-stage encoder
    ewc: bool  # the EWC penalty toward the stage before (whose checkpoint must hold a Fisher)
    fisher_batches: int  # batches the Fisher it leaves is averaged over at its last step (0: it leaves none)
    lwf: bool = False  # LwF toward the stage before (stt.lwf: its checkpoint must hold MoCo's head and queue)

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def streams(self) -> tuple[str, ...]:
        """The data streams a step reads one batch of each."""
        return tuple(self.stage.streams)

    @property
    def optimiser(self) -> str:
        return self.stage.optimiser

    @property
    def lr_section(self) -> str:
        return self.stage.lr_section

    def peak_lr(self, workers: int) -> float:
        """The optimiser's rate for its reference global batch (`<section>.lr_batch`), scaled linearly
        (MoCo v2's rule) to the real global batch, train.batch_size x workers."""
        section = getattr(self.config, self.lr_section)
        return section.lr * self.config.train.batch_size * workers / section.lr_batch

    def describe_lr(self, workers: int) -> str:
        """One line for the start of the stage: the rate it really uses, and where it comes from."""
        section, train = getattr(self.config, self.lr_section), self.config.train
        batch = train.batch_size * workers
        return (
            f"stt.train: {self.name} stage: global batch {batch} ({train.batch_size} x {workers} workers), "
            "effective lr "
            f"{self.peak_lr(workers):.3g} ({self.lr_section}.lr {section.lr:g} x {batch} / {self.lr_section}.lr_batch "
            f"{section.lr_batch})"
        )

    @property
    def find_unused_parameters(self) -> bool:
        """DistributedDataParallel must be told: without global distillation the temporal objective
        never reaches res5 (layer4), whose parameters then get no gradient."""
        return self.stage.find_unused_parameters(self)


def stage_spec(cfg: Config, stage: str) -> StageSpec:
    """The `StageSpec` of `stage` under `cfg`'s recipe (`cfg` itself is left alone)."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {tuple(STAGES)}, got {stage!r}")
    if cfg.model.arch == MAST_ARCH:  # refused here, on the driver, rather than in a worker's builder
        raise UsageError(
            f"model.arch={MAST_ARCH}: MAST's trunk evaluates MAST releases only; no stt stage trains it "
            f"(train with one of {tuple(TORCHVISION_ARCHS)})"
        )
    recipe, kind = recipe_of(cfg), STAGES[stage]()
    staged = from_dict(to_dict(cfg))
    staged.model.input_space = kind.input_space
    temporal = None
    if kind.temporal_objective:
        # L_gc needs a frozen teacher from an earlier stage: recipes without one drop it (beta = 0)
        temporal = cfg.temporal if recipe.global_distillation else dataclasses.replace(cfg.temporal, beta=0.0)
    position = recipe.stages.index(stage) if stage in recipe.stages else -1
    # the stage whose weights and Fisher the recipe's EWC stage is anchored to leaves them at its last step
    anchors_ewc = (
        recipe.ewc_stage is not None and position >= 0 and recipe.stages.index(recipe.ewc_stage) == position + 1
    )
    return StageSpec(
        stage=kind,
        config=staged,
        temporal=temporal,
        teacher=temporal is not None and temporal.beta > 0,
        ewc=recipe.ewc_stage == stage,
        fisher_batches=cfg.train.ewc_fisher_batches if anchors_ewc else 0,
        lwf=recipe.lwf_stage == stage,
    )


def table1_config(row: str, base: TemporalConfig | None = None) -> TemporalConfig:
    """The TemporalConfig of one Table 1 row (radii, weights and scores otherwise from `base`)."""
    if row not in TABLE1_ROWS:
        raise ValueError(f"Table 1 row: expected one of {list(TABLE1_ROWS)}, got {row!r}")
    return dataclasses.replace(base or TemporalConfig(), **TABLE1_ROWS[row])
