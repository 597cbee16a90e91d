"""The joint stage, recipe (ii): L = L_nce + gamma * L_t on one shared trunk (MoCo's SGD and `spatial.lr`),
reading a batch of images and a batch of frame pairs each step; evaluated on Lab input."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from stt.config import ModelConfig, TemporalConfig
from stt.models import Encoder
from stt.stages.base import Built, Stage, StageModel
from stt.stages.spatial import SpatialStage, build_spatial
from stt.stages.temporal import TemporalStage, temporal_batch_loss

if TYPE_CHECKING:
    from stt.recipes import StageSpec


def shared_trunk_student(encoder: Encoder, model: ModelConfig) -> Encoder:
    """A stride-8 student whose every parameter *is* `encoder`'s (a standard-stride trunk, e.g. MoCo's).

    The stride-8 layout differs from the standard one only in module-free parts (no stem max-pool,
    an average pool before layer4), so the two can share conv and BatchNorm modules; the stride-4
    layout changes layer3's conv strides and cannot.
    """
    if model.stride != 8:
        raise ValueError(
            f"model.stride: the spatiotemporal recipe shares one trunk, which needs stride 8, got {model.stride}"
        )
    student = Encoder(encoder.arch, 8)
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
        setattr(student, name, getattr(encoder, name))
    return student


def spatiotemporal_loss(
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
    `temporal_batch_loss` (no teacher: beta must be 0). Returns "loss", "nce" and the temporal terms.
    """
    nce = moco(spatial_batch["view_q"], spatial_batch["view_k"])["loss"]
    terms = temporal_batch_loss(student, None, temporal_batch, temporal, generator)
    return {**terms, "loss": nce + gamma * terms["loss"], "nce": nce.detach()}


class SpatiotemporalModel(nn.Module):
    """Recipe (ii) as one module, so DistributedDataParallel sees one forward per step:
    forward(spatial_batch, temporal_batch) -> `spatiotemporal_loss`'s losses."""

    def __init__(self, moco: nn.Module, spec: StageSpec):
        super().__init__()
        self.moco = moco
        self.student = shared_trunk_student(moco.encoder, spec.config.model)  # the same parameters, registered twice
        self.temporal, self.gamma = spec.temporal, spec.config.train.gamma

    def forward(self, spatial_batch: dict[str, Tensor], temporal_batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return spatiotemporal_loss(self.moco, self.student, spatial_batch, temporal_batch, self.temporal, self.gamma)


class SpatiotemporalStage(Stage):
    name = "spatiotemporal"
    input_space = "lab"  # the trunk sees both; evaluated on the input of the objective that learns correspondence
    streams = {**SpatialStage.streams, **TemporalStage.streams}
    optimiser = "sgd"
    lr_section = "spatial"
    temporal_objective = True

    def build(self, spec: StageSpec, weights: dict[str, Tensor] | None, source: str) -> Built:
        moco, optimizer = build_spatial(spec.config, weights, source)
        return Built(SpatiotemporalModel(moco, spec), moco.encoder, optimizer, moco)

    def losses(self, stage: StageModel, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        return stage.forward_model(batch["spatial"], batch["temporal"])
