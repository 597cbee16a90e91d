"""Label propagation (paper 004, Algorithm 1): hand-computed weights, window semantics, and the
windowed implementation agreeing with the dense reference across every factor."""

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stt.config import PRESETS, PropagationConfig, load_config
from stt.propagation import (
    CHUNK_LOGITS,
    SHIFT_MAX_CHANNELS,
    choose_window_kernel,
    context_indices,
    downsample_labels,
    inside_window,
    labels_to_mask,
    minmax_normalise,
    nearest_source_index,
    predict_windowed,
    propagate,
    propagate_dense,
    propagate_windowed,
    soft_labels_to_mask,
    upsample_labels,
    window_bias,
    window_mask,
)

BOTH = [propagate_dense, propagate_windowed]


pytestmark = pytest.mark.usefixtures("one_thread")


def one_hot_video(features: torch.Tensor) -> torch.Tensor:
    """First-frame labels that name each location: label i is one-hot at flat location i."""
    h, w = features.shape[2:]
    return torch.eye(h * w).reshape(h * w, h, w)


def plain(**overrides) -> PropagationConfig:
    """Raw dot products, temperature 1, no window: the numbers below are exp() of the features' products."""
    return replace(PropagationConfig(normalize=False, temperature=1.0, radius=0.0, context=1), **overrides)


# ---------------------------------------------------------------- hand-computed weights


# Context frame (2x2 grid, flat order) and target features; label i marks context location i, so
# the prediction at target j is the weight each context location gets.
CONTEXT_2X2 = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]
TARGET_2X2 = [[1.0, 0.5], [0.2, 1.0], [-1.0, 0.1], [0.3, -2.0]]


def two_by_two_video() -> torch.Tensor:
    """T x C x h x w = 2 x 2 x 2 x 2: frame 0 the context, frame 1 the target."""
    return torch.tensor([CONTEXT_2X2, TARGET_2X2]).permute(0, 2, 1).reshape(2, 2, 2, 2)


@pytest.mark.parametrize("propagate_fn", BOTH)
def test_overall_top2_weights_by_hand(propagate_fn):
    video = two_by_two_video()
    out = propagate_fn(video, one_hot_video(video), plain(aggregation="overall", topk=2))[1].reshape(4, 4)
    # target 0: affinities (1, 0.5, -1, -0.5); top-2 = locations 0, 1; softmax over those two
    assert torch.allclose(out[:, 0], torch.tensor([1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5)), 0, 0]))
    # target 3: affinities (0.3, -2, -0.3, 2); top-2 = locations 3, 0
    assert torch.allclose(out[:, 3], torch.tensor([1 / (1 + math.exp(1.7)), 0, 0, 1 / (1 + math.exp(-1.7))]))


@pytest.mark.parametrize("propagate_fn", BOTH)
def test_per_frame_top2_weights_by_hand(propagate_fn):
    video = two_by_two_video()
    out = propagate_fn(video, one_hot_video(video), plain(aggregation="per-frame", topk=2))[1].reshape(4, 4)
    # softmax over the whole frame, then the top-2 probabilities kept as they are (no renormalising)
    total = math.exp(1) + math.exp(0.5) + math.exp(-1) + math.exp(-0.5)
    assert torch.allclose(out[:, 0], torch.tensor([math.exp(1) / total, math.exp(0.5) / total, 0, 0]))
    total = math.exp(0.3) + math.exp(-2) + math.exp(-0.3) + math.exp(2)
    assert torch.allclose(out[:, 3], torch.tensor([math.exp(0.3) / total, 0, 0, math.exp(2) / total]))


def one_by_three_video() -> torch.Tensor:
    """1x3 grid. For target 0 the context affinities are (1, 0.5, 1.5): the best match, location 2,
    lies 2 cells away, outside a radius-1 window."""
    context = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # location x C
    target = torch.tensor([[1.0, 0.5], [0.0, 0.0], [0.0, 0.0]])
    return torch.stack([context, target]).permute(0, 2, 1).reshape(2, 2, 1, 3)


