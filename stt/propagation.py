"""Label propagation: Algorithm 1 of paper 004 (Sec. 2), with every factor of Sec. 4.3 a setting.

Given the features of every frame of a video and the first frame's labels on the feature grid,
each later frame t gets soft labels copied from its context: the first frame (ground truth) and
the `cfg.context` previous frames (their predictions), as in the CRW / DINO / STT queue. Per
target location the labels of the top-k most similar allowed context locations are averaged,
weighted by softmaxed affinities:

    overall    one affinity over all context locations; top-k; softmax(top-k / T); soft copy.
    per-frame  per context frame: softmax(affinity / T) over the frame (before-mask, UVC) or over
               its window only (after-mask, CorrFlow / MAST); top-k; soft copy without
               renormalising; mean over the context frames (Alg. 1 line 36).

"Allowed" is CRW's fixed region: a context location within `cfg.radius` feature cells of the
target (square: Chebyshev distance, circle: Euclidean), the first frame windowed too iff
`cfg.window_first_frame`. Locations outside are excluded (-inf before the top-k), where the
paper's pseudocode multiplies them by 0: with L2-normalised features a masked 0 would outrank
every real negative affinity and copy labels from outside the window.

Two implementations give the same numbers: `propagate_dense` builds the whole
N x (n*N) affinity of each frame (the reference); `propagate_windowed` computes affinities only
near the window, in chunks of target rows, so memory stays bounded at full DAVIS resolution: the
D x D square of offsets around each target (D = 2R + 1, R = floor(radius)), or, where that square is
wider than the grid (a wide radius at a small input), the band of whole grid rows the chunk's windows
reach (`choose_window_kernel`). Shapes: T frames,
C channels, h x w feature grid (N = h*w), L labels (background included), n context frames,
B target locations in a chunk (r rows of the grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from stt.config import PropagationConfig, check_choice

AGGREGATIONS = ("overall", "per-frame")
PER_FRAME_NORMS = ("before-mask", "after-mask")
WINDOWS = ("square", "circle")
LABEL_SAMPLINGS = ("area", "nearest")
# Up to this many feature channels the window logits are computed as shifted multiply-adds,
# above it as tile matmuls (measured on a 2-core CPU at 60x107: shift 1.4x faster at C = 3,
# even at C = 4, tile faster from C = 8 on).
SHIFT_MAX_CHANNELS = 4
# Logits per chunk of the windowed implementation (n * M per target), at most: small enough to
# stay in cache (measured fastest from 2**20 to 2**21 on the CPU); the tile matmuls take whole tile rows.
CHUNK_LOGITS = 2**21


# The authors' window per task and feature stride, in cells (their `neighbor_range` / 2, configs/test/
# res18_d8.py and res18_d4.py): DAVIS 24 / 70, JHMDB 10 / 24, VIP 32 / 70. `propagation.radius`
# None (the default) means this table; `for_task` resolves it once the task and stride are known.
AUTHORS_RADIUS = {"davis": {8: 12.0, 4: 35.0}, "jhmdb": {8: 5.0, 4: 12.0}, "vip": {8: 16.0, 4: 35.0}}


def default_radius(task: str, stride: int) -> float:
    """The authors' propagation radius in feature cells for `task` at feature `stride` (AUTHORS_RADIUS).

    Strides between or beyond the table's keep the pixel radius of the nearest listed stride.
    """
    check_choice("task", task, tuple(AUTHORS_RADIUS))
    if stride < 1:
        raise ValueError(f"stride: expected a positive feature stride in pixels, got {stride!r}")
    table = AUTHORS_RADIUS[task]
    nearest = min(table, key=lambda s: (abs(s - stride), s))
    return table[nearest] if nearest == stride else round(table[nearest] * nearest / stride)


def for_task(cfg: PropagationConfig, task: str, stride: int) -> PropagationConfig:
    """`cfg` with radius None replaced by the task's and stride's default (an explicit radius is kept)."""
    if cfg.radius is not None:
        return cfg
    return replace(cfg, radius=default_radius(task, stride))


# ---------------------------------------------------------------- labels on the grid and back


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
    check_choice("propagation.label_sampling", mode, LABEL_SAMPLINGS)
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
    # piece of a top-K graph trial, stt/graph.py).
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


# ---------------------------------------------------------------- the spatial window


def inside_window(dy: torch.Tensor, dx: torch.Tensor, radius: float, window: str) -> torch.Tensor:
    """Whether a context cell displaced by (dy, dx) from the target may be propagated from."""
    if window == "square":
        return (dy.abs() <= radius) & (dx.abs() <= radius)
    if window == "circle":
        return dy * dy + dx * dx <= radius * radius
    raise ValueError(f"window: expected one of {WINDOWS}, got {window!r}")


def window_mask(h: int, w: int, radius: float, window: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """N x N bool, [target j, context i] = context location i lies in target j's window."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()  # N
    return inside_window(ys[None, :] - ys[:, None], xs[None, :] - xs[:, None], radius, window)


