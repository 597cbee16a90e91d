"""What one training worker holds for a stage: the model, its optimiser, its loss, and its checkpoint.

The losses are here too: `temporal_loss` is the temporal stage's loss on one batch (Lab conversion,
the colour bottleneck, one student pass over both frames, the frozen teacher on RGB, then
stt.losses.temporal_losses); `spatiotemporal_loss` is recipe (ii), L_nce + gamma L_t on one shared trunk.

`StageModel` is built from a `StageSpec` (stt.recipes) and reads nothing else: the spatial stage is
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
from stt.color import drop_color_channel, imagenet_normalize, normalize_lab, rgb_to_lab, take_channel
from stt.config import Config, ModelConfig, TemporalConfig
from stt.ewc import ewc_penalty, fisher_diagonal
from stt.losses import temporal_losses
from stt.lwf import LwF
from stt.models import Encoder, build_encoder, build_teacher, encoder_state_dict, load_encoder_weights
from stt.recipes import StageSpec, stage_levels
from stt.spatial import MoCo
from stt.vfs import VFS


# ----------------------------------------------------------------------------------------- builders
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
        if init is None and cfg.model.weights == "random":
            raise ValueError(
                f"temporal.beta={spec.temporal.beta} (train.recipe={cfg.train.recipe}) needs a frozen teacher: "
                "pass --init "
                "SPATIAL_CHECKPOINT, run --stage all, set model.weights to a local state dict, or set temporal.beta=0"
            )
        teacher = build_teacher(cfg.model, init if init is not None else student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.temporal.lr)
    return student, teacher, optimizer


def ewc_regulariser(encoder: Encoder, init: dict[str, Any] | None, cfg: Config, init_path: str) -> Callable[[], Tensor]:
    """The EWC penalty toward the earlier stage's weights (`init`, a checkpoint payload that holds its
    Fisher), as a closure over `encoder`'s parameters (stt.ewc.ewc_penalty)."""
    if init is None or "fisher" not in init:
        raise ValueError(
            f"train.recipe={cfg.train.recipe} regularises this stage with EWC, which needs the earlier stage's "
            "checkpoint "
            f"with its Fisher information; {init_path or 'no --init'} has none (run --stage all, or the earlier stage "
            "with this recipe)"
        )
    device = next(encoder.parameters()).device
    fisher = {name: value.to(device) for name, value in init["fisher"].items()}
    anchor = {name: init["model"][name].to(device) for name in fisher}
    parameters = dict(encoder.named_parameters())
    return lambda: ewc_penalty(parameters, anchor, fisher, cfg.train.ewc_weight)


