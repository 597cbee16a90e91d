"""Label propagation: Algorithm 1 of paper 004 (Sec. 2), with every factor of Sec. 4.3 a setting.

Given the features of every frame of a video and the first frame's labels on the feature grid,
each later frame t gets soft labels copied from its context: the first frame (ground truth) and
the `cfg.context` previous frames (their predictions), as in the CRW / DINO / STT queue. Per
target location the labels of the top-k most similar allowed context locations are averaged,
weighted by softmaxed affinities: the rule, once, in `rule` (overall and per-frame aggregation,
the window, the context, the recurrence).

Two implementations give the same numbers: `dense` builds the whole N x (n*N) affinity of each
frame (the reference); `windowed` computes affinities only near the window (`kernels`: the D x D
square of offsets around each target, D = 2R + 1, R = floor(radius), or the band of whole grid rows
the chunk's windows reach where that square is wider than the grid), in chunks of target rows, so
memory stays bounded at full DAVIS resolution. `labels`: the first mask onto the grid and soft labels
back to masks. Two candidate sources serve the sweep's trials by filter and gather: `graph` (the exact
top-K affinity graph, overall aggregation) and `per_frame` (per-frame aggregation); import them from
their modules.

Shapes: T frames, C channels, h x w feature grid (N = h*w), L labels (background included), n context
frames, B target locations in a chunk (r rows of the grid).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from stt.propagation.dense import predict_dense, propagate_dense
from stt.propagation.kernels import (
    CHUNK_LOGITS,
    SHIFT_MAX_CHANNELS,
    WindowKernel,
    choose_window_kernel,
    window_bias,
    window_logits_by_band,
    window_logits_by_shift,
    window_logits_by_tile,
)
from stt.propagation.labels import (
    downsample_labels,
    labels_to_mask,
    minmax_normalise,
    nearest_source_index,
    soft_labels_to_mask,
    upsample_labels,
)
from stt.propagation.rule import (
    AGGREGATIONS,
    AUTHORS_RADIUS,
    LABEL_SAMPLINGS,
    PER_FRAME_NORMS,
    WINDOWS,
    context_indices,
    default_radius,
    for_task,
    inside_window,
    window_mask,
)
from stt.propagation.windowed import predict_windowed, propagate_windowed

if TYPE_CHECKING:
    from stt.config import PropagationConfig

IMPLEMENTATIONS = {"dense": propagate_dense, "windowed": propagate_windowed}


def propagate(
    features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig, implementation: str = "windowed"
) -> torch.Tensor:
    """Soft labels T x L x h x w for every frame (frame 0 = first_labels) from features T x C x h x w."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {tuple(IMPLEMENTATIONS)}, got {implementation!r}")
    return IMPLEMENTATIONS[implementation](features, first_labels, cfg)


__all__ = [
    "AGGREGATIONS",
    "AUTHORS_RADIUS",
    "CHUNK_LOGITS",
    "IMPLEMENTATIONS",
    "LABEL_SAMPLINGS",
    "PER_FRAME_NORMS",
    "SHIFT_MAX_CHANNELS",
    "WINDOWS",
    "WindowKernel",
    "choose_window_kernel",
    "context_indices",
    "default_radius",
    "downsample_labels",
    "for_task",
    "inside_window",
    "labels_to_mask",
    "minmax_normalise",
    "nearest_source_index",
    "predict_dense",
    "predict_windowed",
    "propagate",
    "propagate_dense",
    "propagate_windowed",
    "soft_labels_to_mask",
    "upsample_labels",
    "window_bias",
    "window_logits_by_band",
    "window_logits_by_shift",
    "window_logits_by_tile",
    "window_mask",
]