@pytest.mark.parametrize("propagate_fn", BOTH)
def test_window_changes_the_weights_as_each_normalisation_says(propagate_fn):
    video = one_by_three_video()
    labels = one_hot_video(video)
    e1, e05, e15 = math.exp(1), math.exp(0.5), math.exp(1.5)

    def weights(**cfg):
        return propagate_fn(video, labels, plain(topk=2, **cfg))[1, :, 0, 0]

    # no window: the top-2 are locations 2 and 0
    assert torch.allclose(weights(aggregation="overall"), torch.tensor([e1, 0, e15]) / (e1 + e15))
    # window: location 2 never contributes, even though its affinity is the highest
    assert torch.allclose(weights(aggregation="overall", radius=1.0), torch.tensor([e1, e05, 0]) / (e1 + e05))
    # per-frame before-mask: the softmax still counts location 2 in its normaliser (UVC)
    before = weights(aggregation="per-frame", per_frame_norm="before-mask", radius=1.0)
    assert torch.allclose(before, torch.tensor([e1, e05, 0]) / (e1 + e05 + e15))
    # per-frame after-mask: the softmax runs over the window only (CorrFlow / MAST)
    after = weights(aggregation="per-frame", per_frame_norm="after-mask", radius=1.0)
    assert torch.allclose(after, torch.tensor([e1, e05, 0]) / (e1 + e05))


@pytest.mark.parametrize("propagate_fn", BOTH)
def test_masked_zero_never_outranks_negative_affinities(propagate_fn):
    """With normalised features every in-window affinity can be negative; multiplying the masked
    ones by 0 (the paper's M * A) would then copy the label from outside the window."""
    context = torch.tensor([[-1.0, 0.0], [-1.0, 0.2], [0.0, 1.0]])  # affinities with target 0: -1, -0.98, 0
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    video = torch.stack([context, target]).permute(0, 2, 1).reshape(2, 2, 1, 3)
    cfg = replace(PropagationConfig(), context=1, radius=1.0, topk=1)
    out = propagate_fn(video, one_hot_video(video), cfg)
    assert torch.allclose(out[1, :, 0, 0], torch.tensor([0.0, 1.0, 0.0]))


# ---------------------------------------------------------------- the window


def test_window_shapes_by_hand():
    square = window_mask(5, 5, 1.5, "square")[12].reshape(5, 5)  # around the centre (2, 2)
    circle = window_mask(5, 5, 1.5, "circle")[12].reshape(5, 5)
    assert square.sum() == 9 and square[1:4, 1:4].all()  # Chebyshev distance <= 1
    assert circle.sum() == 9  # dy^2 + dx^2 <= 2.25: the 3x3 block, corners at 2
    assert window_mask(5, 5, 2.0, "circle")[12].sum() == 13  # the corners (dy^2 + dx^2 = 8) stay out
    assert window_mask(5, 5, 2.0, "square")[0].reshape(5, 5)[:3, :3].all()  # clipped at the border
    span = torch.arange(-3, 4)
    assert inside_window(span[:, None], span[None, :], 3.5, "circle").sum() == 37  # 7 + 2*7 + 2*5 + 2*3 cells


def test_window_bias_by_hand():
    """3 x 4 grid, radius 1: a context cell off the grid or outside the window gets -inf."""
    offsets = torch.arange(-1, 2)
    dy, dx = offsets[:, None], offsets[None, :]  # 3 x 3 cells around each target

    def allowed(y, x, window):
        bias = window_bias(torch.tensor(y), torch.tensor(x), y + dy, x + dx, (3, 4), 1.0, window)
        assert bias.shape == (3, 3) and ((bias == 0) | (bias == float("-inf"))).all()
        return (bias == 0).tolist()

    # target (1, 0): no column to its left; the circle also drops the four corners
    assert allowed(1, 0, "square") == [[False, True, True], [False, True, True], [False, True, True]]
    assert allowed(1, 0, "circle") == [[False, True, False], [False, True, True], [False, True, False]]
    # target (2, 3), bottom right: no row below, no column to the right
    assert allowed(2, 3, "square") == [[True, True, False], [True, True, False], [False, False, False]]
    # a padding target beside the grid (x = 5 > w - 1) may still see on-grid cells, never its own column
    assert allowed(1, 4, "square") == [[True, False, False], [True, False, False], [True, False, False]]