# ----------------------------------------------------------------------------------------- the losses
def spatial_losses(moco: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """MoCo's InfoNCE on the two augmented views of each image (DetCo adds its local terms)."""
    outputs = moco(batch["view_q"], batch["view_k"])
    return {name: value for name, value in outputs.items() if name != "logits"}


def add_penalty(losses: dict[str, Tensor], penalty: Callable[[], Tensor] | None) -> dict[str, Tensor]:
    """losses with penalty() added to "loss" and reported as "penalty" (unchanged if penalty is None)."""
    if penalty is None:
        return losses
    extra = penalty()
    return {**losses, "loss": losses["loss"] + extra, "penalty": extra.detach()}


def _rgb01(frames: Tensor, name: str) -> Tensor:
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"batch[{name!r}]: expected B x 3 x H x W RGB frames, got shape {tuple(frames.shape)}")
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def temporal_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, Tensor],
    temporal: TemporalConfig,
    generator: torch.Generator | None = None,
    penalty: Callable[[], Tensor] | None = None,
    lwf: nn.Module | None = None,
) -> dict[str, Tensor]:
    """The temporal loss of one batch of (target, reference) pairs.

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
    Returns stt.losses.temporal_losses's dict ("loss" to backpropagate, detached terms).
    """
    rgb_t, rgb_r = _rgb01(batch["target"], "target"), _rgb01(batch["reference"], "reference")
    lab_t, lab_r = normalize_lab(rgb_to_lab(rgb_t)), normalize_lab(rgb_to_lab(rgb_r))
    input_t, input_r, dropped = drop_color_channel(lab_t, lab_r, generator, temporal.channel_dropout_scale)

    # One pass over both frames, as the authors do: BatchNorm normalises them together.
    pyramid = student(torch.cat([input_t, input_r]), layers=stage_levels(temporal, lwf is not None))
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
    `temporal_loss` (no teacher: beta must be 0). Returns "loss", "nce" and the temporal terms.
    """
    nce = moco(spatial_batch["view_q"], spatial_batch["view_k"])["loss"]
    terms = temporal_loss(student, None, temporal_batch, temporal, generator)
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


# ----------------------------------------------------------------------------------------- one step
class NonFiniteStep(ValueError):
    """A loss term or the gradient of a training step is NaN or infinite; the step was not applied."""


def first_non_finite(losses: dict[str, Tensor], parameters: list[Tensor]) -> str | None:
    """What of a step is not finite: the first loss term (the total "loss" after the terms it sums), else the
    gradient; None when everything is finite.

    One host sync per step (reading the flags). Under DistributedDataParallel the flags are all-reduced, so every
    worker stops at the same step: a term of one worker's batch alone may be non-finite, and a worker that went
    on alone would wait for the others for ever.
    """
    names = [name for name in losses if name != "loss"] + ["loss"]
    checks = [torch.isfinite(losses[name].detach()).all() for name in names]
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        checks.append(torch.isfinite(torch.nn.utils.get_total_norm(grads)))
    bad = torch.stack(checks).logical_not().float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    for name, flag in zip([*(f"the loss term {name!r}" for name in names), "the gradient"], bad.tolist()):
        if flag:
            return name
    return None


def train_one_step(
    compute_losses: Callable[[], dict[str, Tensor]], optimizer: torch.optim.Optimizer, lr: float, device: torch.device
) -> dict[str, Tensor]:
    """Set the lr, run `compute_losses()` (bf16 autocast on GPU), back-propagate "loss", step.

    A loss term or a gradient that is not finite raises NonFiniteStep naming it, before the optimiser
    steps: the weights stay as the last finite step left them, and no checkpoint is written of a model
    that went NaN (the run stops there; resuming from its last checkpoint would end the same way).
    Returns the detached losses; reading them (`.item()`) is left to the caller.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        losses = compute_losses()
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if (what := first_non_finite(losses, parameters)) is not None:
        raise NonFiniteStep(f"{what} is not finite (NaN or infinite)")
    optimizer.step()
    return {name: value.detach() for name, value in losses.items()}


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
            self.model, self.teacher, self.optimizer = build_temporal(spec, weights, init_name)
            self.encoder = self.model
        elif spec.name == "vfs":  # its heads (and MoCo's queue) are checkpointed and restored as "moco"
            self.moco, self.optimizer = build_vfs(spec.config, weights, init_name)
            self.model, self.encoder = self.moco, self.moco.encoder
        else:  # spatial, and the joint stage: MoCo, the latter with a student sharing its trunk
            self.moco, self.optimizer = build_spatial(spec.config, weights, init_name)
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
        self.optimizer.load_state_dict(
            payload["optimizer"]
        )  # after the move: its state lands on the parameters' device
        return int(payload["step"])

    def losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The stage's loss terms on one batch of each of its streams ({stream name: batch})."""
        if self.spec.name in ("spatial", "vfs"):  # two views: of one image, or two frames of one video
            return add_penalty(spatial_losses(self.forward_model, batch[self.spec.name]), self.penalty)
        if self.spec.name == "temporal":
            return temporal_loss(
                self.forward_model,
                self.teacher,
                batch["temporal"],
                self.spec.temporal,
                penalty=self.penalty,
                lwf=self.lwf,
            )
        return self.forward_model(batch["spatial"], batch["temporal"])

    def step(self, batch: dict[str, dict[str, Tensor]], lr: float) -> dict[str, Tensor]:
        return train_one_step(lambda: self.losses(batch), self.optimizer, lr, self.device)

    def fisher(self, batches: Iterator[dict], num_batches: int) -> dict[str, Tensor]:
        """Diagonal Fisher of the stage's objective over the encoder's parameters, averaged over
        `num_batches` batches of its stream (and over workers, when distributed). It runs on a copy,
        so MoCo's queue and momentum encoder and BatchNorm statistics stay as trained."""
        model = copy.deepcopy(self.model)
        if self.spec.name == "spatial":
            encoder, loss_of = (
                model.encoder,
                lambda batch: model(batch["spatial"]["view_q"], batch["spatial"]["view_k"])["loss"],
            )
        elif self.spec.name == "temporal":
            encoder, loss_of = (
                model,
                lambda batch: temporal_loss(model, self.teacher, batch["temporal"], self.spec.temporal)["loss"],
            )
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
        return checkpoint.payload(
            encoder_state_dict(self.encoder), self.spec.config, self.spec.name, step, self.optimizer, self.moco, fisher
        )
