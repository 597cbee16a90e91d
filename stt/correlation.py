"""Local (windowed) and global correlation between two feature maps; shared by losses and propagation.

Local correlation compares each query position of `q` with the keys of `k` inside a square window
of radius r around the same position (paper 001, Eq. 2). A window of side 2r+1 is stored as
(2r+1)^2 channels in row-major displacement order:

    channel (dy + r) * (2r + 1) + (dx + r)  <->  key at (y + dy, x + dx),   dy, dx in [-r, r]

Keys that fall outside the frame are *masked*: their logit is -inf, so the softmax gives them
zero weight and the window of a border position is simply smaller. This matches the authors'
dense masked correlation exactly (which never sees out-of-frame keys), unlike a zero-padded
correlation layer where an out-of-frame key would get logit 0.

Memory stays linear in the window: no C x window x positions tensor is ever built. The logits are
computed one window row (dy) at a time as a batched matrix product of each query row with the
matching key row, from which the 2r+1 diagonals around the query are read; aggregation loops over
the same 2r+1 row offsets.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _check_pair(q: Tensor, k: Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(
            f"q and k: expected two B x C x h x w tensors of one shape, got {tuple(q.shape)} and {tuple(k.shape)}"
        )


def window_side(radius: int) -> int:
    if not isinstance(radius, int) or radius < 0:
        raise ValueError(f"radius: expected a non-negative integer, got {radius!r}")
    return 2 * radius + 1


def window_validity(height: int, width: int, radius: int, device: torch.device | str = "cpu") -> Tensor:
    """1 x (2r+1)^2 x h x w bool: True where the window's key lies inside the h x w frame."""
    side = window_side(radius)
    offsets = torch.arange(side, device=device) - radius
    rows = offsets.view(side, 1) + torch.arange(height, device=device).view(1, height)  # dy x y
    cols = offsets.view(side, 1) + torch.arange(width, device=device).view(1, width)  # dx x x
    rows_inside = ((rows >= 0) & (rows < height)).view(side, 1, height, 1)
    cols_inside = ((cols >= 0) & (cols < width)).view(1, side, 1, width)
    return (rows_inside & cols_inside).view(1, side * side, height, width)


def _diagonal_band(scores: Tensor, side: int) -> Tensor:
    """N x w x (w + side - 1) -> N x w x side with out[n, x, d] = scores[n, x, x + d].

    The skew trick: laying the rows out with stride w + side instead of w + side - 1 shifts row
    x left by x, so the band becomes the first `side` columns (views and one pad, no gather).
    """
    n, w, padded = scores.shape
    flat = F.pad(scores.reshape(n, w * padded), (0, w))
    return flat.view(n, w, padded + 1)[:, :, :side]


def local_correlation(q: Tensor, k: Tensor, radius: int) -> Tensor:
    """Windowed logits q.k / sqrt(C) (paper 001, Eq. 2 before the softmax).

    q, k: B x C x h x w (query and key frame; any memory format, any float dtype).
    Returns B x (2r+1)^2 x h x w in the dtype of the product (bf16 under autocast), with -inf
    where the key is outside the frame. Window order: see the module docstring.
    """
    _check_pair(q, k)
    batch, channels, height, width = q.shape
    side = window_side(radius)
    # Rows first (h x B x w x C): a shift by dy is then a slice of the leading dimension, and
    # each query row meets its key row in one batched matrix product.
    q_rows = (q / math.sqrt(channels)).permute(2, 0, 3, 1).reshape(height * batch, width, channels)
    k_padded = F.pad(k, (radius, radius, radius, radius)).permute(2, 0, 3, 1).contiguous()
    per_row_offset = []
    for dy in range(side):
        k_rows = k_padded[dy : dy + height].reshape(height * batch, width + side - 1, channels)
        scores = torch.bmm(q_rows, k_rows.transpose(1, 2))  # hB x w x (w + 2r)
        per_row_offset.append(_diagonal_band(scores, side))  # hB x w x (2r+1)
    logits = torch.stack(per_row_offset)  # dy x hB x w x dx
    logits = logits.view(side, height, batch, width, side).permute(2, 0, 4, 1, 3)
    logits = logits.reshape(batch, side * side, height, width)
    valid = window_validity(height, width, radius, q.device)
    return logits.masked_fill(~valid, float("-inf"))


def local_softmax(logits: Tensor) -> Tensor:
    """Softmax over the window (dim 1) in float32: B x (2r+1)^2 x h x w -> same shape, rows sum to 1."""
    return torch.softmax(logits.float(), dim=1)


def aggregate_local(weights: Tensor, values: Tensor) -> Tensor:
    """Weighted sum of the values in each window (paper 001, Eq. 3).

    weights: B x (2r+1)^2 x h x w (e.g. `local_softmax` output; zero outside the frame).
    values: B x D x h x w, on the key frame's grid.
    Returns B x D x h x w: out[:, :, y, x] = sum_{dy,dx} weights[:, (dy,dx), y, x] * values[:, :, y+dy, x+dx],
    out-of-frame values counting as zero. Transient memory per row offset: D x (2r+1) x positions.
    """
    if (
        weights.dim() != 4
        or values.dim() != 4
        or weights.shape[0] != values.shape[0]
        or weights.shape[2:] != values.shape[2:]
    ):
        raise ValueError(
            "weights and values: expected B x (2r+1)^2 x h x w and B x D x h x w, "
            f"got {tuple(weights.shape)} and {tuple(values.shape)}"
        )
    side = math.isqrt(weights.shape[1])
    if side * side != weights.shape[1] or side % 2 == 0:
        raise ValueError(f"weights: expected (2r+1)^2 window channels, got {weights.shape[1]}")
    radius = side // 2
    height = values.shape[2]
    values_padded = F.pad(values, (radius, radius, radius, radius))
    out = None
    for dy in range(side):
        windows = values_padded[:, :, dy : dy + height].unfold(3, side, 1)  # B x D x h x w x dx (a view)
        row_weights = weights[:, dy * side : (dy + 1) * side].permute(0, 2, 3, 1).unsqueeze(1)  # B x 1 x h x w x dx
        term = (windows * row_weights).sum(-1)
        out = term if out is None else out + term
    return out


def global_correlation(q: Tensor, k: Tensor, temperature: float) -> Tensor:
    """softmax_j(q_i . k_j / temperature) over all key positions (paper 001, Eq. 8).

    q, k: B x C x h x w. Returns B x hw x hw float32 (rows: query positions, row-major).
    Computed in float32 with autocast off: with a small temperature the logits are large, and
    bf16's 8-bit mantissa would reorder near-equal ones.
    """
    _check_pair(q, k)
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = torch.bmm(q.float().flatten(2).transpose(1, 2), k.float().flatten(2)) / temperature
    return torch.softmax(logits, dim=-1)