# ---------------------------------------------------------------- recurrence and sanity


@pytest.mark.parametrize("propagate_fn", BOTH)
def test_frame_zero_is_the_given_labels(propagate_fn):
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(3, 8, 5, 6, generator=generator)
    labels = torch.softmax(torch.randn(3, 5, 6, generator=generator), dim=0)
    out = propagate_fn(features, labels, replace(PropagationConfig(), radius=2.0))
    assert out.shape == (3, 3, 5, 6)
    assert torch.equal(out[0], labels)


@pytest.mark.parametrize("aggregation", ["overall", "per-frame"])
@pytest.mark.parametrize("implementation", ["dense", "windowed"])
def test_still_video_keeps_the_first_mask(aggregation, implementation):
    generator = torch.Generator().manual_seed(2)
    still = torch.randn(1, 16, 7, 8, generator=generator).expand(5, -1, -1, -1)
    mask = torch.randint(0, 3, (7, 8), generator=generator)
    labels = F.one_hot(mask, 3).permute(2, 0, 1).float()
    cfg = replace(PropagationConfig(), aggregation=aggregation, radius=12.0)  # DAVIS defaults
    out = propagate(still, labels, cfg, implementation)
    assert torch.equal(labels_to_mask(out), mask.expand(5, -1, -1))
    if aggregation == "overall":  # top-1 copies each location's own label exactly
        exact = propagate(still, labels, replace(cfg, topk=1), implementation)
        assert torch.allclose(exact, labels.expand(5, -1, -1, -1))


def test_context_is_the_first_frame_plus_the_previous_ones():
    """Frame 3 matches frame 1's location 0 best, which frame 1 predicted as label 1; frame 0
    offers only a weaker match with label 0. With context 1 (frames 0 and 2) frame 1 is out of
    reach, with context 2 it is in."""
    per_location = [  # frame -> C x location, raw dot products, top-1, no window
        [[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]],  # frame 0: label 0 at location 0, label 1 at location 1
        [[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]],  # frame 1: location 0 matches frame 0's location 1 -> label 1
        [[0.1, 0.1], [0.0, 0.0], [0.0, 0.0]],  # frame 2: label 0 everywhere
        [[0.5, 0.5], [0.0, 0.0], [1.0, 1.0]],  # frame 3: affinity 1 with frame 1's location 0, 0.5 with frame 0's
    ]
    features = torch.tensor(per_location).reshape(4, 3, 1, 2)
    labels = torch.eye(2).reshape(2, 1, 2)
    for fn in BOTH:
        assert labels_to_mask(fn(features, labels, plain(topk=1, context=1))[3]).tolist() == [[0, 0]]
        assert labels_to_mask(fn(features, labels, plain(topk=1, context=2))[3]).tolist() == [[1, 1]]


# ---------------------------------------------------------------- windowed == dense


WINDOWS = [(0.0, "square", True)] + list(itertools.product([2.0, 3.5], ["square", "circle"], [True, False]))
NORMALISATIONS = [("overall", "before-mask"), ("per-frame", "before-mask"), ("per-frame", "after-mask")]


# Both ways of computing the window logits: shifted multiply-adds (few channels) and tile matmuls.
CHANNELS = [SHIFT_MAX_CHANNELS, SHIFT_MAX_CHANNELS + 1]


