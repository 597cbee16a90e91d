"""The temporal stage: the stride-8/4 student on frame pairs (normalised Lab input), Adam, and, when the spec
distils globally, the frozen earlier-stage encoder as teacher (fed RGB).

`temporal_batch_loss` is the stage's loss on one batch of RGB frame pairs: Lab conversion, the colour bottleneck,
one student pass over both frames, the frozen teacher on RGB, then the objective's terms
(stt.losses.temporal_terms), the LwF term and a penalty (EWC) when given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from stt.color import drop_color_channel, imagenet_normalize, normalize_lab, rgb_to_lab, take_channel
from stt.config import Config, TemporalConfig
from stt.losses import student_levels, temporal_terms
from stt.models import Encoder, build_encoder, build_teacher, load_encoder_weights
from stt.stages.base import Built, Stage, StageModel, add_penalty

if TYPE_CHECKING:
    from stt.recipes import StageSpec


def missing_teacher(spec: StageSpec, has_init: bool) -> str | None:
    """Why the stage `spec` cannot run with this start, or None: global distillation needs a frozen teacher, the
    earlier stage's encoder (`--init`) or `model.weights`. stt.train asks before Ray starts; the builder again."""
    cfg = spec.config
    if not spec.teacher or has_init or cfg.model.weights != "random":
        return None
    return (
        f"temporal.beta={spec.temporal.beta} (train.recipe={cfg.train.recipe}) needs a frozen teacher: pass --init "
        "SPATIAL_CHECKPOINT, run --stage all, set model.weights to a local state dict, or set temporal.beta=0"
    )


def build_temporal(
    spec: StageSpec, init: dict[str, Tensor] | None, source: str = ""
) -> tuple[Encoder, Encoder | None, torch.optim.Optimizer]:
    """Student (initialised from the earlier encoder `init`, read from `source`, if given), frozen teacher if the
    spec distils globally (that same earlier encoder, or `model.weights` without one), Adam."""
    cfg = spec.config
    student = build_encoder(cfg.model)
    if init is not None:
        load_encoder_weights(student, init, source)
    teacher = None
    if spec.teacher:
        if (missing := missing_teacher(spec, init is not None)) is not None:
            raise ValueError(missing)
        teacher = build_teacher(cfg.model, init if init is not None else student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.temporal.lr)
    return student, teacher, optimizer


def pass_levels(temporal: TemporalConfig, lwf: bool = False) -> tuple[str, ...]:
    """The student levels the stage's one pass computes: its terms' (stt.losses.student_levels), and res5 for LwF."""
    levels = student_levels(temporal)
    return (*levels, "res5") if lwf and "res5" not in levels else levels


def _rgb01(frames: Tensor, name: str) -> Tensor:
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"batch[{name!r}]: expected B x 3 x H x W RGB frames, got shape {tuple(frames.shape)}")
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def temporal_batch_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, Tensor],
    temporal: TemporalConfig,
    generator: torch.Generator | None = None,
    penalty: Callable[[], Tensor] | None = None,
    lwf: nn.Module | None = None,
) -> dict[str, Tensor]:
    """The temporal stage's loss on one batch of (target, reference) RGB frame pairs.

    batch: "target", "reference": B x 3 x H x W RGB (uint8, or float in [0, 1]); their Lab is computed
        here, on the frames' device (cheaper on a GPU than shipping float Lab from the stream).
    student: encoder with forward(x, layers) -> {level: features} (stt.models.Encoder), fed Lab.
    temporal: the objective as the stage runs it (`StageSpec.temporal`: beta is 0 without a teacher).
    teacher: the frozen spatial encoder, fed ImageNet-normalised RGB (what it was trained on, as in
        the authors' code); needed when temporal.beta > 0, ignored otherwise.
    generator: the random source of the dropped colour channel (None: torch's global one).
    penalty: an extra regulariser added to "loss" (e.g. the EWC penalty), reported as "penalty".
    lwf: stt.lwf.LwF (the frozen earlier network's outputs as soft targets for the student's res5):
        adds lwf.weight x its term to "loss", reported unweighted as "lwf".
    Returns stt.losses.temporal_terms's dict ("loss" to backpropagate, detached terms).
    """
    rgb_t, rgb_r = _rgb01(batch["target"], "target"), _rgb01(batch["reference"], "reference")
    lab_t, lab_r = normalize_lab(rgb_to_lab(rgb_t)), normalize_lab(rgb_to_lab(rgb_r))
    input_t, input_r, dropped = drop_color_channel(lab_t, lab_r, generator, temporal.channel_dropout_scale)

    # One pass over both frames, as the authors do: BatchNorm normalises them together.
    pyramid = student(torch.cat([input_t, input_r]), layers=pass_levels(temporal, lwf is not None))
    student_t = {level: features.chunk(2)[0] for level, features in pyramid.items()}
    student_r = {level: features.chunk(2)[1] for level, features in pyramid.items()}

    teacher_t = teacher_r = None
    if temporal.beta > 0:
        if teacher is None:
            raise ValueError(
                f"temporal.beta={temporal.beta} needs the frozen teacher (global correlation distillation)"
            )
        with torch.no_grad():
            res5 = teacher(imagenet_normalize(torch.cat([rgb_t, rgb_r])), layers=("res5",))["res5"]
        teacher_t, teacher_r = {"res5": res5.chunk(2)[0]}, {"res5": res5.chunk(2)[1]}

    losses = temporal_terms(
        student_t, student_r, take_channel(lab_t, dropped), take_channel(lab_r, dropped), temporal, teacher_t, teacher_r
    )
    if lwf is not None:  # the old network sees the RGB it was trained on; the student its Lab input
        term = lwf(imagenet_normalize(torch.cat([rgb_t, rgb_r])), pyramid["res5"])
        losses = {**losses, "loss": losses["loss"] + lwf.weight * term, "lwf": term.detach()}
    return add_penalty(losses, penalty)


class TemporalStage(Stage):
    name = "temporal"
    input_space = "lab"
    streams = {"temporal": ("target", "reference")}  # uint8 RGB pairs: Lab is computed on the worker's device
    optimiser = "adam"
    lr_section = "temporal"
    temporal_objective = True

    def sync_batchnorm(self, cfg: Config) -> bool:
        return True

    def find_unused_parameters(self, spec: StageSpec) -> bool:
        # without global distillation (or LwF) the objective never reaches res5 (layer4): no gradient there
        return not spec.teacher and not spec.lwf

    def build(self, spec: StageSpec, weights: dict[str, Tensor] | None, source: str) -> Built:
        student, teacher, optimizer = build_temporal(spec, weights, source)
        return Built(student, student, optimizer, teacher=teacher)

    def losses(self, stage: StageModel, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        return temporal_batch_loss(
            stage.forward_model,
            stage.teacher,
            batch["temporal"],
            stage.spec.temporal,
            penalty=stage.penalty,
            lwf=stage.lwf,
        )

    def fisher_objective(self, stage: StageModel, model: nn.Module):
        return model, lambda batch: temporal_batch_loss(model, stage.teacher, batch["temporal"], stage.spec.temporal)[
            "loss"
        ]
