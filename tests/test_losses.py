"""Temporal-stage maths (stt.color, stt.correlation, stt.losses) against slow, literal re-implementations.

The references loop over every position and displacement of tiny grids and follow paper 001's
equations (and the authors' dense-map formulation) term by term; the library code is vectorised.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import skimage.color
import torch
import torch.nn.functional as F
from torch import nn

from stt.color import drop_color_channel, normalize_lab, rgb_to_lab, take_channel
from stt.config import Config, TemporalConfig, validate
from stt.correlation import aggregate_local, global_correlation, local_correlation, local_softmax
from stt.losses import (
    downsample_local_correlation,
    entropy_score,
    select_positions,
    temporal_terms,
)

pytestmark = pytest.mark.usefixtures("one_thread")


# Tiny pyramid: a 32 x 32 input, res3 8 x 8 (stride 4), res4 4 x 4 (stride 8), res5 2 x 2.
SMALL = TemporalConfig(radius_res3=2, radius_res4=1)


def window_index(dy: int, dx: int, radius: int) -> int:
    return (dy + radius) * (2 * radius + 1) + (dx + radius)


def slow_local_probs(q: torch.Tensor, k: torch.Tensor, radius: int) -> list[dict]:
    """Eq. 2 literally: per sample, {(y, x): {(yy, xx): c(i, j)}} over in-frame keys of the window."""
    batch, channels, height, width = q.shape
    out = []
    for b in range(batch):
        rows = {}
        for y in range(height):
            for x in range(width):
                logits = {}
                for yy in range(max(0, y - radius), min(height, y + radius + 1)):
                    for xx in range(max(0, x - radius), min(width, x + radius + 1)):
                        logits[(yy, xx)] = float(q[b, :, y, x] @ k[b, :, yy, xx]) / math.sqrt(channels)
                top = max(logits.values())
                total = sum(math.exp(v - top) for v in logits.values())
                rows[(y, x)] = {j: math.exp(v - top) / total for j, v in logits.items()}
        out.append(rows)
    return out


def dense(rows: dict, height: int, width: int) -> torch.Tensor:
    """{(y, x): {(yy, xx): p}} -> hw x hw matrix (row-major positions), zero off the window."""
    matrix = torch.zeros(height * width, height * width, dtype=torch.float64)
    for (y, x), row in rows.items():
        for (yy, xx), p in row.items():
            matrix[y * width + x, yy * width + xx] = p
    return matrix


def slow_smooth_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    z = (a - b).abs().flatten().tolist()
    return sum(0.5 * v * v if v < 1.0 else v - 0.5 for v in z) / len(z)


def slow_global(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    batch, _, height, width = q.shape
    n = height * width
    out = torch.zeros(batch, n, n, dtype=torch.float64)
    for b in range(batch):
        for i in range(n):
            logits = [
                float(q[b, :, i // width, i % width] @ k[b, :, j // width, j % width]) / temperature for j in range(n)
            ]
            top = max(logits)
            total = sum(math.exp(v - top) for v in logits)
            for j in range(n):
                out[b, i, j] = math.exp(logits[j] - top) / total
    return out


def slow_temporal_losses(student_t, student_r, target, reference, teacher_t, teacher_r, cfg) -> dict[str, float]:
    """Eqs. 2-9 with the authors' conventions: dense maps, pooled pseudo-labels, masked MSE."""
    image_h, image_w = target.shape[-2:]
    probs, terms = {}, {}
    for level, radius in (("res3", cfg.radius_res3), ("res4", cfg.radius_res4)):
        probs[level] = slow_local_probs(student_t[level], student_r[level], radius)
        height, width = student_t[level].shape[-2:]
        stride = image_h // height
        prediction = torch.zeros(target.shape[0], 1, height, width, dtype=torch.float64)
        for b, rows in enumerate(probs[level]):
            for (y, x), row in rows.items():  # Eq. 3 on the point-sampled reference
                prediction[b, 0, y, x] = sum(
                    p * float(reference[b, 0, yy * stride, xx * stride]) for (yy, xx), p in row.items()
                )
        upsampled = F.interpolate(prediction, size=(image_h, image_w), mode="bilinear", align_corners=False)
        terms[f"rec_{level}"] = slow_smooth_l1(cfg.rec_scale * upsampled, cfg.rec_scale * target.double())

    h3, w3 = student_t["res3"].shape[-2:]
    h4, w4 = student_t["res4"].shape[-2:]
    key_divisor = 4.0 if cfg.lc_reference_pooling == "mean" else 1.0
    squared_error_sum, kept_total = 0.0, 0
    for b in range(target.shape[0]):
        fine = dense(probs["res3"][b], h3, w3)
        coarse = dense(probs["res4"][b], h4, w4)
        pseudo = torch.zeros(h4 * w4, h4 * w4, dtype=torch.float64)
        for i in range(h4 * w4):
            for j in range(h4 * w4):
                (yi, xi), (yj, xj) = divmod(i, w4), divmod(j, w4)
                cells = [(2 * yi + ay) * w3 + 2 * xi + ax for ay in (0, 1) for ax in (0, 1)]
                refs = [(2 * yj + by) * w3 + 2 * xj + bx for by in (0, 1) for bx in (0, 1)]
                # mean over the query cell; mean (authors' avg-pool) or sum over the key cell
                pseudo[i, j] = sum(fine[a, r] for a in cells for r in refs) / 4.0 / key_divisor
        scores = []
        for i in range(h4 * w4):  # Eq. 6 as printed, over the in-frame window, against the uniform row
            row = probs["res4"][b][divmod(i, w4)].values()
            scores.append(sum(-math.log(p) for p in row) / len(row) - math.log(len(row)))
        keep_count = round(cfg.entropy_threshold * h4 * w4)
        kept = sorted(range(h4 * w4), key=lambda i: -scores[i])[:keep_count]
        for i in kept:
            squared_error_sum += float(((coarse[i] - pseudo[i]) ** 2).sum())
        kept_total += keep_count
    terms["lc"] = squared_error_sum / (kept_total * h4 * w4)
    terms["kept_fraction"] = kept_total / (target.shape[0] * h4 * w4)

    student = slow_global(student_t["res5"], student_r["res5"], math.sqrt(student_t["res5"].shape[1]))
    teacher = slow_global(teacher_t["res5"], teacher_r["res5"], cfg.teacher_temperature)
    terms["gc"] = float(((student - teacher) ** 2).mean())
    terms["loss"] = terms["rec_res3"] + terms["rec_res4"] + cfg.alpha * terms["lc"] + cfg.beta * terms["gc"]
    return terms