@pytest.mark.parametrize("kernel", ["square", "band"])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("aggregation,per_frame_norm", NORMALISATIONS)
@pytest.mark.parametrize("radius,window,window_first_frame", WINDOWS)
def test_windowed_equals_dense(aggregation, per_frame_norm, radius, window, window_first_frame, channels, kernel):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(6, channels, 9, 11, generator=generator)
    labels = torch.softmax(3 * torch.randn(4, 9, 11, generator=generator), dim=0)
    base = replace(
        PropagationConfig(),
        aggregation=aggregation,
        per_frame_norm=per_frame_norm,
        radius=radius,
        window=window,
        window_first_frame=window_first_frame,
        chunk_size=30,  # several chunks, the last one ragged
    )
    # Every (soft_labels, normalize) pair, each under a different (topk, context): the full
    # product would take four times as long and these two factors do not touch the window.
    label_modes = itertools.cycle(itertools.product([True, False], [True, False]))
    for (topk, context), (soft_labels, normalize) in zip(itertools.product([1, 5, 60], [1, 3]), label_modes):
        cfg = replace(base, topk=topk, context=context, soft_labels=soft_labels, normalize=normalize)
        cfg = replace(cfg, temperature=0.07 if normalize else 1.0)
        dense = propagate_dense(features, labels, cfg)
        windowed = propagate_windowed(features, labels, cfg, tile=4, kernel=kernel)  # 9 x 11: not a multiple of 4
        assert torch.allclose(windowed, dense, atol=1e-5), cfg


@pytest.mark.parametrize("kernel", ["square", "band"])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("tile,chunk_size", [(1, 1), (3, 50), (8, 4096)])
def test_windowed_tiles_and_chunks_do_not_change_the_result(tile, chunk_size, channels, kernel):
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(4, channels, 10, 7, generator=generator)
    labels = torch.softmax(torch.randn(3, 10, 7, generator=generator), dim=0)
    for aggregation, per_frame_norm in NORMALISATIONS:
        cfg = replace(
            PropagationConfig(),
            radius=3.0,
            topk=7,
            chunk_size=chunk_size,
            aggregation=aggregation,
            per_frame_norm=per_frame_norm,
        )
        windowed = propagate_windowed(features, labels, cfg, tile=tile, kernel=kernel)
        assert torch.allclose(windowed, propagate_dense(features, labels, cfg), atol=1e-5), cfg


@pytest.mark.parametrize("window", ["square", "circle"])
def test_tile_kernel_scores_each_window_cell_once_whatever_the_layout(window):
    """The tile kernel's contract (stt.propagation.kernels): per target, the cells with a finite bias are exactly
    its window's cells on the grid, each once; each logit is the target's dot product with that cell (against
    an einsum); frames in channels-last memory (how propagate_windowed passes them) give the same bits."""
    from stt.propagation.kernels import chunk_targets, window_logits_by_tile

    generator = torch.Generator().manual_seed(4)
    context, query = torch.randn(3, 16, 11, 13, generator=generator), torch.randn(16, 11, 13, generator=generator)
    radius, tile, (h, w) = 2.5, 4, (11, 13)
    for y0, y1 in [(0, 4), (4, 11)]:  # the second chunk is two rows of tiles, the last one past the grid
        logits, bias, locations = window_logits_by_tile(context, query, y0, y1, radius, window, tile)
        scored = (math.ceil((y1 - y0) / tile) * tile, math.ceil(w / tile) * tile)
        logits = torch.stack([chunk_targets(frame, scored, y1 - y0, w) for frame in logits])  # n x B x M
        bias, locations = chunk_targets(bias, scored, y1 - y0, w), chunk_targets(locations, scored, y1 - y0, w)
        allowed = window_mask(h, w, radius, window)[y0 * w : y1 * w]  # B x N
        expected = torch.einsum("cb,fcn->fbn", query[:, y0:y1].flatten(1), context.flatten(2))  # n x B x N
        for target in range(len(bias)):
            cells = locations[target][torch.isfinite(bias[target])]
            assert sorted(cells.tolist()) == allowed[target].nonzero().squeeze(1).tolist()
            got = logits[:, target][:, torch.isfinite(bias[target])]
            torch.testing.assert_close(got, expected[:, target, cells], rtol=1e-5, atol=1e-5)
        channels_last = window_logits_by_tile(
            context.contiguous(memory_format=torch.channels_last), query, y0, y1, radius, window, tile
        )[0]
        assert torch.equal(channels_last, window_logits_by_tile(context, query, y0, y1, radius, window, tile)[0])


