"""The dense reference: each target frame's whole N x (n*N) affinity materialised, then the rule
(stt.propagation.rule). For small inputs and as the oracle the other implementations are tested against.

Shapes: T frames, C channels, h x w grid (N = h*w), L labels, n context frames.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from stt.propagation.rule import (
    check_inputs,
    context_indices,
    first_windowed_frame,
    flat_labels,
    overall_copy,
    per_frame_copy,
    propagate_frames,
    window_mask,
)

if TYPE_CHECKING:
    from stt.config import PropagationConfig


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
    labels = flat_labels(context_labels)  # (n*N) x L
    affinity = torch.einsum("fci,cj->jfi", context_features.flatten(2), target_features.flatten(1))  # N x n x N
    logits = affinity.div_(cfg.temperature)  # in place: this is by far the largest tensor
    first_windowed = first_windowed_frame(cfg, n)
    outside = ~window_mask(h, w, cfg.radius, cfg.window, logits.device)[:, None, :]  # N x 1 x N

    if cfg.aggregation == "overall":
        logits[:, first_windowed:].masked_fill_(outside, float("-inf"))
        return overall_copy(logits.reshape(num, n * num), None, labels, cfg.topk).T.reshape(-1, h, w)

    if cfg.per_frame_norm == "before-mask":
        log_prob = logits.log_softmax(dim=-1)
        log_prob[:, first_windowed:].masked_fill_(outside, float("-inf"))
    else:
        logits[:, first_windowed:].masked_fill_(outside, float("-inf"))
        log_prob = logits.log_softmax(dim=-1)
    values, index = log_prob.transpose(0, 1).topk(min(cfg.topk, num), dim=-1)  # n x N x k
    index = index + torch.arange(n, device=index.device)[:, None, None] * num
    return per_frame_copy(values, index, labels, n).T.reshape(-1, h, w)


def propagate_video(
    features: torch.Tensor,
    first_labels: torch.Tensor,
    cfg: PropagationConfig,
    predict,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """The recurrence of the dense and windowed implementations over features T x C x h x w (L2-normalised
    iff cfg.normalize) and first_labels L x h x w -> T x L x h x w; `predict` maps one frame's context
    (features, labels) and target features to its labels, as `predict_dense`, in `memory_format`."""
    check_inputs(features, first_labels, cfg)
    if cfg.normalize:
        features = F.normalize(features, dim=1)
    features = features.contiguous(memory_format=memory_format)  # after the norms: their sums follow the layout

    def frame(t: int, carried: torch.Tensor) -> torch.Tensor:
        context = context_indices(t, cfg.context, cfg.repeat_first_frame)
        return predict(features[context], carried[context], features[t])

    return propagate_frames(first_labels.to(features.dtype), features.shape[0], frame, cfg.soft_labels, label_dim=0)


def propagate_dense(features: torch.Tensor, first_labels: torch.Tensor, cfg: PropagationConfig) -> torch.Tensor:
    """Propagate first_labels (L x h x w) through features (T x C x h x w) -> T x L x h x w,
    materialising each frame's full affinity (for small inputs and tests)."""
    return propagate_video(features, first_labels, cfg, lambda c, y, g: predict_dense(c, y, g, cfg))
