"""Stage 1, spatial feature learning: MoCo v2 on still images, with DetCo-style local terms.

Paper 001, Sec. 3.1: a query q and keys {k+, k-_1..k-_K}, each an encoder plus MLP head output,
l2-normalised; InfoNCE (Eq. 1) with temperature tau_c. As in MoCo, keys come from a momentum
encoder and negatives from a queue of past keys.

DetCo option (`method: detco`), simplified from DetCo (Xie et al., ICCV 2021):
- a *local* embedding of a view: the view cut into a 3x3 grid of patches, each patch encoded by
  the same encoder and average-pooled, the nine vectors concatenated (row-major) and passed
  through their own MLP head;
- loss = InfoNCE(global q, global k) + InfoNCE(local q, local k) + InfoNCE(local q, global k),
  DetCo's g<->g, l<->l and l->g terms, each with its own queue of negatives of the key's kind.
- Simplified: one pyramid level (res5) instead of DetCo's four weighted levels, and the patches
  are cut from the augmented view instead of being re-cropped and augmented one by one.

Shuffle BN (MoCo Sec. 3.3) keeps BatchNorm statistics from leaking which key belongs to which
query. Across GPUs it shuffles keys between workers; within one worker (and under DDP, within
each worker) this module uses the single-GPU substitute of MoCo's own demo: the key batch is
shuffled and encoded as `bn_splits` separate BatchNorm groups, the query batch as the same number
of contiguous groups, so a query and its key are normalised with statistics of different images.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from stt.config import ModelConfig, SpatialConfig, SpatialMethod
from stt.models import TEACHER_RES4_STRIDE, Encoder, load_encoder_weights, load_state_dict_file

GRID = 3  # DetCo's 3x3 local patches
METHODS = get_args(SpatialMethod)


def info_nce_logits(q: Tensor, k_pos: Tensor, queue: Tensor, tau: float) -> Tensor:
    """Eq. (1)'s logits, positive first: q, k_pos: B x D; queue: K x D -> B x (1 + K)."""
    positive = (q * k_pos).sum(dim=1, keepdim=True)  # B x 1
    negative = q @ queue.T  # B x K
    return torch.cat([positive, negative], dim=1) / tau


def info_nce(q: Tensor, k_pos: Tensor, queue: Tensor, tau: float) -> Tensor:
    """Eq. (1) of paper 001 averaged over the batch: q, k_pos: B x D; queue: K x D -> scalar."""
    return _positive_first_cross_entropy(info_nce_logits(q, k_pos, queue, tau))


def _positive_first_cross_entropy(logits: Tensor) -> Tensor:
    """-log softmax(logits)[:, 0], averaged: the positive is column 0 of B x (1 + K) logits.

    Half-precision logits are promoted to float32: with tau = 0.2 and K = 4096 negatives the
    log-sum-exp is too coarse in bfloat16.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


@torch.no_grad()
def momentum_update(key_params: Iterable[Tensor], query_params: Iterable[Tensor], momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q, in place on the key parameters."""
    for key, query in zip(key_params, query_params, strict=True):
        key.lerp_(query, 1.0 - momentum)


@torch.no_grad()
def enqueue(queue: Tensor, pointer: Tensor, keys: Tensor) -> None:
    """Overwrite the oldest rows of the ring buffer queue (K x D) with keys (B x D), in place.

    `pointer` (a 0-dim long tensor) marks the oldest row and advances by B modulo K; writes wrap
    around the end, so K need not be a multiple of B. Tensor arithmetic only: no host sync.
    """
    size, batch = queue.shape[0], keys.shape[0]
    if batch > size:
        raise ValueError(f"cannot enqueue {batch} keys into a queue of {size}: spatial.queue_size must be >= the batch")
    rows = (pointer + torch.arange(batch, device=queue.device)) % size
    queue[rows] = keys.to(queue.dtype)
    pointer.copy_((pointer + batch) % size)