def test_the_kernel_scoring_fewer_cells_per_target_is_chosen():
    """By hand: at 16 x 29 cells (DAVIS at short side 128, stride 8), radius 12, 256 channels, 21 frames,
    a band of whole rows is the whole frame, 464 cells per target, against (8 + 24)^2 = 1,024 of a tile's
    square; at 60 x 107 (480p) a band is at least 25 rows, 2,675 cells, and the tile's square wins."""
    small = choose_window_kernel((16, 29), 21, 256, 12.0, 2048, 8)
    assert (small.name, small.cells_per_target) == ("band", 464)
    assert 21 * small.rows_per_chunk * 29 * 464 <= CHUNK_LOGITS
    native = choose_window_kernel((60, 107), 21, 256, 12.0, 2048, 8)
    assert (native.name, native.cells_per_target, native.scored_width) == ("tile", 1024, 112)
    few_channels = choose_window_kernel((60, 107), 21, 3, 12.0, 2048, 8)
    assert (few_channels.name, few_channels.cells_per_target) == ("shift", 625)
    assert choose_window_kernel((60, 107), 21, 256, 12.0, 2048, 8, kernel="band").cells_per_target == 25 * 107
    with pytest.raises(ValueError, match="kernel: expected one of"):
        choose_window_kernel((16, 29), 21, 256, 12.0, 2048, 8, kernel="dense")


@pytest.mark.parametrize("channels", CHANNELS)
def test_overall_top_k_may_take_one_offset_from_several_frames(channels):
    """1 x 3 grid, target location 1, radius 1 (all three locations), three context frames.
    Dot products with the target: frame 0 (0.1, 0.5, 0.4), frame 1 (0.9, 0.2, 0), frame 2 (0.8, 0.3, 0).
    The top-2 are both at location 0 (frames 1 and 2), although frame 0 prefers locations 1 and 2
    and location 1 has the second-best maximum over frames."""
    products = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.2, 0.0], [0.8, 0.3, 0.0]])  # frame x location
    context = torch.zeros(3, channels, 1, 3)
    context[:, 0, 0] = products  # the target is (1, 0, ...) at location 1: channel 0 holds the products
    target = torch.zeros(channels, 1, 3)
    target[0, 0, 1] = 1.0
    labels = (
        torch.eye(9).reshape(9, 3, 3).permute(1, 0, 2).reshape(3, 9, 1, 3)
    )  # label f*3 + i marks frame f's location i
    cfg = replace(PropagationConfig(), normalize=False, temperature=1.0, radius=1.0, topk=2)
    weights = predict_windowed(context, labels, target, cfg)[:, 0, 1]
    expected = torch.zeros(9)
    expected[3], expected[6] = 1 / (1 + math.exp(-0.1)), 1 / (1 + math.exp(0.1))  # softmax of (0.9, 0.8)
    assert torch.allclose(weights, expected)


# ---------------------------------------------------------------- grid <-> image


def test_downsample_averages_areas_by_hand():
    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 1], [2, 2, 2, 2]])
    soft = downsample_labels(mask, 3, (2, 2))
    expected = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [0.0, 0.25]], [[0.0, 0.0], [1.0, 0.75]]])
    assert torch.allclose(soft, expected)


def test_davis_sizes_down_and_back_up():
    mask = torch.zeros(480, 854, dtype=torch.long)
    mask[100:300, 200:500] = 1
    mask[250:480, 600:854] = 2
    soft = downsample_labels(mask, 3, (60, 107))
    assert soft.shape == (3, 60, 107)
    assert torch.allclose(soft.sum(0), torch.ones(60, 107))
    up = upsample_labels(soft.expand(2, -1, -1, -1), (480, 854))
    assert up.shape == (2, 3, 480, 854)
    assert (labels_to_mask(up[0]) == mask).float().mean() > 0.99


# ---------------------------------------------------------------- the authors' evaluator rules


def test_context_indices_by_hand():
    assert context_indices(1, 20) == [0]
    assert context_indices(1, 20, repeat_first=True) == [0, 0]
    assert context_indices(3, 20) == [0, 1, 2]
    assert context_indices(3, 20, repeat_first=True) == [0, 0, 1, 2]
    assert context_indices(3, 2) == [0, 1, 2]
    assert context_indices(3, 2, repeat_first=True) == [0, 1, 2]  # t > n: the queue no longer reaches frame 0
    assert context_indices(25, 20, repeat_first=True) == context_indices(25, 20) == [0, *range(5, 25)]
    assert context_indices(4, 0, repeat_first=True) == [0]


