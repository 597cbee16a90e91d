"""The spatial stage: MoCo v2 (stt.spatial) on two augmented views of each image, RGB input, SGD."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from stt.config import Config
from stt.models import load_encoder_weights
from stt.spatial import MoCo
from stt.stages.base import Built, Stage, StageModel, add_penalty

if TYPE_CHECKING:
    from stt.recipes import StageSpec


def build_spatial(
    cfg: Config, init: dict[str, Tensor] | None = None, source: str = ""
) -> tuple[MoCo, torch.optim.Optimizer]:
    """MoCo v2 (its query and momentum encoders initialised from the encoder weights `init`, read from the file
    `source`, if given) and its optimiser (SGD, momentum 0.9, as MoCo v2); lr is set every step."""
    moco = MoCo(cfg.spatial, cfg.model)
    if init is not None:
        load_encoder_weights(moco.encoder, init, source)
        moco.key_net["encoder"].load_state_dict(moco.encoder.state_dict())
    params = [p for p in moco.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.spatial.lr, momentum=0.9, weight_decay=cfg.spatial.weight_decay)
    return moco, optimizer


def spatial_losses(moco: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """MoCo's InfoNCE on the two augmented views of each image (DetCo adds its local terms)."""
    outputs = moco(batch["view_q"], batch["view_k"])
    return {name: value for name, value in outputs.items() if name != "logits"}


class SpatialStage(Stage):
    name = "spatial"
    input_space = "rgb"
    streams = {"spatial": ("view_q", "view_k")}
    optimiser = "sgd"
    lr_section = "spatial"

    def build(self, spec: StageSpec, weights: dict[str, Tensor] | None, source: str) -> Built:
        moco, optimizer = build_spatial(spec.config, weights, source)
        return Built(moco, moco.encoder, optimizer, moco)

    def losses(self, stage: StageModel, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        return add_penalty(spatial_losses(stage.forward_model, batch["spatial"]), stage.penalty)

    def fisher_objective(self, stage: StageModel, model: nn.Module):
        return model.encoder, lambda batch: model(batch["spatial"]["view_q"], batch["spatial"]["view_k"])["loss"]