# ---------------------------------------------------------------- one target frame


def _soft_copy(weights: torch.Tensor, label_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_k weights * labels[label_index]: (..., B, k) weights and indices into P x L -> B x L."""
    # Labels follow the weights' dtype: half-precision features give fp32 window scores but fp16 labels.
    return torch.einsum("...bk,...bkl->bl", weights, labels[label_index].to(weights.dtype))


def _flat_labels(context_labels: torch.Tensor) -> torch.Tensor:
    """n x L x h x w -> (n*N) x L: row f*N + i is frame f's label vector at location i."""
    return context_labels.flatten(2).transpose(1, 2).reshape(-1, context_labels.shape[1])


def _first_windowed_frame(cfg: PropagationConfig, n: int) -> int:
    """Index of the first context frame restricted to the window (n: none is)."""
    if cfg.radius == 0:
        return n
    return 0 if cfg.window_first_frame else 1


def predict_dense(
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    target_features: torch.Tensor,
    cfg: PropagationConfig,
) -> torch.Tensor:
    """Labels of one target frame from the full N x (n*N) affinity (the reference).

    context_features: n x C x h x w, frame 0 being the video's first frame; context_labels:
    n x L x h x w; target_features: C x h x w. Features are compared as given (`propagate`
    L2-normalises them when cfg.normalize). Returns L x h x w.
    """
    n, _, h, w = context_features.shape
    num = h * w
    labels = _flat_labels(context_labels)  # (n*N) x L
    affinity = torch.einsum("fci,cj->jfi", context_features.flatten(2), target_features.flatten(1))  # N x n x N
    logits = affinity.div_(cfg.temperature)  # in place: this is by far the largest tensor
    first_windowed = _first_windowed_frame(cfg, n)
    outside = ~window_mask(h, w, cfg.radius, cfg.window, logits.device)[:, None, :]  # N x 1 x N

    if cfg.aggregation == "overall":
        logits[:, first_windowed:].masked_fill_(outside, float("-inf"))
        values, index = logits.reshape(num, n * num).topk(min(cfg.topk, n * num), dim=-1)  # N x k
        return _soft_copy(values.softmax(dim=-1), index, labels).T.reshape(-1, h, w)

    if cfg.per_frame_norm == "before-mask":
        log_prob = logits.log_softmax(dim=-1)
        log_prob[:, first_windowed:].masked_fill_(outside, float("-inf"))
    else:
        logits[:, first_windowed:].masked_fill_(outside, float("-inf"))
        log_prob = logits.log_softmax(dim=-1)
    values, index = log_prob.transpose(0, 1).topk(min(cfg.topk, num), dim=-1)  # n x N x k
    index = index + torch.arange(n, device=index.device)[:, None, None] * num
    return (_soft_copy(values.exp(), index, labels) / n).T.reshape(-1, h, w)


# The windowed implementation scores a chunk of target rows y0 <= y < y1 against M context cells
# per target and windowed context frame: logits n x (target dims) x M; a bias (target dims) x M,
# -inf where the context cell is off the grid or outside the window, else 0 (the same for every
# frame, so it is added to the few values that need it); and each cell's flat location in its
# frame, (target dims) x M. The target dims flatten, row-major, to a grid of at least r x w
# targets (r = y1 - y0) whose top-left r x w block is the chunk. No N x (n*N) tensor is built.


def window_bias(
    target_y: torch.Tensor,
    target_x: torch.Tensor,
    context_y: torch.Tensor,
    context_x: torch.Tensor,
    grid: tuple[int, int],
    radius: float,
    window: str,
) -> torch.Tensor:
    """0 where context cell (context_y, context_x) lies on the h x w grid and in the window of
    target (target_y, target_x), else -inf (broadcast shape of the four integer tensors).
    Added to the products, it excludes those cells before the top-k."""
    h, w = grid
    on_grid = (context_y >= 0) & (context_y < h) & (context_x >= 0) & (context_x < w)
    allowed = on_grid & inside_window(context_y - target_y, context_x - target_x, radius, window)
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def _buffer(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A `shape` tensor in the memory of `out` (flat, large enough) when given, else a new one.

    The windowed implementation reuses one buffer for every chunk's logits: on the CPU a fresh
    allocation of tens of MiB comes from mmap and costs a page fault per 4 KiB at first touch."""
    if out is None:
        return like.new_empty(shape)
    return out[: math.prod(shape)].view(shape)


def _flat_location(context_y: torch.Tensor, context_x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """y * w + x, clamped onto the grid: an off-grid cell has logit -inf (weight 0) but must still index."""
    h, w = grid
    return context_y.clamp(0, h - 1) * w + context_x.clamp(0, w - 1)


def _context_band(context: torch.Tensor, y0: int, y1: int, reach: int, width: int) -> torch.Tensor:
    """Rows [y0 - R, y1 + R) and columns [-R, width + R) of the context frames, zero where off the
    h x w grid: n x C x (y1 - y0 + 2R) x (width + 2R)."""
    h, w = context.shape[-2:]
    top, bottom = y0 - reach, y1 + reach
    band = context[..., max(top, 0) : min(bottom, h), :]
    return F.pad(band, (reach, reach + width - w, max(0, -top), max(0, bottom - h)))


def window_logits_by_shift(
    context: torch.Tensor,
    query: torch.Tensor,
    y0: int,
    y1: int,
    radius: float,
    window: str,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window logits as C multiply-adds over shifted views (few channels: far fewer operations than a matmul).

    context: n x C x h x w; query: C x h x w (target features / temperature). The M = D*D cells
    of target (y, x) are (y + dy, x + dx), |dy|, |dx| <= R = floor(radius). Returns logits
    n x r x w x D*D, [f, y - y0, x, (R + dy) * D + R + dx] = query[:, y, x] . context[f, :, y + dy, x + dx]
    (in `out`'s memory if given, `_buffer`), bias and locations r x w x D*D.
    """
    n, channels, h, w = context.shape
    rows, reach = y1 - y0, math.floor(radius)
    size = 2 * reach + 1
    offsets = torch.arange(-reach, reach + 1, device=context.device)
    target_y = torch.arange(y0, y1, device=context.device)[:, None]  # r x 1
    target_x = torch.arange(w, device=context.device)  # w
    context_y, context_x = (
        offsets[:, None, None, None] + target_y,
        offsets[:, None, None] + target_x,
    )  # D x 1 x r x 1, D x 1 x w
    bias = window_bias(target_y, target_x, context_y, context_x, (h, w), radius, window).permute(2, 3, 0, 1).flatten(2)
    locations = _flat_location(context_y, context_x, (h, w)).permute(2, 3, 0, 1).reshape(rows, w, size * size)

    band = _context_band(context, y0, y1, reach, w)  # n x C x (r + 2R) x (w + 2R)
    shifted = band.unfold(2, size, 1).unfold(
        3, size, 1
    )  # n x C x r x w x D x D: [.., y, x, i, j] = band[.., y + i, x + j]
    target = query[:, y0:y1, :, None, None]  # C x r x w x 1 x 1
    logits = _buffer(out, (n, size, size, rows, w), context).permute(0, 3, 4, 1, 2)  # n x r x w x D x D
    torch.mul(shifted[:, 0], target[0], out=logits)
    for c in range(1, channels):
        logits.addcmul_(shifted[:, c], target[c])
    return logits.flatten(3), bias, locations


def window_logits_by_tile(
    context: torch.Tensor,
    query: torch.Tensor,
    y0: int,
    y1: int,
    radius: float,
    window: str,
    tile: int,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window logits as one matmul per context frame and t x t target tile (many channels).

    Each tile's targets are multiplied with the tile's whole (t + 2R)^2 context patch, the M
    cells of each of its targets (those outside a target's window get bias -inf). Arguments as
    `window_logits_by_shift`; returns logits n x a x t x b x t x M (a x b tiles over r x w),
    bias and locations a x t x b x t x M.
    """
    n, channels, h, w = context.shape
    rows, reach = y1 - y0, math.floor(radius)
    patch = tile + 2 * reach
    a, b = math.ceil(rows / tile), math.ceil(w / tile)  # tiles down and across
    in_tile, in_patch = torch.arange(tile, device=context.device), torch.arange(patch, device=context.device)
    tile_y = y0 + tile * torch.arange(a, device=context.device)  # a: first row of each tile
    tile_x = tile * torch.arange(b, device=context.device)  # b
    context_y = (tile_y[:, None] + in_patch - reach)[:, None, None, None, :, None]  # a x 1 x 1 x 1 x patch x 1
    context_x = (tile_x[:, None] + in_patch - reach)[:, None, None, None, :]  # b x 1 x 1 x 1 x patch
    target_y = (tile_y[:, None] + in_tile)[:, None, :, None, None, None]  # a x 1 x t x 1 x 1 x 1
    target_x = (tile_x[:, None] + in_tile)[:, None, :, None, None]  # b x t x 1 x 1
    bias = window_bias(
        target_y, target_x, context_y, context_x, (h, w), radius, window
    )  # a x b x t x t x patch x patch
    locations = _flat_location(context_y, context_x, (h, w)).reshape(a, 1, b, 1, patch * patch)

    target = F.pad(query[:, y0:y1], (0, b * tile - w, 0, a * tile - rows))  # C x a*t x b*t
    tiles = target.reshape(channels, a, tile, b, tile).permute(1, 3, 2, 4, 0).reshape(a * b, tile * tile, channels)
    logits = _buffer(out, (n, a, b, tile, tile, patch * patch), context)
    # One frame's context rows and patches at a time, refilled: fresh memory would cost page faults.
    top, bottom = max(y0 - reach, 0), min(y0 + a * tile + reach, h)
    band = context.new_zeros(channels, a * tile + 2 * reach, b * tile + 2 * reach)  # zero off the grid
    on_grid = band[:, top - (y0 - reach) : bottom - (y0 - reach), reach : reach + w]
    patches = context.new_empty(a * b, channels, patch, patch)
    for f in range(n):
        on_grid.copy_(context[f, :, top:bottom])
        patches.view(a, b, channels, patch, patch).copy_(
            band.unfold(1, patch, tile).unfold(2, patch, tile).permute(1, 2, 0, 3, 4)
        )
        torch.bmm(tiles, patches.view(a * b, channels, -1), out=logits[f].view(a * b, tile * tile, -1))
    bias = bias.reshape(a, b, tile, tile, patch * patch).permute(0, 2, 1, 3, 4)
    return logits.permute(0, 1, 3, 2, 4, 5), bias, locations.expand(a, tile, b, tile, -1)


def window_logits_by_band(
    context: torch.Tensor,
    query: torch.Tensor,
    y0: int,
    y1: int,
    radius: float,
    window: str,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window logits as one matmul per context frame against the band of whole grid rows the chunk's
    windows reach (wide windows on small grids: fewer cells per target than a D x D square).

    Every target of rows y0 <= y < y1 is scored against all M = b*w cells of rows
    max(0, y0 - R) <= y' < min(h, y1 + R) (b rows, R = floor(radius)); those outside its window get
    bias -inf. Arguments as `window_logits_by_shift`; returns logits n x B x M (B = r*w targets),
    bias B x M and locations B x M (flat cells of the frame; a view of one row).
    """
    n, channels, h, w = context.shape
    reach = math.floor(radius)
    top, bottom = max(y0 - reach, 0), min(y1 + reach, h)
    targets = query[:, y0:y1].flatten(1)  # C x B
    logits = _buffer(out, (n, targets.shape[1], (bottom - top) * w), context)
    torch.matmul(targets.T, context[:, :, top:bottom].flatten(2), out=logits)  # n x B x M
    cells = torch.arange(top * w, bottom * w, device=context.device)  # M
    target_y = torch.arange(y0, y1, device=context.device)[:, None, None]  # r x 1 x 1
    target_x = torch.arange(w, device=context.device)[:, None]  # w x 1
    bias = window_bias(target_y, target_x, cells // w, cells % w, (h, w), radius, window).flatten(0, 1)  # B x M
    return logits, bias, cells.expand(bias.shape)


@dataclass(frozen=True)
class WindowKernel:
    """How `predict_windowed` (and the graph builder) score a windowed chunk: `name` (shift, tile or band),
    target rows per chunk, the width its targets are laid out at (tile: padded to whole tiles), logits per
    target and frame at most (the buffer's size) and the tile side (tile only)."""

    name: str
    rows_per_chunk: int
    scored_width: int
    cells_per_target: int
    tile: int

    def buffer(self, frames: int, like: torch.Tensor) -> torch.Tensor:
        """One flat buffer for every chunk's logits of `frames` context frames."""
        return like.new_empty(frames * self.rows_per_chunk * self.scored_width * self.cells_per_target)

    def logits(
        self,
        context: torch.Tensor,
        query: torch.Tensor,
        y0: int,
        y1: int,
        radius: float,
        window: str,
        out: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """This kernel's logits, bias and locations for target rows y0 <= y < y1 (as `window_logits_by_shift`),
        and the grid their target dims flatten to (`_chunk_targets`'s `scored`)."""
        if self.name == "band":
            logits, bias, locations = window_logits_by_band(context, query, y0, y1, radius, window, out)
        elif self.name == "shift":
            logits, bias, locations = window_logits_by_shift(context, query, y0, y1, radius, window, out)
        else:
            logits, bias, locations = window_logits_by_tile(context, query, y0, y1, radius, window, self.tile, out)
        rows = math.ceil((y1 - y0) / self.tile) * self.tile if self.name == "tile" else y1 - y0
        return logits, bias, locations, (rows, self.scored_width)


def choose_window_kernel(
    grid: tuple[int, int], frames: int, channels: int, radius: float, chunk_size: int, tile: int, kernel: str = "auto"
) -> WindowKernel:
    """The kernel that scores the fewest cells per target (kernel="auto"), or the one named.

    shift / tile score a D x D square ((t + 2R)^2 for t x t tiles) around every target, wasted where it
    leaves the grid; band scores whole rows, min(h, r + 2R) of them. On DAVIS at short side 128 (16 x 29
    cells, 256 channels) a band is the whole frame, 464 cells per target: tiles win at R = 6 (400), the
    band from R = 9 (676 as tiles) to R = 35 (6,084); at 480p (60 x 107) radius 12 is 1,024 cells as
    tiles against >= 2,675 as a band.
    Chunks hold at most chunk_size targets and CHUNK_LOGITS logits (frames x targets x cells).
    """
    h, w = grid
    reach = math.floor(radius)

    def rows_fitting(cells_for_rows) -> int:  # the most rows a chunk may hold (at least one)
        fits = [
            r for r in range(1, h + 1) if r * w <= chunk_size and frames * r * w * cells_for_rows(r) <= CHUNK_LOGITS
        ]
        return max(fits, default=1)

    band_rows = rows_fitting(lambda r: min(h, r + 2 * reach) * w)
    band = WindowKernel("band", band_rows, w, min(h, band_rows + 2 * reach) * w, tile)
    if channels <= SHIFT_MAX_CHANNELS:
        span = 2 * reach + 1
        square = WindowKernel("shift", rows_fitting(lambda r: span**2), w, span**2, tile)
    else:
        span = tile + 2 * reach
        rows = tile * max(1, rows_fitting(lambda r: span**2) // tile)
        square = WindowKernel("tile", rows, math.ceil(w / tile) * tile, span**2, tile)
    if kernel == "auto":
        return band if band.cells_per_target < square.cells_per_target else square
    if kernel == "band":
        return band
    if kernel == "square":
        return square
    raise ValueError(f"kernel: expected one of ('auto', 'band', 'square'), got {kernel!r}")


def _top_overall(logits: torch.Tensor, bias: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest of each target's n*M biased logits (n x ... x M, bias ... x M): values,
    frames and cells, each ... x k.

    Each of them lies in one of the k cells with the largest maximum over frames (otherwise k
    larger logits would exist), so the full top-k runs over n*k candidates instead of n*M.
    """
    n, num_cells = logits.shape[0], min(k, logits.shape[-1])
    best = torch.amax(logits, dim=0, out=torch.empty_like(logits[0])).add_(bias)  # laid out as one frame: one pass
    cell = best.topk(num_cells, dim=-1).indices  # ... x k'
    candidates = logits.gather(-1, cell.expand(n, *cell.shape)) + bias.gather(-1, cell)  # n x ... x k'
    values, pick = candidates.movedim(0, -2).flatten(-2).topk(min(k, n * num_cells), dim=-1)
    return values, pick // num_cells, cell.gather(-1, pick % num_cells)


def _top_per_frame(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest logits of each target in each frame (n x ... x M): values, frames and cells, each ... x n x k."""
    values, cell = logits.topk(min(k, logits.shape[-1]), dim=-1)  # n x ... x k
    frame = torch.arange(logits.shape[0], device=logits.device).view(-1, *[1] * (cell.dim() - 1)).expand_as(cell)
    return values.movedim(0, -2), frame.movedim(0, -2), cell.movedim(0, -2)


def _chunk_targets(x: torch.Tensor, scored: tuple[int, int], rows: int, w: int) -> torch.Tensor:
    """(target dims) x m, the target dims flattening to a `scored` grid, -> the chunk's rows*w x m."""
    return x.reshape(*scored, x.shape[-1])[:rows, :w].reshape(rows * w, -1)


def predict_windowed(
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    target_features: torch.Tensor,
    cfg: PropagationConfig,
    tile: int = 8,
    kernel: str = "auto",
) -> torch.Tensor:
    """Same result as `predict_dense`, computing affinities only inside the window.

    Targets go in chunks of whole rows (at most cfg.chunk_size locations, and CHUNK_LOGITS
    logits), so memory stays bounded, never O(n * N^2). The windowed context frames are scored
    all at once by the kernel `choose_window_kernel` picks (`kernel`="auto": the fewest cells per
    target): `window_logits_by_shift` up to SHIFT_MAX_CHANNELS channels, else `window_logits_by_tile`
    with `tile` x `tile` target tiles ("square"), or `window_logits_by_band` ("band"). Frames without
    a window (radius 0, or the first frame unless window_first_frame) and the before-mask softmax
    normaliser use the whole frame. Shapes as `predict_dense`.
    """
    n, channels, h, w = context_features.shape
    num = h * w
    if tile < 1:
        raise ValueError(f"tile: expected a positive number of cells, got {tile}")
    labels = _flat_labels(context_labels)  # (n*N) x L
    first_windowed = _first_windowed_frame(cfg, n)
    windowed = context_features[first_windowed:]
    query = target_features / cfg.temperature  # logits are query . context
    plan = choose_window_kernel((h, w), max(1, len(windowed)), channels, cfg.radius, cfg.chunk_size, tile, kernel)
    buffer = plan.buffer(len(windowed), query)

    prediction = labels.new_empty(num, labels.shape[1])  # N x L
    for y0 in range(0, h, plan.rows_per_chunk):
        y1 = min(y0 + plan.rows_per_chunk, h)
        targets = query[:, y0:y1].flatten(1)  # C x B
        num_targets = targets.shape[1]
        values, label_rows = [], []  # B x m: logits (overall) or log-probabilities (per-frame), label rows
        for f in range(first_windowed):
            logits = targets.T @ context_features[f].flatten(1)  # B x N
            top, index = logits.topk(min(cfg.topk, num), dim=-1)
            if cfg.aggregation == "per-frame":
                top = top - logits.logsumexp(dim=-1, keepdim=True)
            values.append(top)
            label_rows.append(index + f * num)
        if windowed.shape[0]:
            logits, bias, locations, scored = plan.logits(windowed, query, y0, y1, cfg.radius, cfg.window, buffer)
            whole_frames = None  # the before-mask normaliser, B x n': from the band when it holds whole frames
            if cfg.aggregation == "per-frame" and cfg.per_frame_norm == "before-mask":
                if plan.name == "band" and logits.shape[-1] == num:
                    whole_frames = logits.logsumexp(dim=-1).T
                else:
                    whole_frames = torch.stack([(targets.T @ c.flatten(1)).logsumexp(dim=-1) for c in windowed], 1)
            if cfg.aggregation == "overall":
                top, frame, cell = _top_overall(logits, bias, cfg.topk)  # each (target dims) x k
            else:
                top, frame, cell = _top_per_frame(logits.add_(bias), cfg.topk)  # each (target dims) x n' x k
                if cfg.per_frame_norm == "after-mask":
                    top = top - logits.logsumexp(dim=-1).movedim(0, -1)[..., None]
                top, frame, cell = top.flatten(-2), frame.flatten(-2), cell.flatten(-2)
            rows = (frame + first_windowed) * num + locations.gather(-1, cell)
            top, rows = _chunk_targets(top, scored, y1 - y0, w), _chunk_targets(rows, scored, y1 - y0, w)
            if whole_frames is not None:
                top = (top.view(num_targets, len(windowed), -1) - whole_frames[..., None]).flatten(1)
            values.append(top)
            label_rows.append(rows)
        values, label_rows = torch.cat(values, dim=1), torch.cat(label_rows, dim=1)

        chunk = slice(y0 * w, y1 * w)
        if cfg.aggregation == "overall":
            values, pick = values.topk(min(cfg.topk, values.shape[1]), dim=-1)
            prediction[chunk] = _soft_copy(values.softmax(dim=-1), label_rows.gather(1, pick), labels)
        else:
            prediction[chunk] = _soft_copy(values.exp(), label_rows, labels) / n
    return prediction.T.reshape(-1, h, w)


# ---------------------------------------------------------------- a whole video


def _check(features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig) -> None:
    if features.dim() != 4 or not features.dtype.is_floating_point:
        raise ValueError(
            f"features: expected a float T x C x h x w tensor, got {features.dtype} of shape {tuple(features.shape)}"
        )
    if first_labels.dim() != 3 or not first_labels.dtype.is_floating_point:
        raise ValueError(
            f"first_labels: expected a float L x h x w tensor, "
            f"got {first_labels.dtype} of shape {tuple(first_labels.shape)}"
        )
    if first_labels.shape[1:] != features.shape[2:]:
        raise ValueError(
            f"first_labels: grid {tuple(first_labels.shape[1:])} "
            f"differs from the features' grid {tuple(features.shape[2:])}"
        )
    if first_labels.device != features.device:
        raise ValueError(f"first_labels on {first_labels.device} but features on {features.device}")
    if features.shape[0] < 1:
        raise ValueError("features: expected at least one frame")
    check_choice("propagation.aggregation", cfg.aggregation, AGGREGATIONS)
    check_choice("propagation.per_frame_norm", cfg.per_frame_norm, PER_FRAME_NORMS)
    check_choice("propagation.window", cfg.window, WINDOWS)
    check_choice("propagation.label_sampling", cfg.label_sampling, LABEL_SAMPLINGS)
    if not cfg.temperature > 0:
        raise ValueError(f"propagation.temperature: expected a positive number, got {cfg.temperature!r}")
    if cfg.radius is None:
        raise ValueError(
            "propagation.radius: None stands for the task's default; resolve it with "
            "stt.propagation.for_task(cfg, task, stride) before propagating"
        )
    if not cfg.radius >= 0:
        raise ValueError(
            f"propagation.radius: expected a non-negative number of cells (0: no window), got {cfg.radius!r}"
        )
    for name, value, low in [("topk", cfg.topk, 1), ("context", cfg.context, 0), ("chunk_size", cfg.chunk_size, 1)]:
        if value < low:
            raise ValueError(f"propagation.{name}: expected an integer >= {low}, got {value!r}")


def context_indices(t: int, context: int, repeat_first: bool = False) -> list[int]:
    """The frames target t copies from: the first frame, then the `context` frames before t.

    repeat_first=False: [0, max(1, t - n) .. t-1], the first frame once. repeat_first=True, the
    authors' queue (`key_start = max(0, t - n)` after the first frame): [0, max(0, t - n) .. t-1],
    so for t <= n the first frame appears twice and its cells count double in the top-k.
    """
    if t < 1 or context < 0:
        raise ValueError(f"context_indices: expected t >= 1 and context >= 0, got t={t}, context={context}")
    return [0, *range(max(0 if repeat_first else 1, t - context), t)]


def _propagate_video(
    features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig, predict
) -> torch.Tensor:
    """The recurrence shared by both implementations; `predict` maps one frame's context to labels."""
    if cfg.normalize:
        features = F.normalize(features, dim=1)
    first_labels = first_labels.to(features.dtype)
    num_frames, num_labels = features.shape[0], first_labels.shape[0]
    predicted = features.new_empty((num_frames, num_labels, *features.shape[2:]))  # T x L x h x w
    predicted[0] = first_labels
    carried = predicted if cfg.soft_labels else predicted.clone()  # what later frames copy from
    for t in range(1, num_frames):
        context = context_indices(t, cfg.context, cfg.repeat_first_frame)
        predicted[t] = predict(features[context], carried[context], features[t])
        if not cfg.soft_labels:
            carried[t] = F.one_hot(predicted[t].argmax(dim=0), num_labels).permute(2, 0, 1)
    return predicted


def propagate_dense(features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig) -> torch.Tensor:
    """Propagate first_labels (L x h x w) through features (T x C x h x w) -> T x L x h x w,
    materialising each frame's full affinity (for small inputs and tests)."""
    _check(features, first_labels, cfg)
    return _propagate_video(features, first_labels, cfg, lambda c, y, g: predict_dense(c, y, g, cfg))


def propagate_windowed(
    features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig, tile: int = 8, kernel: str = "auto"
) -> torch.Tensor:
    """Same as `propagate_dense`, with affinities only inside the window and memory bounded by
    cfg.chunk_size; `tile` (cells, many channels only) trades wasted window work ((t + 2R)^2 per
    target instead of (2R + 1)^2) against matmul efficiency; `kernel` as `predict_windowed`."""
    _check(features, first_labels, cfg)
    return _propagate_video(features, first_labels, cfg, lambda c, y, g: predict_windowed(c, y, g, cfg, tile, kernel))


IMPLEMENTATIONS = {"dense": propagate_dense, "windowed": propagate_windowed}


def propagate(
    features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig, implementation: str = "windowed"
) -> torch.Tensor:
    """Soft labels T x L x h x w for every frame (frame 0 = first_labels) from features T x C x h x w."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {tuple(IMPLEMENTATIONS)}, got {implementation!r}")
    return IMPLEMENTATIONS[implementation](features, first_labels, cfg)