@pytest.mark.parametrize("propagate_fn", BOTH)
def test_repeated_first_frame_counts_twice_in_the_top_k(propagate_fn):
    """Frame 0 (1 x 2 grid) holds labels 0 and 1; the target's affinities are 1 and 0.5. Top-2 over
    the frame once: softmax(1, 0.5). Over the frame twice: the best cell twice, all of label 0."""
    video = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]], [[[1.0, 1.0]], [[0.5, 0.5]]]])  # T x C x 1 x 2
    labels = torch.eye(2).reshape(2, 1, 2)
    cfg = plain(topk=2, context=20)
    once = propagate_fn(video, labels, cfg)[1, :, 0, 0]
    assert torch.allclose(
        once, torch.tensor([math.e / (math.e + math.exp(0.5)), math.exp(0.5) / (math.e + math.exp(0.5))])
    )
    twice = propagate_fn(video, labels, replace(cfg, repeat_first_frame=True))[1, :, 0, 0]
    assert torch.allclose(twice, torch.tensor([1.0, 0.0]))


def test_nearest_downsample_by_hand_and_as_pil():
    from PIL import Image

    mask = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 1], [2, 2, 2, 2]])
    # cell i reads pixel floor((i + 1/2) * 4 / 2) = 1, 3 (area pooling gives 0.25 / 0.75 mixtures here)
    assert labels_to_mask(downsample_labels(mask, 3, (2, 2), mode="nearest")).tolist() == [[0, 1], [2, 2]]
    assert torch.equal(downsample_labels(mask, 3, (2, 2), mode="nearest").sum(0), torch.ones(2, 2))
    # 4 -> 3 cells: floor(0.5 * 4/3) = 0, floor(1.5 * 4/3) = 2, floor(2.5 * 4/3) = 3
    assert nearest_source_index(3, 4).tolist() == [0, 2, 3]
    generator = torch.Generator().manual_seed(0)
    for (height, width), grid in [((480, 854), (60, 107)), ((7, 5), (3, 4)), ((5, 3), (9, 7))]:
        ids = torch.randint(0, 5, (height, width), generator=generator)
        pil = Image.fromarray(ids.numpy().astype("uint8")).resize(grid[::-1], Image.NEAREST)
        ours = labels_to_mask(downsample_labels(ids, 5, grid, mode="nearest"))
        assert torch.equal(ours, torch.from_numpy(np.array(pil)).long())
    with pytest.raises(ValueError, match="propagation.label_sampling"):
        downsample_labels(mask, 3, (2, 2), mode="bicubic")


def test_minmax_normalise_by_hand():
    labels = torch.tensor([[[0.9, 0.6], [0.7, 0.8]], [[0.1, 0.4], [0.3, 0.2]], [[0.0, 0.0], [0.0, 0.0]]])  # L x 2 x 2
    out = minmax_normalise(labels[None])[0]
    expected = [[[1.0, 0.0], [1 / 3, 2 / 3]], [[0.0, 1.0], [2 / 3, 1 / 3]], [[0.0, 0.0], [0.0, 0.0]]]  # all-zero stays
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6)
    negative = torch.tensor([[[-1.0, -2.0]]])  # max <= 0: unchanged
    assert torch.equal(minmax_normalise(negative), negative)
    # Without the rule the background wins both cells; with it the object wins where it peaks.
    assert soft_labels_to_mask(labels[None, :2], (2, 2)).tolist() == [[[0, 0], [0, 0]]]
    assert soft_labels_to_mask(labels[None, :2], (2, 2), minmax=True).tolist() == [[[0, 1], [1, 0]]]


