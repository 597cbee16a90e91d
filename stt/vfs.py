"""VFS: Video Frame-level Similarity learning (paper 003, Xu & Wang, ICCV 2021), `train.recipe=vfs`.

Two frames of one video, each with its own augmentation, are the two views of a siamese network;
frame-level embeddings (res5, average-pooled, then MLPs) are pulled together, and correspondence
emerges in res4, which the evaluator propagates labels with (the same protocol as every stt model).

What follows the paper, and where the paper is silent, the authors' code (xvjiarui/VFS,
configs/r18_nc_sgd_cos_100e_r2_1xNx8_k400.py, mmaction/models/heads/sim_siam_head.py):
- Frames (Sec. 3.2, "Temporal Sampling"; Table 3): *distant sampling* with n = 2, the video of L
  frames cut into two segments and one frame drawn uniformly from each,
  I_i = L/2 (i - 1) + unif(0, L/2) (Table 1), the best row of Table 3 ("D", 65.0 J&F); or
  *continuous sampling* with interval delta (`vfs.sampling=continuous`, `vfs.interval`).
- Augmentation (Sec. 3.2 "Data Augmentation", Table 2; stt.data.augment.vfs_transform): each frame
  its own random resized crop (area 0.2-1, the authors' `area_range`) resized to 224 and its own
  horizontal flip; no colour augmentation by default (Table 2: it costs DAVIS 3 points), optional.
- Input: RGB, ImageNet mean/std (the authors' `img_norm_cfg`), so `model.input_space=rgb`.
- Without negatives, the paper's main objective (Sec. 3.1 after SimSiam [14]; Sec. 4.1
  "Architecture without negative pairs"): a standard-stride ResNet-18/50 (stride 32, as Table 7),
  a 3-layer projector (Linear + BN each, ReLU between, width of res5) shared by both branches, a
  2-layer predictor (bottleneck of a quarter of that width) on the predictor branch only, stop-
  gradient on the target branch, and Eq. 5, ||p_i - z_j||^2 = 2 - 2 p_i . z_j of l2-normalised
  vectors, symmetrised over the two frames with weight 1/2 each (the authors' `SimSiamHead.loss`).
  The residual branches' last BatchNorm starts at zero (`zero_init_residual=True` in their config).
- With negatives (`vfs.negatives=true`, Eq. 4; Sec. 4.1 "Architecture with negative pairs"): MoCo
  v2 (2-layer projector, momentum 0.999, tau 0.2, a queue of past keys), i.e. stt.spatial.MoCo fed
  the frame pairs instead of two views of one image; the queue size is `spatial.queue_size`
  (the paper's 65,536 is larger than most small datasets).
- Optimiser: SGD, momentum 0.9, weight decay 1e-4, lr 0.05 for a batch of 256 (Sec. 4.1), cosine.
Not done: multiple pairs per video (Table 4, n = 4, 8) and SyncBN across workers for MoCo.
"""

from __future__ import annotations

from typing import get_args

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from stt.config import ModelConfig, VFSSampling
from stt.models import TEACHER_RES4_STRIDE, Encoder, load_encoder_weights, load_state_dict_file

SAMPLINGS = get_args(VFSSampling)


def sample_frame_pair(
    length: int, rng: np.random.Generator, sampling: str = "distant", interval: int = 32
) -> tuple[int, int]:
    """Positions (i, j) of two frames of a video of `length` frames (length >= 2).

    distant: Table 1 with n = 2, I_k = floor(L/2 (k - 1) + unif(0, L/2)), one frame in each half;
    continuous: i uniform, j = i + interval, both within the video (the interval shrinks to fit a short one).
    """
    if length < 2:
        raise ValueError(f"a frame pair needs a video of at least 2 frames, got {length}")
    if sampling == "distant":
        half = length / 2
        first = int(rng.uniform(0, half))  # < half <= length - 1
        second = min(int(half + rng.uniform(0, half)), length - 1)
        return first, max(second, first + 1)  # an odd length's middle frame may fall in both halves
    if sampling == "continuous":
        gap = max(1, min(interval, length - 1))
        first = int(rng.integers(0, length - gap))
        return first, first + gap
    raise ValueError(f"vfs.sampling: expected one of {SAMPLINGS}, got {sampling!r}")


