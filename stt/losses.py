"""The temporal-stage objective of paper 001 (Sec. 3.2-3.3): L = L_rec^p + alpha L_lc^e + beta L_gc.

Every detail the paper leaves open follows the authors' code (DESIGN.md, "The method, pinned down")
unless said otherwise below:

Pyramid reconstruction (Eqs. 2-5), at res3 (stride 4, radius 12) and res4 (stride 8, radius 6).
    The local correlation softmax(q.k / sqrt(C)) over the window reconstructs the target frame's
    dropped colour channel from the reference frame's. The reference channel is *point-sampled* at
    the level's grid, pixel (s*i, s*j) for cell (i, j) (`x[..., ::s, ::s]`; "aligned with the
    centre pixel of strided convolutions", MAST's `prep`); the prediction is upsampled bilinearly
    (align_corners=False) to the input size and compared with the full-resolution target as
    smooth_l1(20 * prediction, 20 * target), mean over pixels: the authors scale the inputs of the
    smooth-L1 by `rec_scale`, which moves its quadratic zone to |error| < 1/20 as well as scaling
    it. The levels' losses are summed.

Local correlation distillation (Eq. 7). The res3 correlation (window 2R3+1 = 25 at stride 4) is
    pooled to the res4 grid and window (2R4+1 = 13 at stride 8), detached, and is the target of
    the res4 correlation. Written with absolute positions, as the authors do on dense maps:

        pseudo(i', j') = mean_{a in cell(i')} pool_{b in cell(j')} c3(a, b)

    where cell(i') are the f x f (f = 2) res3 positions inside res4 cell i', "mean" over the query
    cell, and "pool" over the reference cell is a mean too in the authors' code
    (`lc_reference_pooling="mean"`, so a pooled row sums to 1/4) or a sum ("sum": the probability
    that the match falls in cell j'). In window coordinates, with i' + d' = j' and sub-cell offsets
    a, b in {0..f-1}^2, the res3 displacement is d = f d' + b - a, so

        pseudo[d', i'] = 1/f^2 * pool_b sum_a c3[f d' + b - a, f i' + a]      (0 where |d| > R3)

    For f = 2, R3 = 12, R4 = 6: d ranges over [-13, 13]; |d| = 13 lies outside the res3 window
    and counts as 0, and every res3 displacement within it lands inside the 13 x 13 res4 window,
    so nothing is lost. The loss is the authors' masked MSE on dense hw x hw maps,
    sum over kept rows of ||c4(i) - pseudo(i)||^2 / (kept rows * h4 w4): entries outside the window
    are zero on both sides, so it is computed from the windows alone.

Entropy selection (Eq. 6). A per-position score of the res4 correlation row (detached):
    "neglog" sum_j -log p_j (Eq. 6 as printed, the authors' code; largest for peaked rows),
    "shannon" -sum_j p_j log p_j (largest for flat rows, what the text describes), or "none".
    threshold_mode "keep_fraction" keeps the top round(T * h w) positions of each sample (at
    least one); the authors threshold at the T-quantile of each *row of the feature map* (with an
    indexing slip that mixes rows and columns); per-sample is the intent. "absolute" keeps
    score > T. The score is of the very distribution being distilled (q.k / sqrt(C), out-of-frame
    keys masked). A raw sum over in-frame keys grows with their number n, so at 32 x 32 with
    radius 6 (61 % of positions with cut-off windows) keep_fraction kept every full window and
    about half of the border ones whatever the features (`temporal.entropy_window="in-frame"`,
    kept for old runs). The default ("normalised") scores each row against the uniform row over its
    own n keys (KL(u || p) for neglog, H / log n for shannon; entropy_score). The authors' form,
    which `entropy_window="padded"` reproduces, scores a separate mmcv Correlation: a fixed
    (2r+1)^2 window with out-of-frame keys as logit 0 and unscaled q.k. It is unbiased only for
    zero-mean features: on non-negative (post-ReLU) smoothed random features it keeps ~96 % of
    border rows and ~43 % of full windows, because there a 0 logit is an unusually low one.

Global correlation distillation (Eqs. 8-9) at res5: student softmax(q.k / sqrt(C)) against the
    frozen teacher's softmax(q.k / tau), tau = 0.07, on unnormalised features like the authors'
    (`norm=False`), MSE averaged over B x hw x hw.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from stt.config import EntropyScore, EntropyWindow, PyramidLevel, ReferencePooling, TemporalConfig, ThresholdMode
from stt.correlation import aggregate_local, global_correlation, local_correlation, local_softmax

# The choices are stt.config's (checked once, when a configuration is loaded); the functions below still name an
# argument outside them, as they may be called with one directly.
PYRAMID_LEVELS = get_args(PyramidLevel)  # fine to coarse: res3 is distilled into res4
ENTROPY_SCORES = get_args(EntropyScore)
ENTROPY_WINDOWS = get_args(EntropyWindow)
THRESHOLD_MODES = get_args(ThresholdMode)
REFERENCE_POOLINGS = get_args(ReferencePooling)
TERMS = ("rec_res3", "rec_res4", "lc", "gc", "kept_fraction")


def level_stride(image_size: tuple[int, int], grid_size: tuple[int, int]) -> int:
    """The stride s with grid = ceil(image / s) on both axes; ValueError if there is none."""
    (image_h, image_w), (grid_h, grid_w) = image_size, grid_size
    stride = math.ceil(image_h / grid_h)
    if math.ceil(image_h / stride) != grid_h or math.ceil(image_w / stride) != grid_w:
        raise ValueError(f"a {grid_h} x {grid_w} feature grid is not a strided grid of a {image_h} x {image_w} image")
    return stride


def sample_at_grid(image: Tensor, grid_size: tuple[int, int]) -> Tensor:
    """B x c x H x W -> B x c x h x w, the pixel at (s*i, s*j) for cell (i, j) (MAST's alignment)."""
    stride = level_stride(tuple(image.shape[-2:]), tuple(grid_size))
    return image[..., ::stride, ::stride]


def reconstruction_loss(prediction: Tensor, target: Tensor, scale: float) -> Tensor:
    """smooth_l1(scale * up(prediction), scale * target), mean: prediction B x 1 x h x w, target B x 1 x H x W."""
    upsampled = F.interpolate(prediction, size=target.shape[-2:], mode="bilinear", align_corners=False)
    return F.smooth_l1_loss(scale * upsampled, scale * target.float())


def downsample_local_correlation(probs: Tensor, radius: int, factor: int, reference_pooling: str = "mean") -> Tensor:
    """Pool a fine local correlation to a grid `factor` times coarser (module doc, correlation down-sampling).

    probs: B x (2R+1)^2 x H x W (rows are window distributions), H and W multiples of `factor`.
    Returns B x (2 radius + 1)^2 x H/factor x W/factor; pseudo[d', i'] = 1/f^2 * pool_b sum_a
    probs[f d' + b - a, f i' + a], pool = mean or sum over the f x f reference sub-cells b.
    """
    if reference_pooling not in REFERENCE_POOLINGS:
        raise ValueError(
            f"temporal.lc_reference_pooling: expected one of {REFERENCE_POOLINGS}, got {reference_pooling!r}"
        )
    batch, window, height, width = probs.shape
    fine_side = math.isqrt(window)
    if fine_side * fine_side != window or fine_side % 2 == 0:
        raise ValueError(f"probs: expected (2R+1)^2 window channels, got {window}")
    if height % factor or width % factor:
        raise ValueError(
            f"probs: a {height} x {width} grid does not pool by {factor} (res3 must be exactly {factor}x res4)"
        )
    fine_radius, coarse_side = fine_side // 2, 2 * radius + 1
    # Zero-pad the fine window so every reachable displacement |d| <= f*radius + f - 1 has a slot.
    pad = max(0, factor * radius + factor - 1 - fine_radius)
    fine = F.pad(probs.view(batch, fine_side, fine_side, height, width), (0, 0, 0, 0, pad, pad, pad, pad))
    first = fine_radius + pad - factor * radius  # padded index of d = -f * radius
    span = factor * (coarse_side - 1) + 1
    pooled = None
    for a_y in range(factor):
        for a_x in range(factor):
            for b_y in range(factor):
                for b_x in range(factor):
                    start_y, start_x = first + b_y - a_y, first + b_x - a_x
                    part = fine[
                        :,
                        start_y : start_y + span : factor,
                        start_x : start_x + span : factor,
                        a_y::factor,
                        a_x::factor,
                    ]
                    pooled = part if pooled is None else pooled + part
    divisor = factor**2 if reference_pooling == "sum" else factor**4
    return (pooled / divisor).reshape(batch, coarse_side * coarse_side, height // factor, width // factor)


def entropy_score(logits: Tensor, kind: str, window: str = "normalised", logit_scale: float = 1.0) -> Tensor:
    """Per-position score of a local correlation: logits B x (2r+1)^2 x h x w (-inf outside) -> B x h x w.

    kind "neglog" (sum_j -log p_j, Eq. 6 as printed) or "shannon" (-sum_j p_j log p_j); `window`
    says which keys the row is over and how a border row (n < (2r+1)^2 in-frame keys) compares:
      "normalised": in-frame keys, scored against the uniform row over those n keys, so the score
          does not grow with n: neglog -> mean_j(-log p_j) - log n = KL(u || p) (0 when flat, large
          when peaked), shannon -> H / log n (1 when flat, 0 when one-hot; 1 when n = 1).
      "padded": the authors' fixed (2r+1)^2 window, out-of-frame keys as logit 0 (their zero-padded
          mmcv Correlation); logits are multiplied by `logit_scale` first (sqrt(C) undoes q.k /
          sqrt(C), as their correlation is unscaled).
      "in-frame": the raw sums over in-frame keys only (stt before issue 17); the number of terms
          dominates them, so with keep_fraction it degenerates into a border mask.
    """
    if window not in ENTROPY_WINDOWS:
        raise ValueError(f"temporal.entropy_window: expected one of {ENTROPY_WINDOWS}, got {window!r}")
    valid = torch.isfinite(logits)
    logits = logits.float()
    if window == "padded":
        logits = torch.where(valid, logits * logit_scale, 0.0)
        valid = torch.ones_like(valid)
    log_p = torch.log_softmax(logits, dim=1)
    if kind == "neglog":
        terms = -log_p
    elif kind == "shannon":
        terms = -log_p.exp() * log_p
    else:
        raise ValueError(f"entropy score: expected 'neglog' or 'shannon', got {kind!r}")
    score = torch.where(valid, terms, 0.0).sum(1)
    if window != "normalised":
        return score
    count = valid.sum(1).to(score.dtype)
    if kind == "neglog":
        return score / count - count.log()
    return torch.where(count > 1, score / count.log().clamp_min(1e-12), 1.0)


def select_positions(score: Tensor, mode: str, threshold: float) -> Tensor:
    """B x h x w scores -> B x h x w bool mask of the positions to distil.

    "keep_fraction": the round(threshold * h w) highest-scoring positions of each sample (>= 1);
    "absolute": score > threshold.
    """
    if mode == "absolute":
        return score > threshold
    if mode != "keep_fraction":
        raise ValueError(f"temporal.threshold_mode: expected one of {THRESHOLD_MODES}, got {mode!r}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"temporal.entropy_threshold: a keep fraction must be in (0, 1], got {threshold!r}")
    flat = score.flatten(1)
    keep_count = max(1, round(threshold * flat.shape[1]))
    top = flat.topk(keep_count, dim=1).indices
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, top, True)
    return keep.view_as(score)


def local_distillation_loss(student: Tensor, pseudo_label: Tensor, keep: Tensor) -> Tensor:
    """Eq. 7 with the authors' normalisation: student, pseudo_label B x S x h x w, keep B x h x w bool.

    sum over kept positions of the squared error over the window, / (kept positions * h w), i.e. the
    mean over the dense (kept rows) x (all h w reference positions) matrix. 0 if nothing is kept.
    """
    squared_error = (student - pseudo_label).pow(2).sum(1)  # B x h x w
    keep = keep.to(squared_error.dtype)
    reference_positions = student.shape[-2] * student.shape[-1]
    return (squared_error * keep).sum() / (keep.sum().clamp_min(1.0) * reference_positions)


def global_distillation_loss(
    student_t: Tensor, student_r: Tensor, teacher_t: Tensor, teacher_r: Tensor, teacher_temperature: float
) -> Tensor:
    """Eq. 9: MSE between softmax(q.k/sqrt(C)) of the student and softmax(q.k/tau) of the teacher (detached).

    All four B x C x h x w on one h x w grid (channel counts may differ between student and teacher).
    """
    if student_t.shape[-2:] != teacher_t.shape[-2:] or student_t.shape[0] != teacher_t.shape[0]:
        raise ValueError(
            f"res5: student {tuple(student_t.shape)} and teacher {tuple(teacher_t.shape)} must share batch and grid "
            "(build the teacher with stt.models.build_teacher)"
        )
    student = global_correlation(student_t, student_r, temperature=math.sqrt(student_t.shape[1]))
    with torch.no_grad():
        teacher = global_correlation(teacher_t.detach(), teacher_r.detach(), temperature=teacher_temperature)
    return F.mse_loss(student, teacher)


def student_levels(cfg: TemporalConfig) -> tuple[str, ...]:
    """The student pyramid levels the temporal terms read: each reconstructed level, both when local
    distillation runs (res3 is distilled into res4), and res5 for global distillation."""
    levels = [level for level in PYRAMID_LEVELS if level in cfg.rec_levels or cfg.alpha > 0]
    return (*levels, "res5") if cfg.beta > 0 else tuple(levels)


def _feature(features: dict[str, Tensor], level: str, name: str) -> Tensor:
    if level not in features:
        raise KeyError(
            f"{name}: no '{level}' features (got {sorted(features)}); run the encoder with layers including {level!r}"
        )
    return features[level]


def temporal_terms(
    student_t: dict[str, Tensor],
    student_r: dict[str, Tensor],
    target_channel: Tensor,
    reference_channel: Tensor,
    cfg: TemporalConfig,
    teacher_t: dict[str, Tensor] | None = None,
    teacher_r: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """All temporal terms for one batch of (target, reference) frame pairs.

    student_t, student_r: encoder pyramids of the target and reference frame, {level: B x C x h x w}
        (res3 and res4 as needed by `cfg`, res5 if beta > 0).
    target_channel, reference_channel: B x 1 x H x W, the dropped colour channel of the unmodified
        normalised Lab frames (stt.color.take_channel).
    teacher_t, teacher_r: the frozen teacher's pyramids ({"res5": ...}), required if cfg.beta > 0.
    Returns float32 scalars: "loss" = rec_res3 + rec_res4 + alpha lc + beta gc (the one to
    backpropagate), each term unweighted and detached for logging, and "kept_fraction" (share of
    res4 positions distilled). Disabled terms are 0.
    """
    if target_channel.dim() != 4 or target_channel.shape[1] != 1 or target_channel.shape != reference_channel.shape:
        raise ValueError(
            f"target_channel and reference_channel: expected two B x 1 x H x W tensors, "
            f"got {tuple(target_channel.shape)} and {tuple(reference_channel.shape)}"
        )
    radius = {"res3": cfg.radius_res3, "res4": cfg.radius_res4}
    needed = [level for level in student_levels(cfg) if level != "res5"]
    logits = {
        level: local_correlation(
            _feature(student_t, level, "student_t"), _feature(student_r, level, "student_r"), radius[level]
        )
        for level in needed
    }
    probs = {level: local_softmax(level_logits) for level, level_logits in logits.items()}

    zero = target_channel.new_zeros((), dtype=torch.float32)
    terms = dict.fromkeys(TERMS, zero)
    for level in cfg.rec_levels:
        reference = sample_at_grid(reference_channel.float(), probs[level].shape[-2:])
        terms[f"rec_{level}"] = reconstruction_loss(
            aggregate_local(probs[level], reference), target_channel, cfg.rec_scale
        )

    if cfg.alpha > 0:
        fine_h, coarse_h = probs["res3"].shape[-2], probs["res4"].shape[-2]
        with torch.no_grad():
            pseudo_label = downsample_local_correlation(
                probs["res3"].detach(), cfg.radius_res4, max(1, fine_h // coarse_h), cfg.lc_reference_pooling
            )
            if cfg.entropy == "none":
                keep = torch.ones_like(probs["res4"][:, 0], dtype=torch.bool)
            else:
                channels = _feature(student_t, "res4", "student_t").shape[1]
                score = entropy_score(logits["res4"].detach(), cfg.entropy, cfg.entropy_window, math.sqrt(channels))
                keep = select_positions(score, cfg.threshold_mode, cfg.entropy_threshold)
        if pseudo_label.shape != probs["res4"].shape:
            raise ValueError(
                f"local distillation: res3 correlation pools to {tuple(pseudo_label.shape)}, res4's is "
                f"{tuple(probs['res4'].shape)} (needs res3 at exactly 2x or 1x the res4 grid)"
            )
        terms["lc"] = local_distillation_loss(probs["res4"], pseudo_label, keep)
        terms["kept_fraction"] = keep.float().mean()

    if cfg.beta > 0:
        if teacher_t is None or teacher_r is None:
            raise ValueError(
                "temporal.beta > 0 needs the teacher's features (teacher_t, teacher_r); set beta=0 to train without"
            )
        terms["gc"] = global_distillation_loss(
            _feature(student_t, "res5", "student_t"),
            _feature(student_r, "res5", "student_r"),
            _feature(teacher_t, "res5", "teacher_t"),
            _feature(teacher_r, "res5", "teacher_r"),
            cfg.teacher_temperature,
        )

    loss = terms["rec_res3"] + terms["rec_res4"] + cfg.alpha * terms["lc"] + cfg.beta * terms["gc"]
    return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}
