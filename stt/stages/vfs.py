"""The vfs stage: VFS (paper 003, stt.vfs) on two frames of one video, RGB input, SGD (`vfs.lr`); with
`vfs.negatives`, MoCo v2 on the frame pairs (Eq. 4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from stt.config import Config
from stt.models import load_encoder_weights
from stt.spatial import MoCo
from stt.stages.base import Built, Stage, StageModel, add_penalty
from stt.stages.spatial import spatial_losses
from stt.vfs import VFS

if TYPE_CHECKING:
    from stt.recipes import StageSpec


def build_vfs(
    cfg: Config, init: dict[str, Tensor] | None = None, source: str = ""
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """VFS (stt.vfs; with `vfs.negatives`, MoCo v2 on frame pairs: Eq. 4), its encoder initialised from `init`
    (read from `source`) if given, and its optimiser: SGD, momentum 0.9, `vfs.weight_decay` (paper 003 Sec. 4.1)."""
    model = MoCo(cfg.spatial, cfg.model) if cfg.vfs.negatives else VFS(cfg.model)
    if init is not None:
        load_encoder_weights(model.encoder, init, source)
        if cfg.vfs.negatives:
            model.key_net["encoder"].load_state_dict(model.encoder.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.SGD(params, lr=cfg.vfs.lr, momentum=0.9, weight_decay=cfg.vfs.weight_decay)


class VFSStage(Stage):
    name = "vfs"
    input_space = "rgb"  # ImageNet-normalised, as the authors
    streams = {"vfs": ("view_q", "view_k")}  # two views: two frames of one video
    optimiser = "sgd"
    lr_section = "vfs"

    def sync_batchnorm(self, cfg: Config) -> bool:
        return not cfg.vfs.negatives  # MoCo (negatives) keeps per-worker BatchNorm for its shuffle-BN

    def build(self, spec: StageSpec, weights: dict[str, Tensor] | None, source: str) -> Built:
        model, optimizer = build_vfs(spec.config, weights, source)  # its heads (and MoCo's queue) saved as "moco"
        return Built(model, model.encoder, optimizer, model)

    def losses(self, stage: StageModel, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        return add_penalty(spatial_losses(stage.forward_model, batch["vfs"]), stage.penalty)