def vfs_loss(p1: Tensor, z1: Tensor, p2: Tensor, z2: Tensor) -> Tensor:
    """Eq. 5 of paper 003, symmetrised: 1/2 mean ||p1' - sg(z2')||^2 + 1/2 mean ||p2' - sg(z1')||^2.

    p1, p2: B x D predictor outputs of frame 1 and frame 2; z1, z2: B x D projector outputs of the
    same frames (the target branch: no gradient reaches them). x' = x / ||x||_2, so each term is
    2 - 2 cos(p, z), in [0, 4]. Returns a float32 scalar.
    """
    if not (p1.shape == z1.shape == p2.shape == z2.shape) or p1.dim() != 2:
        raise ValueError(
            f"p1, z1, p2, z2: expected four B x D tensors, got {[tuple(t.shape) for t in (p1, z1, p2, z2)]}"
        )

    def distance(p: Tensor, z: Tensor) -> Tensor:
        p, z = F.normalize(p.float(), dim=1), F.normalize(z.detach().float(), dim=1)
        return (2 - 2 * (p * z).sum(dim=1)).mean()

    return 0.5 * distance(p1, z2) + 0.5 * distance(p2, z1)


def projector(width: int) -> nn.Sequential:
    """The authors' SimSiamHead projection: 3 x (Linear, BatchNorm1d), ReLU between, none on the output."""
    layers: list[nn.Module] = []
    for i in range(3):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width)] + ([nn.ReLU(inplace=True)] if i < 2 else [])
    return nn.Sequential(*layers)


def predictor(width: int) -> nn.Sequential:
    """The authors' predictor: Linear(width, width/4), BatchNorm1d, ReLU, Linear(width/4, width)."""
    hidden = width // 4
    return nn.Sequential(
        nn.Linear(width, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, width)
    )


def zero_init_residual(encoder: Encoder) -> None:
    """The last BatchNorm of every residual branch starts at 0 (torchvision's zero_init_residual)."""
    for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4):
        for block in layer:
            last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
            nn.init.zeros_(last_bn.weight)


class VFS(nn.Module):
    """VFS without negatives around a standard-stride `Encoder` (stride 32, as the paper trains).

    forward(view_q, view_k: B x 3 x S x S, two frames of each of B videos, ImageNet-normalised RGB)
    -> {"loss": `vfs_loss`, "cosine": mean cos(p, z) over both directions (detached)}. The encoder's
    weights load into every stride preset for evaluation, like the spatial stage's.
    """

    def __init__(self, model: ModelConfig):
        super().__init__()
        encoder = Encoder(model.arch, TEACHER_RES4_STRIDE)
        zero_init_residual(encoder)
        if model.weights != "random":
            load_encoder_weights(encoder, load_state_dict_file(model.weights), f"model.weights {model.weights}")
        width = encoder.out_channels["res5"]
        self.backbone, self.projector, self.predictor = encoder, projector(width), predictor(width)

    @property
    def encoder(self) -> Encoder:
        return self.backbone

    def embed(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """(z, p): B x D projector and predictor outputs of B frames (BatchNorm over these B only)."""
        res5 = self.backbone(frames, layers=("res5",))["res5"]  # B x C x h x w
        z = self.projector(res5.mean(dim=(2, 3)))
        return z, self.predictor(z)

    def forward(self, view_q: Tensor, view_k: Tensor) -> dict[str, Tensor]:
        if view_q.shape != view_k.shape or view_q.ndim != 4:
            raise ValueError(
                "views: expected two B x 3 x H x W batches of one shape, "
                f"got {tuple(view_q.shape)} and {tuple(view_k.shape)}"
            )
        z1, p1 = self.embed(view_q)  # each frame set through the trunk on its own, as the authors' forward_train
        z2, p2 = self.embed(view_k)
        loss = vfs_loss(p1, z1, p2, z2)
        return {"loss": loss, "cosine": (1 - loss.detach() / 2)}
