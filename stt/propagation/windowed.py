"""The windowed implementation: the same numbers as the dense reference (stt.propagation.dense), computing
affinities only near each target's window (stt.propagation.kernels), in chunks of target rows, so memory
stays bounded at full DAVIS resolution. Shapes as stt.propagation.dense; B target locations in a chunk.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from stt.propagation.dense import propagate_video
from stt.propagation.kernels import SHIFT_MAX_CHANNELS, WindowKernel, choose_window_kernel, chunk_targets
from stt.propagation.rule import (
    first_windowed_frame,
    flat_labels,
    overall_copy,
    per_frame_copy,
    top_overall,
    top_per_frame,
)

if TYPE_CHECKING:
    from stt.config import PropagationConfig


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
    labels = flat_labels(context_labels)  # (n*N) x L
    first_windowed = first_windowed_frame(cfg, n)
    windowed = context_features[first_windowed:]
    query = target_features / cfg.temperature  # logits are query . context
    plan = choose_window_kernel((h, w), max(1, len(windowed)), channels, cfg.radius, cfg.chunk_size, tile, kernel)
    buffer = plan.buffer(len(windowed), query)

    prediction = labels.new_empty(num, labels.shape[1])  # N x L
    for y0 in range(0, h, plan.rows_per_chunk):
        y1 = min(y0 + plan.rows_per_chunk, h)
        targets = query[:, y0:y1].flatten(1)  # C x B
        values, label_rows = whole_frame_candidates(context_features[:first_windowed], targets, cfg)
        if windowed.shape[0]:
            top, rows = window_candidates(windowed, query, targets, y0, y1, plan, buffer, cfg)
            values.append(top)
            label_rows.append((rows[0] + first_windowed) * num + rows[1])
        values, label_rows = torch.cat(values, dim=1), torch.cat(label_rows, dim=1)

        chunk = slice(y0 * w, y1 * w)
        if cfg.aggregation == "overall":
            prediction[chunk] = overall_copy(values, label_rows, labels, cfg.topk)
        else:
            prediction[chunk] = per_frame_copy(values, label_rows, labels, n)
    return prediction.T.reshape(-1, h, w)


def whole_frame_candidates(
    context: torch.Tensor, targets: torch.Tensor, cfg: PropagationConfig
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each unwindowed context frame's (context: n' x C x h x w, the first n' of the context) top-k for a
    chunk's targets (C x B, divided by T): per frame, B x k' logits (overall) or log-probabilities within
    the frame (per-frame), and their label rows f*N + i."""
    num = context.shape[-2] * context.shape[-1]
    values, label_rows = [], []
    for f in range(context.shape[0]):
        logits = targets.T @ context[f].flatten(1)  # B x N
        top, index = logits.topk(min(cfg.topk, num), dim=-1)
        if cfg.aggregation == "per-frame":
            top = top - logits.logsumexp(dim=-1, keepdim=True)
        values.append(top)
        label_rows.append(index + f * num)
    return values, label_rows


def window_candidates(
    windowed: torch.Tensor,
    query: torch.Tensor,
    targets: torch.Tensor,
    y0: int,
    y1: int,
    plan: WindowKernel,
    buffer: torch.Tensor,
    cfg: PropagationConfig,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The windowed frames' (n' x C x h x w) candidates for target rows y0 <= y < y1 (targets: their
    query, C x B): B x m logits (overall: the top-k over all n' frames) or log-probabilities (per-frame:
    each frame's top-k, normalised over the frame or the window), and their (frame among the n', cell)."""
    num_targets, (h, w) = targets.shape[1], windowed.shape[-2:]
    logits, bias, locations, scored = plan.logits(windowed, query, y0, y1, cfg.radius, cfg.window, buffer)
    whole_frames = None  # the before-mask normaliser, B x n': from the band when it holds whole frames
    if cfg.aggregation == "per-frame" and cfg.per_frame_norm == "before-mask":
        if plan.name == "band" and logits.shape[-1] == h * w:
            whole_frames = logits.logsumexp(dim=-1).T
        else:
            whole_frames = torch.stack([(targets.T @ c.flatten(1)).logsumexp(dim=-1) for c in windowed], 1)
    if cfg.aggregation == "overall":
        top, frame, cell = top_overall(logits, bias, cfg.topk)  # each (target dims) x k
    else:
        top, frame, cell = top_per_frame(logits.add_(bias), cfg.topk)  # each (target dims) x n' x k
        if cfg.per_frame_norm == "after-mask":
            top = top - logits.logsumexp(dim=-1).movedim(0, -1)[..., None]
        top, frame, cell = top.flatten(-2), frame.flatten(-2), cell.flatten(-2)
    rows = y1 - y0
    top, frame = chunk_targets(top, scored, rows, w), chunk_targets(frame, scored, rows, w)
    cell = chunk_targets(locations.gather(-1, cell), scored, rows, w)
    if whole_frames is not None:
        top = (top.view(num_targets, len(windowed), -1) - whole_frames[..., None]).flatten(1)
    return top, (frame, cell)


def propagate_windowed(
    features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig, tile: int = 8, kernel: str = "auto"
) -> torch.Tensor:
    """Same as `propagate_dense`, with affinities only inside the window and memory bounded by
    cfg.chunk_size; `tile` (cells, many channels only) trades wasted window work ((t + 2R)^2 per
    target instead of (2R + 1)^2) against matmul efficiency; `kernel` as `predict_windowed`."""
    predict = lambda c, y, g: predict_windowed(c, y, g, cfg, tile, kernel)  # noqa: E731
    # Channels innermost where the tile kernel may run: it lays out its bands of context rows as whole channel
    # vectors. The shift kernel (few channels) keeps its frames as they were measured.
    layout = torch.channels_last if features.shape[1] > SHIFT_MAX_CHANNELS else torch.contiguous_format
    return propagate_video(features, first_labels, cfg, predict, memory_format=layout)
