"""Labels between the image and the feature grid: the first frame's mask onto the grid (area or nearest
sampling), soft labels back to image size, and the most likely label per location.

Shapes: H x W image, h x w feature grid, L labels (background included), T frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stt.propagation.rule import LABEL_SAMPLINGS


def downsample_labels(mask: torch.Tensor, num_labels: int, grid: tuple[int, int], mode: str = "area") -> torch.Tensor:
    """Label ids at image resolution -> soft labels on the feature grid.

    mode "area": each grid cell gets the fraction of its image area covered by each label
    (adaptive average pooling of the one-hot map), so non-integer ratios such as 480x854 -> 60x107
    work. mode "nearest": the one-hot of one sampled pixel per cell, as the authors' evaluator
    (PIL's nearest resize of the id map): cell i reads pixel floor((i + 1/2) H / h), clamped.
    mask: H x W integer ids in [0, num_labels). Returns L x h x w float32 (sums to 1 per cell).
    """
    if mask.dim() != 2 or mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise ValueError(
            f"mask: expected an H x W tensor of integer label ids, got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    if num_labels < 1:
        raise ValueError(f"num_labels: expected at least 1, got {num_labels}")
    if mode not in LABEL_SAMPLINGS:
        raise ValueError(f"propagation.label_sampling: expected one of {LABEL_SAMPLINGS}, got {mode!r}")
    low, high = int(mask.min()), int(mask.max())
    if low < 0 or high >= num_labels:
        raise ValueError(f"mask: label ids must lie in [0, {num_labels}), found ids from {low} to {high}")
    if mode == "nearest":
        rows = nearest_source_index(grid[0], mask.shape[0], mask.device)
        cols = nearest_source_index(grid[1], mask.shape[1], mask.device)
        picked = mask[rows[:, None], cols[None, :]].long()  # h x w
        return F.one_hot(picked, num_labels).permute(2, 0, 1).float()
    one_hot = F.one_hot(mask.long(), num_labels).permute(2, 0, 1).float()  # L x H x W
    return F.adaptive_avg_pool2d(one_hot.unsqueeze(0), grid).squeeze(0)  # L x h x w


def nearest_source_index(out_size: int, in_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """out_size source indices of a nearest resize from in_size samples: floor((i + 1/2) in / out),
    clamped (pixel centres, as PIL's NEAREST; torch's mode="nearest" uses floor(i in / out) instead)."""
    index = ((torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * (in_size / out_size)).floor().long()
    return index.clamp_(0, in_size - 1)


def upsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft labels T x L x h x w -> T x L x H x W, bilinear with align_corners=False."""
    if labels.dim() != 4:
        raise ValueError(f"labels: expected T x L x h x w, got shape {tuple(labels.shape)}")
    return F.interpolate(labels, size=size, mode="bilinear", align_corners=False)


def labels_to_mask(labels: torch.Tensor) -> torch.Tensor:
    """Soft labels (..., L, H, W) -> label ids (..., H, W), the most likely label per location."""
    if labels.dim() < 3:
        raise ValueError(f"labels: expected (..., L, H, W), got shape {tuple(labels.shape)}")
    # max's indices are argmax's (the first of tied maxima, NaN counted largest), and on the CPU 10-20x faster
    # over this non-innermost dim (1 thread, 480 x 854, 2-6 labels: 2-3 ms vs 40 ms; argmax was the largest
    # piece of a top-K graph trial, stt/propagation/graph.py).
    return labels.max(dim=-3).indices


def minmax_normalise(labels: torch.Tensor) -> torch.Tensor:
    """(..., L, H, W) -> each frame's channel rescaled to [0, 1] over H x W (the authors' rule before
    the argmax, so a faint object whose soft label never beats the background still wins where it
    peaks). A channel whose maximum is not positive stays as it is: (x - min) / (max - min + 1e-12)."""
    if labels.dim() < 3:
        raise ValueError(f"labels: expected (..., L, H, W), got shape {tuple(labels.shape)}")
    flat = labels.flatten(-2)
    low, high = flat.amin(-1)[..., None, None], flat.amax(-1)[..., None, None]
    return torch.where(high > 0, (labels - low) / (high - low + 1e-12), labels)


def soft_labels_to_mask(labels: torch.Tensor, size: tuple[int, int], minmax: bool = False) -> torch.Tensor:
    """Soft labels T x L x h x w -> label ids T x H x W: bilinear upsampling, optional per-frame,
    per-channel min-max normalisation (`minmax_normalise`), argmax. One frame at a time: a frame's
    L x H x W upsampled map is the largest tensor of an evaluation."""
    masks = []
    for frame in labels:
        up = upsample_labels(frame[None], size)
        masks.append(labels_to_mask(minmax_normalise(up) if minmax else up)[0])
    return torch.stack(masks)
