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
inside the window, tile by tile, in chunks of target rows, so memory stays bounded at full DAVIS
resolution. Shapes: T frames, C channels, h x w feature grid (N = h*w), L labels (background
included), n context frames, B target locations in a chunk, K window offsets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stt.config import PropagationConfig, check_choice

AGGREGATIONS = ("overall", "per-frame")
PER_FRAME_NORMS = ("before-mask", "after-mask")
WINDOWS = ("square", "circle")


# ---------------------------------------------------------------- labels on the grid and back


def downsample_labels(mask: torch.Tensor, num_labels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Label ids at image resolution -> soft labels on the feature grid.

    Each grid cell gets the fraction of its image area covered by each label (adaptive average
    pooling of the one-hot map), so non-integer ratios such as 480x854 -> 60x107 work.
    mask: H x W integer ids in [0, num_labels). Returns L x h x w float32 (sums to 1 per cell).
    """
    if mask.dim() != 2 or mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise ValueError(f"mask: expected an H x W tensor of integer label ids, got {mask.dtype} of shape {tuple(mask.shape)}")
    if num_labels < 1:
        raise ValueError(f"num_labels: expected at least 1, got {num_labels}")
    low, high = int(mask.min()), int(mask.max())
    if low < 0 or high >= num_labels:
        raise ValueError(f"mask: label ids must lie in [0, {num_labels}), found ids from {low} to {high}")
    one_hot = F.one_hot(mask.long(), num_labels).permute(2, 0, 1).float()  # L x H x W
    return F.adaptive_avg_pool2d(one_hot.unsqueeze(0), grid).squeeze(0)  # L x h x w


def upsample_labels(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft labels T x L x h x w -> T x L x H x W, bilinear with align_corners=False."""
    if labels.dim() != 4:
        raise ValueError(f"labels: expected T x L x h x w, got shape {tuple(labels.shape)}")
    return F.interpolate(labels, size=size, mode="bilinear", align_corners=False)


def labels_to_mask(labels: torch.Tensor) -> torch.Tensor:
    """Soft labels (..., L, H, W) -> label ids (..., H, W), the most likely label per location."""
    if labels.dim() < 3:
        raise ValueError(f"labels: expected (..., L, H, W), got shape {tuple(labels.shape)}")
    return labels.argmax(dim=-3)


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


@dataclass(frozen=True)
class WindowGeometry:
    """Index tables of the window on an h x w grid, built once per video for `predict_windowed`.

    offsets:   K x 2 (dy, dx) inside the window.
    neighbour: N x K flat index of target j's k-th window cell (clamped to the grid).
    valid:     N x K whether that cell lies on the grid.
    in_tile:   tile*tile x K index of the cell in the (tile + 2R)^2 context patch of the target's tile.
    """

    h: int
    w: int
    reach: int  # R = floor(radius): the window spans [-R, R] cells on each axis
    tile: int
    offsets: torch.Tensor
    neighbour: torch.Tensor
    valid: torch.Tensor
    in_tile: torch.Tensor


def window_geometry(h: int, w: int, cfg: PropagationConfig, tile: int = 12, device: torch.device | str = "cpu") -> WindowGeometry:
    """The window's index tables for an h x w grid; `tile` is the side of the target tiles."""
    if tile < 1:
        raise ValueError(f"tile: expected a positive number of cells, got {tile}")
    reach = math.floor(cfg.radius)
    span = torch.arange(-reach, reach + 1, device=device)
    dy, dx = torch.meshgrid(span, span, indexing="ij")
    keep = inside_window(dy, dx, cfg.radius, cfg.window)
    offsets = torch.stack([dy[keep], dx[keep]], dim=1)  # K x 2

    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ny = ys.flatten()[:, None] + offsets[:, 0]  # N x K
    nx = xs.flatten()[:, None] + offsets[:, 1]
    valid = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
    neighbour = ny.clamp(0, h - 1) * w + nx.clamp(0, w - 1)

    ty, tx = torch.meshgrid(torch.arange(tile, device=device), torch.arange(tile, device=device), indexing="ij")
    patch = tile + 2 * reach
    in_tile = (ty.flatten()[:, None] + reach + offsets[:, 0]) * patch + (tx.flatten()[:, None] + reach + offsets[:, 1])
    return WindowGeometry(h, w, reach, tile, offsets, neighbour, valid, in_tile)


# ---------------------------------------------------------------- one target frame


def _soft_copy(weights: torch.Tensor, label_index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum_k weights * labels[label_index]: (..., B, k) weights and indices into P x L -> B x L."""
    return torch.einsum("...bk,...bkl->bl", weights, labels[label_index])


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


def _context_band(frame: torch.Tensor, y0: int, rows: int, reach: int, padded_w: int) -> torch.Tensor:
    """Rows [y0 - R, y0 + rows + R) of one context frame, zero-padded to C x (rows + 2R) x (padded_w + 2R)."""
    h, w = frame.shape[1:]
    top, bottom = y0 - reach, y0 + rows + reach
    band = frame[:, max(top, 0) : min(bottom, h)]
    return F.pad(band, (reach, reach + padded_w - w, max(0, -top), max(0, bottom - h)))


def _window_affinity(band: torch.Tensor, target: torch.Tensor, geometry: WindowGeometry) -> torch.Tensor:
    """Affinity of each target cell with the context cells of its window, tile by tile.

    band: C x (a*t + 2R) x (b*t + 2R) context rows around the targets (`_context_band`);
    target: C x a*t x b*t. Each t x t target tile is multiplied with its (t + 2R)^2 context patch
    in one batched matmul, then the window's K cells are picked out. Returns a*t x b*t x K.
    """
    channels = band.shape[0]
    t, reach = geometry.tile, geometry.reach
    a, b = target.shape[1] // t, target.shape[2] // t
    patch = t + 2 * reach
    patches = band.unfold(1, patch, t).unfold(2, patch, t)  # C x a x b x patch x patch (a view)
    patches = patches.permute(1, 2, 0, 3, 4).reshape(a, b, channels, patch * patch)
    tiles = target.reshape(channels, a, t, b, t).permute(1, 3, 2, 4, 0).reshape(a, b, t * t, channels)
    window = torch.matmul(tiles, patches).gather(-1, geometry.in_tile.expand(a, b, -1, -1))  # a x b x t*t x K
    return window.reshape(a, b, t, t, -1).transpose(1, 2).reshape(a * t, b * t, -1)


def predict_windowed(
    context_features: torch.Tensor,
    context_labels: torch.Tensor,
    target_features: torch.Tensor,
    cfg: PropagationConfig,
    geometry: WindowGeometry,
) -> torch.Tensor:
    """Same result as `predict_dense`, computing affinities only inside the window.

    Targets go in chunks of whole tile rows (about cfg.chunk_size locations) and context frames
    one at a time, so memory is O(chunk_size * (t + 2R)^2 * C / t^2), not O(n * N^2). Each
    context frame yields its own top-k; for "overall" the top-k of the union of those is the
    exact top-k. Frames without a window (radius 0, or the first frame unless
    window_first_frame) and the before-mask softmax normaliser use the whole frame.
    Shapes as `predict_dense`; `geometry` from `window_geometry` for this grid.
    """
    n, _, h, w = context_features.shape
    num = h * w
    if (geometry.h, geometry.w) != (h, w):
        raise ValueError(f"geometry: built for a {geometry.h}x{geometry.w} grid, features are {h}x{w}")
    labels = _flat_labels(context_labels)  # (n*N) x L
    first_windowed = _first_windowed_frame(cfg, n)
    t, reach = geometry.tile, geometry.reach
    padded_w = math.ceil(w / t) * t
    rows_per_chunk = t * max(1, cfg.chunk_size // (t * w))

    prediction = labels.new_empty(num, labels.shape[1])  # N x L
    for y0 in range(0, h, rows_per_chunk):
        y1 = min(y0 + rows_per_chunk, h)
        chunk = slice(y0 * w, y1 * w)
        query = target_features[:, y0:y1].flatten(1)  # C x B
        tiled_rows = math.ceil((y1 - y0) / t) * t
        target = F.pad(target_features[:, y0:y1], (0, padded_w - w, 0, tiled_rows - (y1 - y0)))  # C x a*t x b*t
        top_values, top_labels = [], []  # per context frame: B x k logits and label rows
        for f, frame in enumerate(context_features):
            if f < first_windowed:
                logits = query.T @ frame.flatten(1) / cfg.temperature  # B x N
                if cfg.aggregation == "per-frame":
                    logits = logits.log_softmax(dim=-1)
                values, index = logits.topk(min(cfg.topk, num), dim=-1)
            else:
                band = _context_band(frame, y0, tiled_rows, reach, padded_w)
                window = _window_affinity(band, target, geometry)[: y1 - y0, :w]  # rows x w x K
                logits = window.reshape(query.shape[1], -1).div_(cfg.temperature)  # B x K
                logits.masked_fill_(~geometry.valid[chunk], float("-inf"))
                if cfg.aggregation == "per-frame" and cfg.per_frame_norm == "before-mask":
                    logits -= torch.logsumexp(query.T @ frame.flatten(1) / cfg.temperature, dim=-1, keepdim=True)
                elif cfg.aggregation == "per-frame":
                    logits = logits.log_softmax(dim=-1)
                values, index = logits.topk(min(cfg.topk, logits.shape[1]), dim=-1)
                index = geometry.neighbour[chunk].gather(1, index)
            top_values.append(values)
            top_labels.append(index + f * num)

        if cfg.aggregation == "overall":
            values, pick = torch.cat(top_values, dim=1).topk(min(cfg.topk, sum(v.shape[1] for v in top_values)), dim=-1)
            label_index = torch.cat(top_labels, dim=1).gather(1, pick)
            prediction[chunk] = _soft_copy(values.softmax(dim=-1), label_index, labels)
        else:
            prediction[chunk] = sum(_soft_copy(v.exp(), i, labels) for v, i in zip(top_values, top_labels)) / n
    return prediction.T.reshape(-1, h, w)


# ---------------------------------------------------------------- a whole video


def _check(features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig) -> None:
    if features.dim() != 4 or not features.dtype.is_floating_point:
        raise ValueError(f"features: expected a float T x C x h x w tensor, got {features.dtype} of shape {tuple(features.shape)}")
    if first_labels.dim() != 3 or not first_labels.dtype.is_floating_point:
        raise ValueError(f"first_labels: expected a float L x h x w tensor, got {first_labels.dtype} of shape {tuple(first_labels.shape)}")
    if first_labels.shape[1:] != features.shape[2:]:
        raise ValueError(f"first_labels: grid {tuple(first_labels.shape[1:])} differs from the features' grid {tuple(features.shape[2:])}")
    if first_labels.device != features.device:
        raise ValueError(f"first_labels on {first_labels.device} but features on {features.device}")
    if features.shape[0] < 1:
        raise ValueError("features: expected at least one frame")
    check_choice("propagation.aggregation", cfg.aggregation, AGGREGATIONS)
    check_choice("propagation.per_frame_norm", cfg.per_frame_norm, PER_FRAME_NORMS)
    check_choice("propagation.window", cfg.window, WINDOWS)
    if not cfg.temperature > 0:
        raise ValueError(f"propagation.temperature: expected a positive number, got {cfg.temperature!r}")
    if not cfg.radius >= 0:
        raise ValueError(f"propagation.radius: expected a non-negative number of cells (0: no window), got {cfg.radius!r}")
    for name, value, low in [("topk", cfg.topk, 1), ("context", cfg.context, 0), ("chunk_size", cfg.chunk_size, 1)]:
        if value < low:
            raise ValueError(f"propagation.{name}: expected an integer >= {low}, got {value!r}")


def _propagate_video(features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig, predict) -> torch.Tensor:
    """The recurrence shared by both implementations; `predict` maps one frame's context to labels."""
    if cfg.normalize:
        features = F.normalize(features, dim=1)
    first_labels = first_labels.to(features.dtype)
    num_frames, num_labels = features.shape[0], first_labels.shape[0]
    predicted = features.new_empty((num_frames, num_labels, *features.shape[2:]))  # T x L x h x w
    predicted[0] = first_labels
    carried = predicted if cfg.soft_labels else predicted.clone()  # what later frames copy from
    for t in range(1, num_frames):
        context = [0, *range(max(1, t - cfg.context), t)]  # the first frame is never duplicated
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
    features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig, tile: int = 12
) -> torch.Tensor:
    """Same as `propagate_dense`, with affinities only inside the window and memory bounded by
    cfg.chunk_size; `tile` (cells) trades wasted window work ((t + 2R)^2 per target instead of
    (2R + 1)^2) against matmul efficiency."""
    _check(features, first_labels, cfg)
    geometry = window_geometry(features.shape[2], features.shape[3], cfg, tile, features.device)
    return _propagate_video(features, first_labels, cfg, lambda c, y, g: predict_windowed(c, y, g, cfg, geometry))


IMPLEMENTATIONS = {"dense": propagate_dense, "windowed": propagate_windowed}


def propagate(
    features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig, implementation: str = "windowed"
) -> torch.Tensor:
    """Soft labels T x L x h x w for every frame (frame 0 = first_labels) from features T x C x h x w."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {tuple(IMPLEMENTATIONS)}, got {implementation!r}")
    return IMPLEMENTATIONS[implementation](features, first_labels, cfg)