def gather_from_workers(keys: Tensor) -> Tensor:
    """All workers' keys (world * B x D) under torch.distributed, so every queue stays identical."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return keys
    gathered = [torch.empty_like(keys) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, keys.contiguous())
    return torch.cat(gathered)


def grid_patches(images: Tensor, grid: int = GRID) -> Tensor:
    """B x C x H x W -> (B * grid^2) x C x (H // grid) x (W // grid), row-major per image.

    Rows and columns beyond grid * (H // grid) are dropped.
    """
    batch, channels, height, width = images.shape
    ph, pw = height // grid, width // grid
    if ph == 0 or pw == 0:
        raise ValueError(f"images of {height}x{width} are too small for a {grid}x{grid} patch grid")
    patches = images[:, :, : grid * ph, : grid * pw].reshape(batch, channels, grid, ph, grid, pw)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch * grid * grid, channels, ph, pw)


def projection_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v2's 2-layer MLP head: Linear(in, in), ReLU, Linear(in, out)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))


class MoCo(nn.Module):
    """MoCo v2 (optionally with DetCo's local terms) around a standard-stride `Encoder`.

    forward(view_q, view_k: B x 3 x S x S) -> {"loss", "logits" (B x (1 + K), global-global),
    "accuracy" (positive ranked first)}; DetCo adds "loss_global", "loss_local", "loss_cross".
    In training mode, forward also moves the momentum encoder (before encoding keys, as MoCo)
    and enqueues the new keys; in eval mode it has no side effects.
    """

    def __init__(self, cfg: SpatialConfig, model: ModelConfig):
        super().__init__()
        if cfg.method not in METHODS:
            raise ValueError(f"spatial.method: expected one of {METHODS}, got {cfg.method!r}")
        if not 0.0 <= cfg.momentum <= 1.0:
            raise ValueError(f"spatial.momentum: expected a value in [0, 1], got {cfg.momentum!r}")
        for name in ("queue_size", "feature_dim", "bn_splits", "temperature"):
            if getattr(cfg, name) <= 0:
                raise ValueError(f"spatial.{name}: expected a positive value, got {getattr(cfg, name)!r}")
        self.method = cfg.method
        self.momentum = cfg.momentum
        self.temperature = cfg.temperature
        self.bn_splits = cfg.bn_splits

        # Stage 1 trains the standard ResNet trunk, as on ImageNet; its weights load into every
        # stride preset of the temporal stage and into the teacher.
        encoder = Encoder(model.arch, TEACHER_RES4_STRIDE)
        if model.weights != "random":
            load_encoder_weights(encoder, load_state_dict_file(model.weights), f"model.weights {model.weights}")
        width = encoder.out_channels["res5"]
        nets = {"encoder": encoder, "global_head": projection_head(width, cfg.feature_dim)}
        if cfg.method == "detco":
            nets["local_head"] = projection_head(GRID * GRID * width, cfg.feature_dim)
        self.query_net = nn.ModuleDict(nets)
        self.key_net = copy.deepcopy(self.query_net).requires_grad_(False)

        kinds = ("global", "local") if cfg.method == "detco" else ("global",)
        for kind in kinds:
            self.register_buffer(f"{kind}_queue", F.normalize(torch.randn(cfg.queue_size, cfg.feature_dim), dim=1))
            self.register_buffer(f"{kind}_pointer", torch.zeros((), dtype=torch.long))

    @property
    def encoder(self) -> Encoder:
        """The query encoder: the teacher and the initialisation of the temporal stage."""
        return self.query_net["encoder"]

    def forward(self, view_q: Tensor, view_k: Tensor) -> dict[str, Tensor]:
        if view_q.shape != view_k.shape or view_q.ndim != 4:
            raise ValueError(
                "views: expected two B x 3 x H x W batches of one shape, "
                f"got {tuple(view_q.shape)} and {tuple(view_k.shape)}"
            )
        if view_q.shape[0] < self.bn_splits:
            raise ValueError(
                f"a batch of {view_q.shape[0]} images cannot form spatial.bn_splits={self.bn_splits} BatchNorm groups"
            )
        q = self._embed(self.query_net, view_q, order=None)
        with torch.no_grad():
            if self.training:
                momentum_update(self.key_net.parameters(), self.query_net.parameters(), self.momentum)
            shuffle = torch.randperm(view_k.shape[0], device=view_k.device)
            k = self._embed(self.key_net, view_k, order=shuffle)

        # Clones: enqueue below writes into the queues that autograd saved for the backward pass.
        global_queue = self.global_queue.clone()
        logits = info_nce_logits(q["global"], k["global"], global_queue, self.temperature)
        outputs = {"logits": logits, "accuracy": (logits.argmax(dim=1) == 0).float().mean()}
        loss = _positive_first_cross_entropy(logits)
        if self.method == "detco":
            local_queue = self.local_queue.clone()
            outputs["loss_global"] = loss
            outputs["loss_local"] = info_nce(q["local"], k["local"], local_queue, self.temperature)
            outputs["loss_cross"] = info_nce(q["local"], k["global"], global_queue, self.temperature)
            loss = loss + outputs["loss_local"] + outputs["loss_cross"]
        outputs["loss"] = loss

        if self.training:
            for kind, keys in k.items():
                enqueue(getattr(self, f"{kind}_queue"), getattr(self, f"{kind}_pointer"), gather_from_workers(keys))
        return outputs

    def _embed(self, net: nn.ModuleDict, images: Tensor, order: Tensor | None) -> dict[str, Tensor]:
        """l2-normalised embeddings, B x D per kind, BatchNorm statistics per group of images.

        With `order`, groups are drawn from the images in that order and results are returned in
        the original order (the shuffle-BN substitute); without it, groups are contiguous.
        """
        if order is not None:
            images = images[order]
        groups = [self._embed_group(net, group) for group in images.tensor_split(self.bn_splits)]
        embeddings = {kind: torch.cat([g[kind] for g in groups]) for kind in groups[0]}
        if order is not None:
            restore = torch.argsort(order)
            embeddings = {kind: e[restore] for kind, e in embeddings.items()}
        return embeddings

    def _embed_group(self, net: nn.ModuleDict, images: Tensor) -> dict[str, Tensor]:
        res5 = net["encoder"](images, layers=("res5",))["res5"]  # B x C x h x w
        embeddings = {"global": F.normalize(net["global_head"](res5.mean(dim=(2, 3))), dim=1)}
        if "local_head" in net:
            patches = net["encoder"](grid_patches(images), layers=("res5",))["res5"]  # B*9 x C x h' x w'
            pooled = patches.mean(dim=(2, 3)).reshape(images.shape[0], -1)  # B x 9C
            embeddings["local"] = F.normalize(net["local_head"](pooled), dim=1)
        return embeddings