def random_pyramids(batch: int = 2, size: int = 32, seed: int = 0, requires_grad: bool = False):
    generator = torch.Generator().manual_seed(seed)
    shapes = {"res3": (4, size // 4), "res4": (6, size // 8), "res5": (5, size // 16)}

    def pyramid(channel_scale: dict[str, int] | None = None):
        return {
            name: torch.randn(
                batch, channels * (channel_scale or {}).get(name, 1), side, side, generator=generator
            ).requires_grad_(requires_grad)
            for name, (channels, side) in shapes.items()
        }

    student_t, student_r = pyramid(), pyramid()
    teacher_t, teacher_r = pyramid({"res5": 2}), pyramid({"res5": 2})
    target = torch.randn(batch, 1, size, size, generator=generator) * 0.3
    reference = torch.randn(batch, 1, size, size, generator=generator) * 0.3
    return student_t, student_r, teacher_t, teacher_r, target, reference


# ---------------------------------------------------------------- colour


def test_rgb_to_lab_matches_skimage():
    rgb = torch.rand(2, 3, 9, 7, generator=torch.Generator().manual_seed(1))
    rgb[0, :, 0, 0] = 0.0  # black, the linear toe of both non-linearities, white
    rgb[0, :, 0, 1] = torch.tensor([0.01, 0.02, 0.03])
    rgb[0, :, 0, 2] = 1.0
    expected = np.stack([skimage.color.rgb2lab(image.permute(1, 2, 0).double().numpy()) for image in rgb])
    lab = rgb_to_lab(rgb)
    assert lab.dtype == torch.float32 and lab.shape == rgb.shape
    assert np.abs(lab.permute(0, 2, 3, 1).numpy() - expected).max() < 1e-3
    normalised = normalize_lab(lab)
    assert torch.allclose(normalised[:, 0], (lab[:, 0] - 50) / 50) and torch.allclose(normalised[:, 2], lab[:, 2] / 127)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        rgb_to_lab(rgb[:, :2])


def test_drop_color_channel_zeroes_one_of_a_b_in_both_frames():
    lab_t, lab_r = torch.randn(64, 3, 4, 5), torch.randn(64, 3, 4, 5)
    original_t = lab_t.clone()
    input_t, input_r, dropped = drop_color_channel(lab_t, lab_r, torch.Generator().manual_seed(3), scale=1.5)
    assert torch.equal(lab_t, original_t)  # the clean frames stay the reconstruction targets
    assert set(dropped.tolist()) == {1, 2}  # both choices happen, per sample
    for b, channel in enumerate(dropped.tolist()):
        kept = 3 - channel
        for frame, clean in ((input_t, lab_t), (input_r, lab_r)):
            assert torch.all(frame[b, channel] == 0)
            assert torch.allclose(frame[b, kept], 1.5 * clean[b, kept])
            assert torch.allclose(frame[b, 0], 1.5 * clean[b, 0])  # L is rescaled too (authors, MAST)
    assert torch.equal(take_channel(lab_t, dropped)[:, 0], lab_t[torch.arange(64), dropped])
    again = drop_color_channel(lab_t, lab_r, torch.Generator().manual_seed(3))[2]
    assert torch.equal(again, dropped)


# ---------------------------------------------------------------- correlation


def test_local_correlation_matches_dense_reference_with_window_masking():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 6, 5, generator=generator), torch.randn(2, 8, 6, 5, generator=generator)
    radius = 2
    logits = local_correlation(q, k, radius)
    assert logits.shape == (2, 25, 6, 5)
    expected = torch.full_like(logits, float("-inf"))
    for b in range(2):
        for y in range(6):
            for x in range(5):
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        if 0 <= y + dy < 6 and 0 <= x + dx < 5:
                            expected[b, window_index(dy, dx, radius), y, x] = (
                                q[b, :, y, x] @ k[b, :, y + dy, x + dx] / math.sqrt(8)
                            )
    assert torch.equal(torch.isinf(logits), torch.isinf(expected))
    assert torch.allclose(logits, expected, atol=1e-5)

    channels_last = local_correlation(
        q.to(memory_format=torch.channels_last), k.to(memory_format=torch.channels_last), radius
    )
    assert torch.allclose(channels_last, logits, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        probs_bf16 = local_softmax(local_correlation(q, k, radius))
    assert probs_bf16.dtype == torch.float32
    assert (probs_bf16 - local_softmax(logits)).abs().max() < 0.02


def test_local_softmax_and_aggregate_match_equations_2_and_3():
    generator = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 8, 6, 6, generator=generator), torch.randn(2, 8, 6, 6, generator=generator)
    values = torch.randn(2, 3, 6, 6, generator=generator)
    probs = local_softmax(local_correlation(q, k, 2))
    reconstructed = aggregate_local(probs, values)
    for b, rows in enumerate(slow_local_probs(q, k, 2)):
        for (y, x), row in rows.items():
            for (yy, xx), p in row.items():
                assert abs(float(probs[b, window_index(yy - y, xx - x, 2), y, x]) - p) < 1e-5
            expected = sum(p * values[b, :, yy, xx] for (yy, xx), p in row.items())
            assert torch.allclose(reconstructed[b, :, y, x], expected.float(), atol=1e-5)
    assert torch.allclose(probs.sum(1), torch.ones(2, 6, 6))


def test_global_correlation_matches_equation_8():
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 5, 3, 2, generator=generator), torch.randn(2, 5, 3, 2, generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in float32 regardless
        affinity = global_correlation(q, k, 0.07)
    assert affinity.dtype == torch.float32
    assert torch.allclose(affinity.double(), slow_global(q, k, 0.07), atol=1e-5)


# ---------------------------------------------------------------- local correlation distillation


def test_correlation_downsampling_on_a_hand_made_case():
    # Fine 4 x 4 grid, radius 2 (5 x 5 window); coarse 2 x 2 grid, radius 1 (3 x 3 window).
    # The four fine queries of coarse cell (0, 0) each put all their mass on one key:
    #   (0,0) -> (1,1): coarse key (0,0), d' = (0,0);   (0,1) -> (0,2): coarse key (0,1), d' = (0,1)
    #   (1,0) -> (3,2): coarse key (1,1), d' = (1,1);   (1,1) -> (0,0): coarse key (0,0), d' = (0,0)
    fine = torch.zeros(1, 25, 4, 4)
    for (y, x), (dy, dx) in {(0, 0): (1, 1), (0, 1): (0, 1), (1, 0): (2, 2), (1, 1): (-1, -1)}.items():
        fine[0, window_index(dy, dx, 2), y, x] = 1.0
    mean_pooled = downsample_local_correlation(fine, radius=1, factor=2, reference_pooling="mean")
    sum_pooled = downsample_local_correlation(fine, radius=1, factor=2, reference_pooling="sum")
    expected_sum = torch.zeros(1, 9, 2, 2)
    expected_sum[0, window_index(0, 0, 1), 0, 0] = 2 / 4  # two of four fine queries, mean over queries
    expected_sum[0, window_index(0, 1, 1), 0, 0] = 1 / 4
    expected_sum[0, window_index(1, 1, 1), 0, 0] = 1 / 4
    assert torch.equal(sum_pooled, expected_sum)
    assert torch.equal(mean_pooled, expected_sum / 4)  # avg-pool over the 2 x 2 key cell as well


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_correlation_downsampling_equals_pooling_dense_maps(pooling):
    # The authors pool the dense hw x hw res3 correlation 2 x 2 on the query and the key axes.
    generator = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 4, 8, 8, generator=generator)
    fine = local_softmax(local_correlation(q, k, 4))  # radius 4 at the fine level, 2 at the coarse
    coarse = downsample_local_correlation(fine, radius=2, factor=2, reference_pooling=pooling)
    fine_dense = dense(slow_local_probs(q, k, 4)[0], 8, 8)
    key_weight = 1 / 4 if pooling == "mean" else 1.0
    for y in range(4):
        for x in range(4):
            queries = [(2 * y + ay) * 8 + 2 * x + ax for ay in (0, 1) for ax in (0, 1)]
            for yy in range(4):
                for xx in range(4):
                    keys = [(2 * yy + by) * 8 + 2 * xx + bx for by in (0, 1) for bx in (0, 1)]
                    expected = sum(fine_dense[i, j] for i in queries for j in keys) / 4 * key_weight
                    if abs(yy - y) <= 2 and abs(xx - x) <= 2:
                        assert abs(float(coarse[0, window_index(yy - y, xx - x, 2), y, x]) - expected) < 1e-5
                    else:  # the pooled support never leaves the coarse window
                        assert expected < 1e-12


