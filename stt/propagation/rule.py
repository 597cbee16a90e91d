"""The propagation rule of paper 004 (Algorithm 1), once: which context a target copies from, which of its
cells are allowed, which are selected (top-k) and how they are weighted and averaged, and how predictions
are carried to later frames. Every implementation (dense, windowed, the top-K graph, the per-frame store)
computes its logits its own way and calls these functions for the rest.

    overall    one affinity over all context locations; top-k; softmax(top-k / T); soft copy.
    per-frame  per context frame: softmax(affinity / T) over the frame (before-mask, UVC) or over
               its window only (after-mask, CorrFlow / MAST); top-k; soft copy without
               renormalising; mean over the context frames (Alg. 1 line 36).

"Allowed" is CRW's fixed region: a context location within `cfg.radius` feature cells of the
target (square: Chebyshev distance, circle: Euclidean), the first frame windowed too iff
`cfg.window_first_frame`. Locations outside are excluded (-inf before the top-k), where the
paper's pseudocode multiplies them by 0: with L2-normalised features a masked 0 would outrank
every real negative affinity and copy labels from outside the window.

Shapes: T frames, C channels, h x w grid (N = h*w), L labels, n context frames, B targets, k the top-k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import get_args

import torch
import torch.nn.functional as F

from stt.config import Aggregation, LabelSampling, PerFrameNorm, PropagationConfig, Window

# the choices, declared once on the configuration's fields
AGGREGATIONS = get_args(Aggregation)
PER_FRAME_NORMS = get_args(PerFrameNorm)
WINDOWS = get_args(Window)
LABEL_SAMPLINGS = get_args(LabelSampling)

# The authors' window per task and feature stride, in cells (their `neighbor_range` / 2, configs/test/
# res18_d8.py and res18_d4.py): DAVIS 24 / 70, JHMDB 10 / 24, VIP 32 / 70. `propagation.radius`
# None (the default) means this table; `for_task` resolves it once the task and stride are known.
AUTHORS_RADIUS = {"davis": {8: 12.0, 4: 35.0}, "jhmdb": {8: 5.0, 4: 12.0}, "vip": {8: 16.0, 4: 35.0}}


def default_radius(task: str, stride: int) -> float:
    """The authors' propagation radius in feature cells for `task` at feature `stride` (AUTHORS_RADIUS).

    Strides between or beyond the table's keep the pixel radius of the nearest listed stride.
    """
    if task not in AUTHORS_RADIUS:
        raise ValueError(f"task: expected one of {tuple(AUTHORS_RADIUS)}, got {task!r}")
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


# ---------------------------------------------------------------- the context and the window


def queue_start(t: int, context: int, repeat_first: bool) -> int:
    """The first frame of target t's queue of previous frames (frames queue_start .. t-1)."""
    return max(0 if repeat_first else 1, t - context)


def context_indices(t: int, context: int, repeat_first: bool = False) -> list[int]:
    """The frames target t copies from: the first frame, then the `context` frames before t.

    repeat_first=False: [0, max(1, t - n) .. t-1], the first frame once. repeat_first=True, the
    authors' queue (`key_start = max(0, t - n)` after the first frame): [0, max(0, t - n) .. t-1],
    so for t <= n the first frame appears twice and its cells count double in the top-k.
    """
    if t < 1 or context < 0:
        raise ValueError(f"context_indices: expected t >= 1 and context >= 0, got t={t}, context={context}")
    return [0, *range(queue_start(t, context, repeat_first), t)]


def first_windowed_frame(cfg: PropagationConfig, n: int) -> int:
    """Index of the first of n context frames restricted to the window (n: none is)."""
    if cfg.radius == 0:
        return n
    return 0 if cfg.window_first_frame else 1


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


# ---------------------------------------------------------------- selection


