"""What one training worker holds for a stage: the model, its optimiser, its loss, and its checkpoint.

`StageModel` is built from a `StageSpec` (stt.objectives) and reads nothing else: the spatial stage is
MoCo v2 (SGD), the temporal stage a stride-8/4 student with Adam and, when the spec distils globally,
the frozen earlier-stage encoder as teacher; the joint stage is MoCo with a student sharing its trunk;
the vfs stage is VFS (stt.vfs, SGD), or MoCo on frame pairs with `vfs.negatives`.
An EWC stage adds the penalty toward the weights (and Fisher) of the stage before it; an LwF stage
distils the stage before's MoCo outputs (stt.lwf). No Ray here:
stt.train's worker wraps `model` for DistributedDataParallel and feeds the batches.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from stt import checkpoint
from stt.config import Config
from stt.ewc import ewc_penalty, fisher_diagonal
from stt.lwf import LwF
from stt.models import Encoder, build_encoder, build_teacher, encoder_state_dict, load_encoder_weights
from stt.objectives import StageSpec, SpatiotemporalModel, add_penalty, temporal_step
from stt.spatial import MoCo
from stt.vfs import VFS


# ----------------------------------------------------------------------------------------- builders
def build_spatial(cfg: Config, init: dict[str, Tensor] | None = None) -> tuple[MoCo, torch.optim.Optimizer]:
    """MoCo v2 (its query and momentum encoders initialised from the encoder weights `init` if
    given) and its optimiser (SGD, momentum 0.9, as MoCo v2); lr is set every step."""
    moco = MoCo(cfg.spatial, cfg.model)
    if init is not None:
        load_encoder_weights(moco.encoder, init)
        moco.key_net["encoder"].load_state_dict(moco.encoder.state_dict())
    params = [p for p in moco.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.spatial.lr, momentum=0.9, weight_decay=cfg.spatial.weight_decay)
    return moco, optimizer


def build_vfs(cfg: Config, init: dict[str, Tensor] | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """VFS (stt.vfs; with `vfs.negatives`, MoCo v2 on frame pairs: Eq. 4), its encoder initialised from
    `init` if given, and its optimiser: SGD, momentum 0.9, `vfs.weight_decay` (paper 003 Sec. 4.1)."""
    model = MoCo(cfg.spatial, cfg.model) if cfg.vfs.negatives else VFS(cfg.model)
    if init is not None:
        load_encoder_weights(model.encoder, init)
        if cfg.vfs.negatives:
            model.key_net["encoder"].load_state_dict(model.encoder.state_dict())
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.SGD(params, lr=cfg.vfs.lr, momentum=0.9, weight_decay=cfg.vfs.weight_decay)


def build_temporal(spec: StageSpec, init: dict[str, Tensor] | None) -> tuple[Encoder, Encoder | None, torch.optim.Optimizer]:
    """Student (initialised from the earlier encoder `init` if given), frozen teacher if the spec
    distils globally (that same earlier encoder, or `model.weights` without one), Adam."""
    cfg = spec.config
    student = build_encoder(cfg.model)
    if init is not None:
        load_encoder_weights(student, init)
    teacher = None
    if spec.teacher:
        if init is None and cfg.model.weights == "random":
            raise ValueError(
                f"temporal.beta={spec.temporal.beta} (train.recipe={cfg.train.recipe}) needs a frozen teacher: pass --init "
                "SPATIAL_CHECKPOINT, run --stage all, set model.weights to a local state dict, or set temporal.beta=0"
            )
        teacher = build_teacher(cfg.model, init if init is not None else student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.train.lr)
    return student, teacher, optimizer


def ewc_regulariser(encoder: Encoder, init: dict[str, Any] | None, cfg: Config, init_path: str) -> Callable[[], Tensor]:
    """The EWC penalty toward the earlier stage's weights (`init`, a checkpoint payload that holds its
    Fisher), as a closure over `encoder`'s parameters (stt.ewc.ewc_penalty)."""
    if init is None or "fisher" not in init:
        raise ValueError(
            f"train.recipe={cfg.train.recipe} regularises this stage with EWC, which needs the earlier stage's checkpoint "
            f"with its Fisher information; {init_path or 'no --init'} has none (run --stage all, or the earlier stage "
            "with this recipe)"
        )
    device = next(encoder.parameters()).device
    fisher = {name: value.to(device) for name, value in init["fisher"].items()}
    anchor = {name: init["model"][name].to(device) for name in fisher}
    parameters = dict(encoder.named_parameters())
    return lambda: ewc_penalty(parameters, anchor, fisher, cfg.train.ewc_weight)