def test_entropy_scores_and_selection_on_hand_made_rows():
    inf = float("inf")
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [0.0, 0.0, -inf, -inf]])
    logits = logits.T.reshape(1, 4, 2, 2)  # positions (0,0) flat, (0,1) mild, (1,0) peaked, (1,1) border
    mild_top, mild_rest = math.e / (math.e + 3), 1 / (math.e + 3)
    neglog = entropy_score(logits, "neglog", "in-frame")
    assert torch.allclose(
        neglog.flatten(),
        torch.tensor(
            [4 * math.log(4), 4 * math.log(math.e + 3) - 1, 4 * math.log(math.exp(10) + 3) - 10, 2 * math.log(2)]
        ),
    )
    shannon = entropy_score(logits, "shannon", "in-frame")
    peaked_top, peaked_rest = math.exp(10) / (math.exp(10) + 3), 1 / (math.exp(10) + 3)
    expected_shannon = [
        math.log(4),
        -(mild_top * math.log(mild_top) + 3 * mild_rest * math.log(mild_rest)),
        -(peaked_top * math.log(peaked_top) + 3 * peaked_rest * math.log(peaked_rest)),
        math.log(2),
    ]
    assert torch.allclose(shannon.flatten(), torch.tensor(expected_shannon), atol=1e-6)

    # Eq. 6 as printed ranks peaked rows highest; Shannon entropy ranks flat rows highest.
    assert select_positions(neglog, "keep_fraction", 0.5).flatten().tolist() == [False, True, True, False]
    assert select_positions(shannon, "keep_fraction", 0.5).flatten().tolist() == [True, True, False, False]
    assert select_positions(neglog, "keep_fraction", 0.75).flatten().tolist() == [True, True, True, False]
    assert select_positions(shannon, "keep_fraction", 0.75).flatten().tolist() == [True, True, False, True]
    assert select_positions(neglog, "absolute", 5.7).flatten().tolist() == [False, True, True, False]


