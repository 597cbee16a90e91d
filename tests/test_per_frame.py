"""stt/propagation/per_frame.py: per-frame trials served from the per-frame store give what stt.propagation.propagate
gives (windowed and dense), for every combination of the factors a search space varies, on random features and
on a real DAVIS sequence; what it cannot serve is refused with a reason; the store of a Ray Tune space; saved and
memory-mapped back."""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch

from stt.config import PropagationConfig
from stt.propagation import propagate, soft_labels_to_mask
from stt.propagation.per_frame import (
    MAX_BYTES,
    PerFrameSpace,
    build_store,
    fits,
    load_store,
    propagate_per_frame,
    save_store,
    serves,
    store_path,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = PerFrameSpace(
    radii=(0.0, 2.0, 3.5, 6.0),
    temperatures=(0.01, 0.07, 0.2),
    k=6,
    context=4,
    window="square",
    normalize=True,
    after_mask=True,
)
PER_FRAME = replace(PropagationConfig(), aggregation="per-frame")


def settings(space: PerFrameSpace = SPACE):
    """Every combination of the factors a per-frame trial varies, within the store's space."""
    factors = {
        "topk": [1, 3, space.k],
        "temperature": list(space.temperatures),
        "context": [0, 1, space.context],
        "radius": list(space.radii),
        "window_first_frame": [True, False],
        "repeat_first_frame": [True, False],
        "soft_labels": [True, False],
        "per_frame_norm": ["before-mask", "after-mask"],
    }
    for values in itertools.product(*factors.values()):
        yield replace(PER_FRAME, window=space.window, **dict(zip(factors, values)))


def random_video(channels=16, grid=(10, 13), frames=9, labels=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(frames, channels, *grid, generator=generator)
    first = torch.softmax(3 * torch.randn(labels, *grid, generator=generator), dim=0)
    return features, first


@pytest.mark.parametrize("window", ["square", "circle"])
def test_store_equals_propagate_on_random_features(window):
    """864 settings (every factor's every value, crossed): the store's soft labels equal windowed propagation's
    to float tolerance (the query divided by T before or after the products: a few ulps of each logit), and
    windowed equals dense."""
    features, first = random_video()
    space = replace(SPACE, window=window)
    store = build_store(features, space)
    worst = 0.0
    for cfg in settings(space):
        ours = propagate_per_frame(store, first, cfg)
        windowed = propagate(features, first, cfg, "windowed")
        worst = max(worst, (ours - windowed).abs().max().item())
    assert worst < 1e-5, worst
    cfg = replace(PER_FRAME, window=window, radius=3.5, topk=3, context=4, temperature=0.07)
    assert torch.allclose(propagate(features, first, cfg, "dense"), propagate_per_frame(store, first, cfg), atol=1e-5)


def test_windows_with_fewer_cells_than_k_and_chunks_across_rows():
    """k = 12 on a 4 x 5 grid: the radius-1 square holds 4 to 9 cells, so its stratum pads with -inf (weight 0);
    chunks of 7 targets split grid rows. Still windowed propagation's labels."""
    features, first = random_video(grid=(4, 5), frames=6)
    space = replace(SPACE, radii=(0.0, 1.0, 2.0), k=12, context=3)
    store = build_store(features, space, chunk_size=7)
    assert torch.isinf(store.values[:, :, :, 1, 9:]).all() and torch.isinf(store.values[:, 0, :, 1, 4:]).all()
    for cfg in itertools.islice(settings(space), 0, None, 3):
        assert (propagate_per_frame(store, first, cfg) - propagate(features, first, cfg, "windowed")).abs().max() < 1e-5


def test_window_rings_by_hand():
    """A 3 x 3 grid, radii (0, 1): the corner's radius-1 window is its 4 neighbours and itself, and the whole
    frame adds the other 5; the centre's radius-1 window is the whole grid, so radius 0 adds nothing to it."""
    from stt.propagation.per_frame import window_rings

    (first, (corner_cells, corner_valid)), (second, (rest_cells, rest_valid)) = window_rings(
        (3, 3), slice(0, 1), (0.0, 1.0), "square"
    )
    assert (first, second) == (1, 0)
    assert corner_cells.tolist() == [[0, 1, 3, 4]] and corner_valid.all()
    assert rest_cells.tolist() == [[2, 5, 6, 7, 8]] and rest_valid.all()
    (_, (centre_cells, _)), (_, nothing) = window_rings((3, 3), slice(4, 5), (0.0, 1.0), "square")
    assert centre_cells.tolist() == [list(range(9))] and nothing is None
    (_, (cells, valid)), _ = window_rings((3, 3), slice(0, 5), (0.0, 1.0), "square")  # padded to the widest row
    assert cells.shape == (5, 9) and valid.sum(dim=1).tolist() == [4, 6, 4, 6, 9]


def test_store_in_float64_equals_propagate_to_1e10():
    """In float64 the selection is exactly the windowed path's: no tie sits within rounding of another."""
    features, first = random_video(seed=1)
    store = build_store(features.double(), SPACE)
    for cfg in itertools.islice(settings(), 0, None, 7):
        ours = propagate_per_frame(store, first.double(), cfg)
        assert (ours - propagate(features.double(), first.double(), cfg, "windowed")).abs().max() < 1e-10, cfg


def test_store_equals_propagate_on_real_davis(davis_real_root):
    """Ten frames of real DAVIS (dog-agility) as Lab pixels at stride 8 of short side 120: the masks the store
    gives are the windowed path's, but for pixels where two labels tie to rounding."""
    from stt.config import EvalConfig, ModelConfig
    from stt.data.layouts import DAVIS
    from stt.features import FeatureExtractor
    from stt.propagation import downsample_labels

    dataset = DAVIS(davis_real_root, split="train")
    frames, masks = dataset.read_frames("dog-agility")[:10], dataset.read_masks("dog-agility")[:10]
    features = FeatureExtractor("lab:8", ModelConfig(), EvalConfig(max_short_side=120))(frames)
    first = torch.from_numpy(np.where(masks[0] == 255, 0, masks[0]).astype(np.int64))
    labels = downsample_labels(first, int(first.max()) + 1, tuple(features.shape[-2:]))
    space = replace(SPACE, radii=(0.0, 3.0, 6.0), temperatures=(0.01, 0.07), k=10, context=7, after_mask=False)
    store = build_store(features, space)
    differing = pixels = 0
    for cfg in itertools.islice(settings(space), 0, None, 5):
        if cfg.per_frame_norm == "after-mask":
            assert "after-mask" in serves(store, cfg)
            continue
        ours = soft_labels_to_mask(propagate_per_frame(store, labels, cfg), (120, 216))
        theirs = soft_labels_to_mask(propagate(features, labels, cfg, "windowed"), (120, 216))
        differing, pixels = differing + (ours != theirs).sum().item(), pixels + ours.numel()
    assert pixels and differing <= 1e-4 * pixels, (differing, pixels)


def test_settings_the_store_cannot_serve_are_refused_with_a_reason():
    features, first = random_video(channels=4, grid=(6, 7), frames=4)
    no_whole = replace(SPACE, radii=(2.0, 3.5), after_mask=False)
    store = build_store(features, no_whole)
    base = replace(PER_FRAME, radius=2.0, topk=3, context=2, temperature=0.07)
    assert serves(store, base) is None
    assert serves(store, replace(base, radius=2.5)) is None  # the radius-2 square on the integer grid
    refused = {
        "aggregation='overall'": replace(base, aggregation="overall"),
        "normalize=False": replace(base, normalize=False),
        "exceed the store's": replace(base, topk=7),
        "temperature=0.05 is not one of": replace(base, temperature=0.05),
        "radius=6.0 is not one of": replace(base, radius=6.0),
        "no whole-frame stratum": replace(base, window_first_frame=False),
        "after-mask": replace(base, per_frame_norm="after-mask"),
        "window='circle'": replace(base, window="circle"),
    }
    for reason, cfg in refused.items():
        assert reason in (serves(store, cfg) or ""), (reason, serves(store, cfg))
        with pytest.raises(ValueError, match="cannot serve"):
            propagate_per_frame(store, first, cfg)


def test_per_frame_space_of_a_ray_tune_space():
    """The sweep's per-frame settings of a space (stt.sweep.space.per_frame_space), what a store is built for."""
    from ray import tune

    from stt.sweep.space import per_frame_space

    base = replace(PropagationConfig(), radius=12.0)
    space = {
        "propagation.aggregation": tune.choice(["overall", "per-frame"]),
        "propagation.topk": tune.choice([5, 10, 20]),
        "propagation.temperature": tune.choice([0.07, 0.01, 0.2]),
        "propagation.context": tune.choice([5, 10, 20]),
        "propagation.radius": tune.choice([6, 9, 12]),
    }
    found = per_frame_space(space, base)
    assert found == PerFrameSpace((6.0, 9.0, 12.0), (0.01, 0.07, 0.2), 20, 20, "square", True, False)
    with_first = per_frame_space({**space, "propagation.window_first_frame": tune.choice([True, False])}, base)
    assert with_first.radii == (0.0, 6.0, 9.0, 12.0)  # the first frame unwindowed: a whole-frame stratum
    assert per_frame_space({**space, "propagation.per_frame_norm": tune.choice(["after-mask"])}, base).after_mask
    assert "lists" in per_frame_space({**space, "propagation.temperature": tune.loguniform(0.01, 0.2)}, base)
    assert "no per-frame trial" in per_frame_space({**space, "propagation.aggregation": "overall"}, base)
    assert found.bytes_per_target() == 21 * (3 * 20 * 6 + 3 * 4)
    too_many = (MAX_BYTES // found.bytes_per_target()) + 2
    assert fits(found, [(2, (1, too_many))]) is not None and fits(found, [(31, (16, 29))]) is None


def test_saved_store_round_trips_memory_mapped(tmp_path):
    features, first = random_video(channels=4, grid=(6, 7), frames=5)
    store = build_store(features, SPACE)
    path = store_path(tmp_path / "ab" / "features.npy", SPACE)
    assert path.name.startswith("features.per-frame-") and path != store_path(path, replace(SPACE, k=5))
    save_store(store, path)
    loaded = load_store(path)
    assert loaded.space == SPACE and loaded.grid == (6, 7)
    cfg = replace(PER_FRAME, radius=2.0, topk=3, context=3, temperature=0.2, per_frame_norm="after-mask")
    assert torch.equal(propagate_per_frame(loaded, first, cfg), propagate_per_frame(store, first, cfg))