def top_overall(
    logits: torch.Tensor,
    bias: torch.Tensor,
    k: int,
    frames: torch.Tensor | None = None,
    best_cells: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest of each target's n*M biased logits (n x ... x M, bias ... x M): values,
    frames and cells, each ... x k. With `frames` (n' indices into the n) only those frames compete;
    a returned frame is then one of `frames`.

    Each of them lies in one of the k cells with the largest biased maximum over frames (otherwise k
    larger logits would exist), so the full top-k runs over n*k candidates instead of n*M. `best_cells`:
    those maxima and cells (... x min(k, M) each), where the caller has them (the graph lattice: from a
    narrower window's). A pick whose maximum is -inf (fewer than k cells allowed) stays -inf here, whatever
    its cell's bias: merged from a narrower window, such a pick may name a cell that is also picked for real.
    """
    n, num_cells = logits.shape[0], min(k, logits.shape[-1])
    if best_cells is None:
        competing = logits if frames is None else logits[frames]
        best = torch.amax(competing, dim=0, out=torch.empty_like(logits[0])).add_(bias)  # laid out as one frame
        best_cells = best.topk(num_cells, dim=-1)
    best, cell = best_cells  # ... x k'
    candidates = logits.gather(-1, cell.expand(n, *cell.shape))  # n x ... x k'
    if frames is not None:
        candidates = candidates[frames]
    candidates = (candidates + bias.gather(-1, cell)).masked_fill_(best == float("-inf"), float("-inf"))
    values, pick = candidates.movedim(0, -2).flatten(-2).topk(min(k, len(candidates) * num_cells), dim=-1)
    frame = pick // num_cells
    return values, frame if frames is None else frames[frame], cell.gather(-1, pick % num_cells)


def top_per_frame(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest logits of each target in each frame (n x ... x M): values, frames and cells, each ... x n x k."""
    values, cell = logits.topk(min(k, logits.shape[-1]), dim=-1)  # n x ... x k
    frame = torch.arange(logits.shape[0], device=logits.device).view(-1, *[1] * (cell.dim() - 1)).expand_as(cell)
    return values.movedim(0, -2), frame.movedim(0, -2), cell.movedim(0, -2)


# ---------------------------------------------------------------- aggregation: weights and the soft copy


def flat_labels(context_labels: torch.Tensor) -> torch.Tensor:
    """n x L x h x w -> (n*N) x L: row f*N + i is frame f's label vector at location i."""
    return context_labels.flatten(2).transpose(1, 2).reshape(-1, context_labels.shape[1])


def soft_copy(
    weights: torch.Tensor, label_index: torch.Tensor, labels: torch.Tensor, targets_first: bool = False
) -> torch.Tensor:
    """sum_k weights * labels[label_index]: (..., B, k) weights and indices into P x L -> B x L
    (targets_first: B x n x k, summed over n and k, the per-frame store's layout).

    The einsum's equation fixes the order of the sums, so each layout keeps its own: the same labels to
    the last bit as before the implementations shared this function."""
    # Labels follow the weights' dtype: half-precision features give fp32 window scores but fp16 labels.
    equation = "bnk,bnkl->bl" if targets_first else "...bk,...bkl->bl"
    return torch.einsum(equation, weights, labels[label_index].to(weights.dtype))


def overall_weights(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The overall rule's selection and weights: per target the top-k of its allowed logits (B x m, -inf
    where not allowed), softmaxed over those k. Returns weights and their columns in `logits`, B x k'."""
    values, pick = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return values.softmax(dim=-1), pick


def overall_copy(logits: torch.Tensor, label_index: torch.Tensor | None, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Soft labels B x L by the overall rule: `overall_weights` of logits B x m, the label rows of its
    columns (label_index B x m into labels P x L; None: the columns are the rows) copied with them."""
    weights, pick = overall_weights(logits, k)
    return soft_copy(weights, pick if label_index is None else label_index.gather(-1, pick), labels)


def per_frame_copy(
    log_probs: torch.Tensor, label_index: torch.Tensor, labels: torch.Tensor, frames: int, targets_first: bool = False
) -> torch.Tensor:
    """Soft labels B x L by the per-frame rule: each selected cell weighted by its probability within its
    frame, exp(log_probs) (no renormalisation over the top-k), and the soft copies averaged over the
    `frames` context frames. log_probs, label_index: (..., B, m), each frame's top-k log-probabilities
    (targets_first: B x n x k, as `soft_copy`)."""
    return soft_copy(log_probs.exp(), label_index, labels, targets_first) / frames


# ---------------------------------------------------------------- a whole video


def check_inputs(features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig) -> None:
    """ValueError naming what is wrong with propagation's inputs: features T x C x h x w and first_labels
    L x h x w, float, on one grid and device; cfg.radius resolved. (cfg's values are validated on load.)"""
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
    if cfg.radius is None:
        raise ValueError(
            "propagation.radius: None stands for the task's default; resolve it with "
            "stt.propagation.for_task(cfg, task, stride) before propagating"
        )


def propagate_frames(
    first: torch.Tensor,
    num_frames: int,
    predict: Callable[[int, torch.Tensor], torch.Tensor],
    soft_labels: bool,
    label_dim: int,
) -> torch.Tensor:
    """The recurrence every implementation shares: frame 0's labels `first` (labels along `label_dim`),
    then `predict(t, carried)` for t = 1 .. num_frames - 1, where `carried` (num_frames x first's shape)
    holds what later frames copy from: the predictions themselves (soft_labels), or their one-hot argmax.
    Returns the predictions, num_frames x first's shape."""
    predicted = first.new_empty((num_frames, *first.shape))
    predicted[0] = first
    carried = predicted if soft_labels else predicted.clone()
    for t in range(1, num_frames):
        predicted[t] = predict(t, carried)
        if not soft_labels:
            carried[t] = F.one_hot(predicted[t].argmax(dim=label_dim), first.shape[label_dim]).movedim(-1, label_dim)
    return predicted