def test_normalised_and_padded_entropy_windows_on_hand_made_rows():
    inf = float("inf")
    logits = torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [2.0, 0.0, -inf, -inf], [1.0, 1.0, -inf, -inf], [3.0, -inf, -inf, -inf]]
    )
    logits = logits.T.reshape(1, 4, 2, 2)
    # normalised neglog: mean(-log p) - log n = KL(uniform || p); 0 for flat rows of any size
    two = [math.e**2 / (math.e**2 + 1), 1 / (math.e**2 + 1)]
    expected = [0.0, -sum(math.log(p) for p in two) / 2 - math.log(2), 0.0, 0.0]
    assert torch.allclose(entropy_score(logits, "neglog").flatten(), torch.tensor(expected), atol=1e-6)
    # normalised shannon: H / log n, 1 for flat rows of any size, 1 by convention for n = 1
    expected = [1.0, -sum(p * math.log(p) for p in two) / math.log(2), 1.0, 1.0]
    assert torch.allclose(entropy_score(logits, "shannon").flatten(), torch.tensor(expected), atol=1e-6)
    # padded (the authors): all 4 keys, out-of-frame ones at logit 0, in-frame logits scaled first
    padded = entropy_score(logits, "neglog", "padded", logit_scale=2.0)
    rows = [[0.0] * 4, [4.0, 0.0, 0.0, 0.0], [2.0, 2.0, 0.0, 0.0], [6.0, 0.0, 0.0, 0.0]]
    expected = [sum(math.log(sum(math.exp(v) for v in row)) - v for v in row) for row in rows]
    assert torch.allclose(padded.flatten(), torch.tensor(expected), atol=1e-5)
    with pytest.raises(ValueError, match="temporal.entropy_window"):
        entropy_score(logits, "neglog", "zero")