def test_authors_preset_and_config_file_agree():
    from pathlib import Path

    shipped = load_config(Path(__file__).resolve().parents[1] / "configs" / "authors.yaml")
    preset = load_config(None, list(PRESETS["authors"]))
    assert shipped == preset
    assert (
        preset.propagation.repeat_first_frame,
        preset.propagation.label_sampling,
        preset.propagation.minmax_normalise,
    ) == (True, "nearest", True)
    defaults = PropagationConfig()  # stt's own protocol stays the default (DESIGN.md says why)
    assert (defaults.repeat_first_frame, defaults.label_sampling, defaults.minmax_normalise) == (False, "area", False)


def authors_vanilla_tracker(features, first_mask, out_size, precede_frames, neighbor_range, topk=10, temperature=0.07):
    """A straight port of the authors' VanillaTracker.forward_test for one object map (their
    vanilla_tracker.py, spatial_neighbor and masked_attention_efficient, test_cfg_davis): dense
    masked affinities, PIL nearest labels, min-max before the argmax. features T x C x h x w;
    first_mask H x W uint8 ids. Returns T x H x W ids (frame 0: the input)."""
    from PIL import Image

    clip_len, channels, h, w = features.shape
    resized = torch.from_numpy(np.array(Image.fromarray(first_mask).resize((w, h), Image.NEAREST))).long()
    seg_bank = [F.one_hot(resized).permute(2, 0, 1).float()[None]]  # 1 x L x h x w
    mask = torch.zeros(h, w, h, w)  # spatial_neighbor(mode="square"): [key cell, query cell]
    for i in range(h):
        for j in range(w):
            top, left = max(0, i - neighbor_range // 2), max(0, j - neighbor_range // 2)
            mask[top : min(h, i + neighbor_range // 2 + 1), left : min(w, j + neighbor_range // 2 + 1), i, j] = 1
    mask = mask.view(h * w, h * w).bool()
    preds = [torch.from_numpy(first_mask).long()]
    for frame_idx in range(1, clip_len):
        key_start = max(0, frame_idx - precede_frames)
        query = F.normalize(features[frame_idx], dim=0).flatten(1)  # C x hw
        keys = torch.cat([features[0:1], features[key_start:frame_idx]])  # with_first
        values = torch.cat([seg_bank[0], *seg_bank[key_start:frame_idx]])  # n x L x h x w
        keys = F.normalize(keys, dim=1).permute(1, 0, 2, 3).flatten(1)  # C x n*hw
        values = values.permute(1, 0, 2, 3).flatten(1)  # L x n*hw
        affinity = torch.einsum("ci,cj->ij", keys, query) / temperature  # n*hw x hw
        affinity.masked_fill_(~mask.repeat(len(keys[0]) // (h * w), 1), float("-inf"))  # with_first_neighbor
        top_affinity, top_index = affinity.topk(k=topk, dim=0)
        weights = top_affinity.softmax(dim=0)  # topk x hw
        seg_logit = (values[:, top_index] * weights[None]).sum(1).view(1, -1, h, w)
        seg_bank.append(seg_logit)
        seg_pred = F.interpolate(seg_logit, size=out_size, mode="bilinear", align_corners=False)
        low = seg_pred.view(*seg_pred.shape[:2], -1).min(dim=-1)[0].view(*seg_pred.shape[:2], 1, 1)
        high = seg_pred.view(*seg_pred.shape[:2], -1).max(dim=-1)[0].view(*seg_pred.shape[:2], 1, 1)
        seg_pred = torch.where(high > 0, (seg_pred - low) / (high - low + 1e-12), seg_pred)
        preds.append(seg_pred.argmax(dim=1)[0])
    return torch.stack(preds)


def test_authors_preset_equals_a_port_of_their_propagation_on_real_davis(davis_real_root):
    """stt's windowed propagation under --preset authors against the port above, on 8 real frames of
    DAVIS horsejump-high (Lab features at stride 8 of frames at short side 120: a 15 x 27 grid),
    with a 3-frame queue so both the repeated first frame (t <= 3) and the plain queue are used."""
    import numpy as np

    from stt.config import EvalConfig, ModelConfig
    from stt.data.layouts import DAVIS
    from stt.evaluate import propagate_video
    from stt.features import FeatureExtractor

    dataset = DAVIS(davis_real_root, split="val")
    sequence = "horsejump-high"
    frames = dataset.read_frames(sequence)[:8]
    gt = dataset.read_masks(sequence)[:8]
    features = FeatureExtractor("lab:8", ModelConfig(), EvalConfig(max_short_side=120))(frames)
    assert features.shape[-2:] == (15, 27)
    cfg = load_config(None, [*PRESETS["authors"], "propagation.context=3", "propagation.radius=4"])
    first = np.where(gt[0] == 255, 0, gt[0]).astype(np.uint8)
    ours = propagate_video(features, first, int(first.max()) + 1, gt.shape[1:], cfg, "windowed")
    theirs = authors_vanilla_tracker(features, first, gt.shape[1:], precede_frames=3, neighbor_range=8).numpy()
    assert (theirs[1:] > 0).mean() > 0.01  # the object is tracked, not lost
    assert np.array_equal(ours, theirs)
    # ... and stt's own protocol differs from it on the same frames
    own = propagate_video(
        features,
        first,
        int(first.max()) + 1,
        gt.shape[1:],
        load_config(None, ["propagation.context=3", "propagation.radius=4"]),
        "windowed",
    )
    assert not np.array_equal(own, theirs)


# ---------------------------------------------------------------- bad input


def test_bad_input_is_named():
    """Bad settings are named where the configuration is loaded (stt.config.validate, once); bad tensors, an
    unresolved radius and an unknown implementation where propagation is called."""
    features, labels = torch.randn(2, 4, 3, 3), torch.ones(1, 3, 3)
    with pytest.raises(ValueError, match="propagation.aggregation"):
        load_config(None, ["propagation.aggregation=mean"])
    with pytest.raises(ValueError, match="propagation.window"):
        load_config(None, ["propagation.window=hexagon"])
    with pytest.raises(ValueError, match="propagation.radius"):
        load_config(None, ["propagation.radius=-1"])
    with pytest.raises(ValueError, match="propagation.radius: None"):
        propagate(features, labels, PropagationConfig())
    with pytest.raises(ValueError, match="first_labels: grid"):
        propagate(features, torch.ones(1, 3, 4), PropagationConfig())
    with pytest.raises(ValueError, match="implementation"):
        propagate(features, labels, PropagationConfig(), implementation="sparse")
    with pytest.raises(ValueError, match=r"label ids must lie in \[0, 2\)"):
        downsample_labels(torch.tensor([[0, 2]]), 2, (1, 1))


def test_windowed_propagation_runs_in_half_precision():
    """fp16 features and labels (a GPU's half-precision evaluation): window scores come out fp32, labels
    fp16; the soft copy used to fail on the mixed dtypes (found by bench/gpu_suite.py)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(5, 16, 12, 14, generator=generator)
    labels = torch.zeros(3, 12, 14)
    labels[0] = 1
    labels[1, 3:7, 4:9], labels[0, 3:7, 4:9] = 1, 0
    cfg = PropagationConfig(radius=4.0, context=3)
    full = propagate(features, labels, cfg, "windowed")
    half = propagate(features.half(), labels.half(), cfg, "windowed")
    assert half.dtype == torch.float16
    assert torch.equal(full.argmax(1), half.float().argmax(1))


def test_labels_to_mask_is_argmax_with_its_tie_and_nan_rules():
    """labels_to_mask uses max's indices for speed: the same ids as argmax, the first of tied labels and
    the first NaN winning, over several leading dims and label counts."""
    assert labels_to_mask(torch.tensor([[[0.5]], [[0.5]], [[0.2]]])).tolist() == [[0]]  # a tie: the first
    assert labels_to_mask(torch.tensor([[[0.9]], [[float("nan")]], [[float("nan")]]])).tolist() == [[1]]
    generator = torch.Generator().manual_seed(0)
    for shape in [(3, 2, 5, 7), (2, 4, 6, 9), (6, 11, 13)]:
        labels = torch.rand(shape, generator=generator).mul(4).round()  # few distinct values: many ties
        labels.flatten()[::17] = float("nan")
        assert torch.equal(labels_to_mask(labels), labels.argmax(dim=-3))