# ----------------------------------------------------------------------------------------- one step
def train_one_step(compute_losses: Callable[[], dict[str, Tensor]], optimizer: torch.optim.Optimizer, lr: float,
                   device: torch.device) -> dict[str, Tensor]:
    """Set the lr, run `compute_losses()` (bf16 autocast on GPU), back-propagate "loss", step.

    Returns the detached losses; reading them (`.item()`) is left to the caller, so a GPU step
    never waits on the host.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        losses = compute_losses()
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return {name: value.detach() for name, value in losses.items()}


def spatial_losses(moco: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """MoCo's InfoNCE on the two augmented views of each image (DetCo adds its local terms)."""
    outputs = moco(batch["view_q"], batch["view_k"])
    return {name: value for name, value in outputs.items() if name != "logits"}


# ----------------------------------------------------------------------------------------- the stage
class StageModel:
    """A stage's model, optimiser and loss on one worker.

    `model` is what DistributedDataParallel wraps (the worker sets `forward_model` to the wrapped
    one); `encoder` is the trunk the checkpoint exports and the EWC penalty and the Fisher are taken on.
    """

    def __init__(self, spec: StageSpec, init: dict[str, Any] | None, init_name: str, device: torch.device):
        self.spec, self.device = spec, device
        weights = init["model"] if init else None
        self.teacher = self.moco = None
        if spec.name == "temporal":
            self.model, self.teacher, self.optimizer = build_temporal(spec, weights)
            self.encoder = self.model
        elif spec.name == "vfs":  # its heads (and MoCo's queue) are checkpointed and restored as "moco"
            self.moco, self.optimizer = build_vfs(spec.config, weights)
            self.model, self.encoder = self.moco, self.moco.encoder
        else:  # spatial, and the joint stage: MoCo, the latter with a student sharing its trunk
            self.moco, self.optimizer = build_spatial(spec.config, weights)
            self.model = self.moco if spec.name == "spatial" else SpatiotemporalModel(self.moco, spec)
            self.encoder = self.moco.encoder
        self.model.to(device)  # in place: the optimiser keeps the same parameter objects
        if self.teacher is not None:
            self.teacher.to(device)
        if device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.penalty = ewc_regulariser(self.encoder, init, spec.config, init_name) if spec.ewc else None
        self.lwf = LwF(spec.config, init, init_name).to(device) if spec.lwf else None
        self.forward_model = self.model

    def restore(self, payload: dict[str, Any]) -> int:
        """Continue from a checkpoint of this stage; returns its step."""
        if self.moco is not None:
            self.moco.load_state_dict(payload["moco"])
        else:
            load_encoder_weights(self.encoder, payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])  # after the move: its state lands on the parameters' device
        return int(payload["step"])

    def losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The stage's loss terms on one batch of each of its streams ({stream name: batch})."""
        if self.spec.name in ("spatial", "vfs"):  # two views: of one image, or two frames of one video
            return add_penalty(spatial_losses(self.forward_model, batch[self.spec.name]), self.penalty)
        if self.spec.name == "temporal":
            return temporal_step(self.forward_model, self.teacher, batch["temporal"], self.spec.temporal, penalty=self.penalty,
                                 lwf=self.lwf)
        return self.forward_model(batch["spatial"], batch["temporal"])

    def step(self, batch: dict[str, dict[str, Tensor]], lr: float) -> dict[str, Tensor]:
        return train_one_step(lambda: self.losses(batch), self.optimizer, lr, self.device)

    def fisher(self, batches: Iterator[dict], num_batches: int) -> dict[str, Tensor]:
        """Diagonal Fisher of the stage's objective over the encoder's parameters, averaged over
        `num_batches` batches of its stream (and over workers, when distributed). It runs on a copy,
        so MoCo's queue and momentum encoder and BatchNorm statistics stay as trained."""
        model = copy.deepcopy(self.model)
        if self.spec.name == "spatial":
            encoder, loss_of = model.encoder, lambda batch: model(batch["spatial"]["view_q"], batch["spatial"]["view_k"])["loss"]
        elif self.spec.name == "temporal":
            encoder, loss_of = model, lambda batch: temporal_step(model, self.teacher, batch["temporal"], self.spec.temporal)["loss"]
        else:
            raise ValueError(f"no EWC recipe is anchored to the {self.spec.name} stage")
        fisher = fisher_diagonal(dict(encoder.named_parameters()), loss_of, (next(batches) for _ in range(num_batches)))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for value in fisher.values():
                torch.distributed.all_reduce(value)
                value /= torch.distributed.get_world_size()
        return fisher

    def payload(self, step: int, fisher: dict[str, Tensor] | None = None) -> dict[str, Any]:
        """The stage's checkpoint at `step` (stt.checkpoint's format)."""
        return checkpoint.payload(encoder_state_dict(self.encoder), self.spec.config, self.spec.name, step, self.optimizer,
                                  self.moco, fisher)