def _distance_to_border(height: int, width: int) -> torch.Tensor:
    y, x = torch.arange(height).view(height, 1), torch.arange(width).view(1, width)
    return torch.minimum(torch.minimum(y, height - 1 - y), torch.minimum(x, width - 1 - x))


@pytest.mark.parametrize("kind", ["neglog", "shannon"])
@pytest.mark.parametrize("nonnegative", [False, True])
def test_kept_fraction_does_not_depend_on_distance_to_the_border(kind, nonnegative):
    """Issue 17: features with no border structure must be kept alike near the border and inside.

    Smoothed random features (3 x 3 box, like nearby positions of a real map), the reference a noisy
    copy of the target, 32 x 32 at radius 6 as at training: 61 % of positions have cut-off windows.
    The in-frame sum kept ~10 % (neglog) / ~48 % (shannon) of the outer ring and 100 % / 79 % of
    full windows.
    """
    generator = torch.Generator().manual_seed(0)

    def smooth(x):
        return F.avg_pool2d(x, 3, stride=1) * 3

    target = smooth(torch.randn(8, 64, 34, 34, generator=generator))
    reference = target + 0.5 * smooth(torch.randn(8, 64, 34, 34, generator=generator))
    if nonnegative:
        target, reference = target.relu(), reference.relu()
    logits = local_correlation(target, reference, 6)
    keep = select_positions(entropy_score(logits, kind), "keep_fraction", 0.7)
    distance = _distance_to_border(32, 32)
    outer_ring = keep[:, distance < 2].float().mean()
    full_window = keep[:, distance >= 6].float().mean()
    assert abs(float(outer_ring - full_window)) < 0.15, (float(outer_ring), float(full_window))


def test_keep_fraction_is_per_sample():
    score = torch.randn(3, 10, 10, generator=torch.Generator().manual_seed(5))
    score[1] += 100.0  # one sample far above the others still keeps only its own top 70%
    keep = select_positions(score, "keep_fraction", 0.7)
    assert keep.flatten(1).sum(1).tolist() == [70, 70, 70]
    for b in range(3):
        assert score[b][keep[b]].min() >= score[b][~keep[b]].max()
    with pytest.raises(ValueError, match="entropy_threshold"):
        select_positions(score, "keep_fraction", 1.5)


# ---------------------------------------------------------------- the whole objective


@pytest.mark.parametrize("pooling", ["mean", "sum"])
def test_temporal_losses_match_slow_reference(pooling):
    student_t, student_r, teacher_t, teacher_r, target, reference = random_pyramids()
    cfg = dataclasses.replace(SMALL, lc_reference_pooling=pooling)
    terms = temporal_terms(student_t, student_r, target, reference, cfg, teacher_t, teacher_r)
    expected = slow_temporal_losses(student_t, student_r, target, reference, teacher_t, teacher_r, cfg)
    assert set(terms) == {"loss", "rec_res3", "rec_res4", "lc", "gc", "kept_fraction"}
    for name, value in expected.items():
        assert terms[name].dim() == 0
        assert math.isclose(float(terms[name]), value, rel_tol=1e-4, abs_tol=1e-7), name
    assert terms["lc"] > 0 and terms["gc"] > 0 and terms["kept_fraction"] == pytest.approx(round(0.7 * 16) / 16)


