"""What one training worker holds for a stage, and what every kind of stage says about itself.

`Stage` is a kind of stage (spatial, temporal, spatiotemporal, vfs: one file each in this package, registered in
stt.stages.STAGES): its input space, its data streams and the batch columns it reads of each, its optimiser and
the config section of its rate, whether SyncBatchNorm and DistributedDataParallel's unused-parameter search
apply, how it builds its model and optimiser, its losses on one batch, and the objective its Fisher is taken on.
stt.recipes.stage_spec resolves a recipe's stage ONCE into a StageSpec that carries the Stage object; everything
later asks the object, never the stage's name.

`StageModel` is built from a `StageSpec` and reads nothing else: the model, its optimiser, its losses (the
stage's), the EWC penalty toward the stage before and the LwF term when the spec says so, the Fisher it leaves,
its checkpoint. No Ray here: stt.trainer's worker wraps `model` for DistributedDataParallel and feeds the batches.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from stt import checkpoint
from stt.config import Config, InputSpace
from stt.ewc import ewc_penalty, fisher_diagonal
from stt.lwf import LwF
from stt.models import Encoder, encoder_state_dict, load_encoder_weights

if TYPE_CHECKING:
    from stt.recipes import StageSpec


class Built(NamedTuple):
    """What a stage builds on a worker: `model` (what DistributedDataParallel wraps), `encoder` (the trunk the
    checkpoint exports and EWC and the Fisher are taken on), its optimiser, MoCo or VFS (checkpointed and restored
    as "moco"; None for the temporal stage) and the frozen teacher (the temporal stage's, when it distils)."""

    model: nn.Module
    encoder: Encoder
    optimizer: torch.optim.Optimizer
    moco: nn.Module | None = None
    teacher: Encoder | None = None


@dataclasses.dataclass(frozen=True)
class Stage:
    """A kind of training stage. Subclasses set the class attributes and implement `build` and `losses`."""

    name: ClassVar[str]
    input_space: ClassVar[InputSpace]  # what its encoder is fed; the evaluator feeds the same
    # {stream (stt.data.pipeline.STREAMS): the batch columns a step reads of it}; a step reads one batch of each
    streams: ClassVar[dict[str, tuple[str, ...]]]
    optimiser: ClassVar[str]  # "sgd" | "adam"
    lr_section: ClassVar[str]  # the config section of its rate: <section>.lr for <section>.lr_batch
    temporal_objective: ClassVar[bool] = False  # it runs the temporal objective (StageSpec.temporal)

    def sync_batchnorm(self, cfg: Config) -> bool:
        """Whether its BatchNorm is synchronised across GPU workers (MoCo keeps per-worker BatchNorm on purpose:
        shuffle-BN relies on it, see stt.spatial)."""
        return False

    def find_unused_parameters(self, spec: StageSpec) -> bool:
        """Whether DistributedDataParallel must look for parameters that get no gradient."""
        return False

    def build(self, spec: StageSpec, weights: dict[str, Tensor] | None, source: str) -> Built:
        """Its model and optimiser, initialised from the earlier encoder `weights` (read from `source`) if given."""
        raise NotImplementedError

    def losses(self, stage: StageModel, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """Its loss terms on one batch of each of its streams ({stream name: batch}): "loss" and detached terms."""
        raise NotImplementedError

    def fisher_objective(self, stage: StageModel, model: nn.Module) -> tuple[nn.Module, Callable[[dict], Tensor]]:
        """(encoder, loss of a batch) of `model`, a copy of `stage.model`, for the diagonal Fisher an EWC stage
        after it is anchored to."""
        raise ValueError(f"no EWC recipe is anchored to the {self.name} stage")


# ----------------------------------------------------------------------------------------- shared pieces
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


def add_penalty(losses: dict[str, Tensor], penalty: Callable[[], Tensor] | None) -> dict[str, Tensor]:
    """losses with penalty() added to "loss" and reported as "penalty" (unchanged if penalty is None)."""
    if penalty is None:
        return losses
    extra = penalty()
    return {**losses, "loss": losses["loss"] + extra, "penalty": extra.detach()}


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


# ----------------------------------------------------------------------------------------- the stage on a worker
class StageModel:
    """A stage's model, optimiser and loss on one worker.

    `model` is what DistributedDataParallel wraps (the worker sets `forward_model` to the wrapped
    one); `encoder` is the trunk the checkpoint exports and the EWC penalty and the Fisher are taken on.
    """

    def __init__(self, spec: StageSpec, init: dict[str, Any] | None, init_name: str, device: torch.device):
        self.spec, self.device = spec, device
        weights = init["model"] if init else None
        self.model, self.encoder, self.optimizer, self.moco, self.teacher = spec.stage.build(spec, weights, init_name)
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
        # after the model's move to its device: the optimiser's state lands on the parameters' device
        self.optimizer.load_state_dict(payload["optimizer"])
        return int(payload["step"])

    def losses(self, batch: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
        """The stage's loss terms on one batch of each of its streams ({stream name: batch})."""
        return self.spec.stage.losses(self, batch)

    def step(self, batch: dict[str, dict[str, Tensor]], lr: float) -> dict[str, Tensor]:
        return train_one_step(lambda: self.losses(batch), self.optimizer, lr, self.device)

    def fisher(self, batches: Iterator[dict], num_batches: int) -> dict[str, Tensor]:
        """Diagonal Fisher of the stage's objective over the encoder's parameters, averaged over
        `num_batches` batches of its stream (and over workers, when distributed). It runs on a copy,
        so MoCo's queue and momentum encoder and BatchNorm statistics stay as trained."""
        model = copy.deepcopy(self.model)
        encoder, loss_of = self.spec.stage.fisher_objective(self, model)
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