def test_gradients_reach_the_student_only():
    student_t, student_r, teacher_t, teacher_r, target, reference = random_pyramids(requires_grad=True)
    temporal_terms(student_t, student_r, target, reference, SMALL, teacher_t, teacher_r)["loss"].backward()
    for pyramid in (student_t, student_r):
        assert all(feature.grad is not None and feature.grad.abs().sum() > 0 for feature in pyramid.values())
    assert all(feature.grad is None for feature in (*teacher_t.values(), *teacher_r.values()))

    # With only the local distillation term, res3 (the pseudo-label's source) gets no gradient.
    student_t, student_r, _, _, target, reference = random_pyramids(requires_grad=True)
    only_lc = dataclasses.replace(SMALL, rec_levels=(), beta=0.0)
    temporal_terms(student_t, student_r, target, reference, only_lc)["loss"].backward()
    assert student_t["res3"].grad is None and student_r["res3"].grad is None
    assert student_t["res4"].grad.abs().sum() > 0


def test_table1_rows_switch_terms_off():
    student_t, student_r, _, _, target, reference = random_pyramids()
    baseline = dataclasses.replace(SMALL, rec_levels=("res4",), alpha=0.0, entropy="none", beta=0.0)
    terms = temporal_terms({"res4": student_t["res4"]}, {"res4": student_r["res4"]}, target, reference, baseline)
    assert float(terms["rec_res3"]) == float(terms["lc"]) == float(terms["gc"]) == 0.0
    assert float(terms["loss"]) == pytest.approx(float(terms["rec_res4"]))
    no_entropy = dataclasses.replace(SMALL, entropy="none", beta=0.0)
    assert float(temporal_terms(student_t, student_r, target, reference, no_entropy)["kept_fraction"]) == 1.0


def test_bad_inputs_are_named():
    student_t, student_r, teacher_t, teacher_r, target, reference = random_pyramids()
    # the objective's choices are checked once, when the configuration is loaded (stt.config.validate)
    with pytest.raises(ValueError, match="temporal.rec_levels"):
        validate(Config(temporal=dataclasses.replace(SMALL, rec_levels=("res5",))))
    with pytest.raises(ValueError, match="temporal.entropy"):
        validate(Config(temporal=dataclasses.replace(SMALL, entropy="renyi")))
    with pytest.raises(ValueError, match="teacher"):
        temporal_terms(student_t, student_r, target, reference, SMALL)
    with pytest.raises(KeyError, match="res3"):
        temporal_terms({"res4": student_t["res4"]}, student_r, target, reference, dataclasses.replace(SMALL, beta=0.0))
    with pytest.raises(ValueError, match="grid"):
        small_teacher = {"res5": teacher_t["res5"][..., :1, :1]}
        temporal_terms(student_t, student_r, target, reference, SMALL, small_teacher, small_teacher)


class TinyPyramid(nn.Module):
    """A three-conv stand-in for the encoder: res3 at stride 4, res4 at stride 8."""

    def __init__(self):
        super().__init__()
        self.res3 = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1))
        self.res4 = nn.Sequential(nn.ReLU(), nn.Conv2d(16, 16, 3, 2, 1))

    def forward(self, x):
        res3 = self.res3(x)
        return {"res3": res3, "res4": self.res4(res3)}


def test_short_overfit_drives_reconstruction_down():
    torch.manual_seed(0)
    texture = F.interpolate(torch.rand(1, 3, 8, 8), size=(64, 64), mode="bilinear", align_corners=False)
    reference_lab = normalize_lab(rgb_to_lab(texture))
    target_lab = torch.roll(reference_lab, shifts=(8, 8), dims=(2, 3))  # the target is the reference moved
    input_t, input_r, channel = drop_color_channel(target_lab, reference_lab, torch.Generator().manual_seed(0))
    target, reference = take_channel(target_lab, channel), take_channel(reference_lab, channel)
    cfg = dataclasses.replace(TemporalConfig(), radius_res3=4, radius_res4=2, beta=0.0)
    model = TinyPyramid()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(50):
        terms = temporal_terms(model(input_t), model(input_r), target, reference, cfg)
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        history.append(float(terms["rec_res3"] + terms["rec_res4"]))
    # From about 8.0 to about 4.2; perfect matching would still leave 3.5 (upsampling the grid).
    assert history[-1] < 0.6 * history[0], history


# ---------------------------------------------------------------- stt.recipes: configurations that train


def random_pair_batch(batch: int = 2, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (2, batch, 3, size, size), generator=generator, dtype=torch.uint8)
    return {"target": frames[0], "reference": frames[1]}


def train_three_steps(cfg, teacher=None, penalty=None) -> list[float]:
    from stt.models import build_encoder
    from stt.recipes import stage_spec
    from stt.stages import temporal_batch_loss

    torch.manual_seed(0)
    student = build_encoder(cfg.model)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-4)
    before = [p.detach().clone() for p in student.parameters()]
    losses = []
    for step in range(3):
        terms = temporal_batch_loss(
            student,
            teacher,
            random_pair_batch(seed=step),
            stage_spec(cfg, "temporal").temporal,
            torch.Generator().manual_seed(step),
            penalty,
        )
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert all(math.isfinite(value) for value in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters()))
    return losses


@pytest.mark.parametrize(
    "row", ["frame-reconstruction", "pyramid-reconstruction", "local-distillation", "entropy-selection"]
)
def test_each_table1_row_trains(row):
    from stt.config import Config
    from stt.recipes import table1_config

    cfg = Config()
    cfg.temporal = table1_config(row)
    cfg.train.recipe = "temporal"
    train_three_steps(cfg)


@pytest.mark.parametrize(
    "recipe", ["spatial-then-temporal", "spatial-then-temporal-no-gc", "spatial-then-temporal-ewc"]
)
def test_each_temporal_recipe_trains(recipe):
    from stt.config import Config
    from stt.models import build_encoder, build_teacher
    from stt.recipes import RECIPES, stage_spec

    cfg = Config()
    cfg.train.recipe = recipe
    teacher = build_teacher(cfg.model, build_encoder(cfg.model).state_dict())
    teacher_before = {name: value.clone() for name, value in teacher.state_dict().items()}
    penalty = None
    if RECIPES[recipe].ewc_stage == "temporal":
        anchor = torch.zeros(())  # a stand-in for stt.ewc.ewc_penalty: any differentiable scalar
        penalty = lambda: anchor + 1.0  # noqa: E731
    assert stage_spec(cfg, "temporal").teacher == (recipe == "spatial-then-temporal")
    train_three_steps(cfg, teacher, penalty)
    assert all(torch.equal(teacher_before[name], value) for name, value in teacher.state_dict().items())


def test_spatiotemporal_recipe_shares_one_trunk():
    from stt.config import Config
    from stt.recipes import stage_spec
    from stt.spatial import MoCo
    from stt.stages import shared_trunk_student, spatiotemporal_loss

    cfg = Config()
    cfg.train.recipe = "spatiotemporal"
    cfg.spatial.queue_size, cfg.spatial.bn_splits = 8, 2
    torch.manual_seed(0)
    moco = MoCo(cfg.spatial, cfg.model)
    student = shared_trunk_student(moco.encoder, cfg.model)
    assert student.layer1[0].conv1.weight is moco.encoder.layer1[0].conv1.weight
    optimizer = torch.optim.Adam([p for p in moco.parameters() if p.requires_grad], lr=1e-4)
    views = {"view_q": torch.randn(4, 3, 32, 32), "view_k": torch.randn(4, 3, 32, 32)}
    for step in range(3):
        terms = spatiotemporal_loss(
            moco,
            student,
            views,
            random_pair_batch(seed=step),
            stage_spec(cfg, "spatiotemporal").temporal,
            cfg.train.gamma,
        )
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        assert math.isfinite(terms["loss"].item()) and float(terms["gc"]) == 0.0
    temporal = terms["rec_res3"] + terms["rec_res4"] + cfg.temporal.alpha * terms["lc"]
    assert terms["loss"].item() == pytest.approx(float(terms["nce"] + cfg.train.gamma * temporal), rel=1e-5)


def test_unknown_recipe_is_named():
    from stt.config import Config
    from stt.recipes import stage_spec

    cfg = Config()
    cfg.train.recipe = "temporal-only"
    with pytest.raises(ValueError, match="train.recipe"):
        stage_spec(cfg, "temporal")
