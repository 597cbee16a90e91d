"""stt/propagation/graph.py: trials served from the top-K affinity graph give what stt.propagation.propagate gives
(dense and windowed), on random features and on a real DAVIS sequence, for a grid of settings across
the search space; per-location fallbacks stay exact; settings the graph cannot serve are refused
with a reason; the superset of a Ray Tune space; graphs saved beside the feature cache."""

import itertools
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from stt.config import PropagationConfig
from stt.propagation import (
    choose_window_kernel,
    labels_to_mask,
    minmax_normalise,
    propagate,
    soft_labels_to_mask,
    upsample_labels,
)
from stt.propagation.graph import (
    build_graph,
    build_graphs,
    default_k,
    graph_path,
    load_graph,
    load_or_build,
    pick_graph,
    propagate_with_graph,
    save_graph,
    serves,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# The widest setting of the tests' small space, and the trial factors it serves.
SUPERSET = replace(
    PropagationConfig(), context=4, radius=4.0, topk=20, window="square", window_first_frame=False, chunk_size=40
)
FACTORS = {
    "topk": [1, 5, 20],
    "temperature": [0.01, 0.07, 0.2],
    "context": [0, 1, 2, 4],
    "radius": [1.0, 2.5, 4.0],
    "window": ["square", "circle"],
    "window_first_frame": [True, False],
    "repeat_first_frame": [True, False],
    "soft_labels": [True, False],
    "minmax_normalise": [True, False],
}


def trial_grid(count: int, superset: PropagationConfig = SUPERSET, max_topk: int = 20):
    """About `count` settings spread over the product of FACTORS: every step-th, the step coprime to the
    factors' sizes (2, 3, 4), so the walk meets every value of every factor in varied combinations."""
    names, total = list(FACTORS), math.prod(len(values) for values in FACTORS.values())
    step = next(s for s in itertools.count(max(1, total // count)) if math.gcd(s, 6) == 1)
    for index, values in enumerate(itertools.product(*FACTORS.values())):
        if index % step == 0 and values[0] <= max_topk:
            yield replace(superset, **dict(zip(names, values)))


def random_video(channels: int, grid=(12, 15), frames=7, labels=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(frames, channels, *grid, generator=generator)
    first = torch.softmax(3 * torch.randn(labels, *grid, generator=generator), dim=0)
    return features, first


def decided(labels, image_size, minmax):
    """The masks soft_labels_to_mask makes (T x H x W) and where they are decided: the best label beats
    the second by more than 1e-4 (elsewhere two labels tie up to rounding, and either is right)."""
    up = upsample_labels(labels, image_size)
    up = minmax_normalise(up) if minmax else up
    top2 = up.topk(2, dim=1).values
    return labels_to_mask(up), top2[:, 0] - top2[:, 1] > 1e-4


def assert_same(graph, first, cfg, atol, stats=None, image_size=(24, 30)):
    """The graph path against both existing implementations: soft labels within atol, the same masks
    wherever they are decided."""
    ours = propagate_with_graph(graph, first, cfg, stats)
    ours_masks = soft_labels_to_mask(ours, image_size, cfg.minmax_normalise)
    for implementation in ("dense", "windowed"):
        theirs = propagate(graph.features, first, cfg, implementation)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
        assert torch.allclose(ours, theirs, atol=atol, rtol=0), (
            implementation,
            (ours - theirs).abs().max().item(),
            cfg,
        )
        masks, clear = decided(theirs, image_size, cfg.minmax_normalise)
        assert clear.float().mean() > 0.9 and torch.equal(ours_masks[clear], masks[clear]), (implementation, cfg)


# ---------------------------------------------------------------- exactness


# Three channels: the windowed implementation's shifted multiply-adds; eight: its tile matmuls. On the
# 12 x 15 grid the build scores radius-4 windows densely (a 15-cell tile span covers the grid) for C = 8
# and with the shift kernel for C = 3; the radius-2 superset below uses the tile kernel.
@pytest.mark.parametrize("channels", [3, 8])
def test_graph_equals_propagate_on_random_features(channels):
    features, first = random_video(channels)
    graph = build_graph(features, SUPERSET, k=40)
    stats = {}
    for cfg in trial_grid(40):
        assert serves(graph, cfg) is None, cfg
        assert_same(graph, first, cfg, atol=1e-5, stats=stats)
    assert stats["targets"] > 0 and 0 <= stats["fallbacks"] < stats["targets"]
    print(f"random features, C={channels}: {stats['fallbacks']} of {stats['targets']} target locations fell back")


def test_tile_kernel_superset_and_unwindowed_superset():
    features, first = random_video(8, grid=(10, 40), frames=6, seed=4)
    # radius 2 at tile 8: 12 x 12 cells per target, fewer than a band's 5 x 40 (choose_window_kernel): tiles
    assert choose_window_kernel((10, 40), 5, 8, 2.0, SUPERSET.chunk_size, 8).name == "tile"
    narrow = replace(SUPERSET, radius=2.0, window_first_frame=True)
    graph = build_graph(features, narrow, k=30)
    for cfg in trial_grid(12, superset=narrow):
        cfg = replace(cfg, radius=min(cfg.radius, 2.0), window_first_frame=True)
        assert_same(graph, first, cfg, atol=1e-5)
    # radius 0 in the space: no window at all in the superset, and the trial may have none either
    whole = replace(SUPERSET, radius=0.0)
    graph = build_graph(features, whole, k=30)
    for cfg in [
        replace(SUPERSET, radius=0.0, topk=5),
        replace(SUPERSET, radius=3.0, window="circle", topk=20, context=2),
    ]:
        assert serves(graph, cfg) is None
        assert_same(graph, first, cfg, atol=1e-5)


@pytest.mark.parametrize(("channels", "window", "first_windowed"), [(3, "square", False), (8, "circle", True)])
def test_a_lattice_of_graphs_serves_its_points_without_fallbacks(channels, window, first_windowed):
    """Issue 25: one graph per (context, radius) of the space, K its largest top-k; a trial at a lattice point
    meets the graph of exactly its candidates (pick_graph), no target location falls back, and the labels are
    stt.propagation's. Off the lattice the next wider graph serves, falling back where it must, still exact."""
    from ray import tune

    from stt.sweep.space import graph_lattice

    features, first = random_video(channels, seed=5)
    base = replace(SUPERSET, window=window, window_first_frame=first_windowed)
    space = {
        "propagation.topk": tune.choice([1, 5, 20]),
        "propagation.context": tune.choice([4, 1, 0, 2]),
        "propagation.radius": tune.choice([2.5, 1.0, 4.0]),
    }
    supersets, k = graph_lattice(space, base)
    assert k == 20 and [(s.context, s.radius) for s in supersets] == [
        (c, r) for c in (0, 1, 2, 4) for r in (1.0, 2.5, 4.0)
    ]
    shapes = {(s.window, s.window_first_frame, s.aggregation) for s in supersets}
    assert shapes == {(window, first_windowed, "overall")}
    graphs = build_graphs(features, supersets, k)  # one pass: the widest products, each point's frames and window
    for graph, superset in zip(graphs, supersets):  # the candidates one build per point finds
        alone = build_graph(features, superset, k)
        assert graph.superset == superset
        torch.testing.assert_close(graph.value, alone.value, rtol=0, atol=1e-6)
        real = torch.isfinite(alone.value)  # -inf pads: where and what is arbitrary
        assert real.any()
        assert torch.equal(graph.frame[real], alone.frame[real]), superset
        assert torch.equal(graph.location[real], alone.location[real]), superset
    with pytest.raises(ValueError, match="one window"):
        build_graphs(features, [supersets[0], replace(supersets[-1], window_first_frame=not first_windowed)], k)
    stats = {}
    for cfg in trial_grid(60, superset=base):
        cfg = replace(cfg, window=window, window_first_frame=first_windowed)  # not searched: the lattice's own
        graph, reason = pick_graph(graphs, cfg)
        assert reason is None and (graph.superset.context, graph.superset.radius) == (cfg.context, cfg.radius), cfg
        assert_same(graph, first, cfg, atol=1e-5, stats=stats)
    assert stats["targets"] > 0 and stats["fallbacks"] == 0
    between = replace(base, context=3, radius=2.0, topk=20)  # off the lattice: context 4, radius 2.5 serves it
    graph, reason = pick_graph(graphs, between)
    assert reason is None and (graph.superset.context, graph.superset.radius) == (4, 2.5)
    off = {}
    assert_same(graph, first, between, atol=1e-5, stats=off)
    assert off["fallbacks"] > 0  # top-20 of a wider window: some locations keep fewer than 20 of the narrower one
    graph, reason = pick_graph(graphs, replace(base, context=5))
    assert graph is None and reason == "context=5 exceeds the graph's 4 frames"


def test_graph_lattice_needs_listed_contexts_and_radii_and_one_window():
    from ray import tune

    from stt.sweep.space import graph_lattice, superset_config

    base = replace(PropagationConfig(), radius=12.0)
    space = {
        "propagation.aggregation": tune.choice(["overall", "per-frame"]),
        "propagation.topk": tune.randint(5, 31),
        "propagation.context": tune.choice([5, 10, 20]),
        "propagation.radius": tune.choice([6, 12]),
    }
    supersets, k = graph_lattice(space, base)
    assert k == 30 and len(supersets) == 6 and supersets[-1] == superset_config(space, base)  # the widest last
    assert graph_lattice({**space, "propagation.context": 7}, base)[0][0].context == 7  # a constant is a list of one
    assert graph_lattice({k: v for k, v in space.items() if k != "propagation.radius"}, base)[0][0].radius == 12.0
    for changed in (
        {"propagation.radius": tune.uniform(6, 12)},  # a range: no list of radii to build for
        {"propagation.context": tune.randint(5, 21)},
        {"propagation.radius": tune.choice([0, 12])},  # radius 0 (no window) is wider than every radius
        {"propagation.window": tune.choice(["square", "circle"])},
        {"propagation.window_first_frame": tune.choice([True, False])},
    ):
        assert graph_lattice({**space, **changed}, base) is None, changed
    with pytest.raises(ValueError, match="for_task"):
        graph_lattice(space, PropagationConfig())


def test_the_overall_propagation_space_is_the_default_less_per_frame_and_every_trial_a_lattice_point():
    """configs/propagation-overall.yaml (bench/tuning_resolution.py --space, at 480p where no per-frame store fits):
    the default space's propagation entries but aggregation, so the two searches stay comparable."""
    import yaml

    from stt.config import Config
    from stt.sweep.space import SPACE_FILE, graph_lattice, load_space, per_frame_space

    overall_file = Path(__file__).resolve().parents[1] / "configs" / "propagation-overall.yaml"
    default, overall = (yaml.safe_load(path.read_text())["propagation"] for path in (SPACE_FILE, overall_file))
    assert overall.pop("propagation.aggregation") == {"choice": ["overall"]}
    assert default.pop("propagation.aggregation") == {"choice": ["overall", "per-frame"]}
    assert overall == default
    space = load_space(overall_file, Config())["propagation"]
    base = replace(PropagationConfig(), radius=12.0)
    supersets, k = graph_lattice(space, base)
    assert len(supersets) == 3 * 6 and k == 20
    assert per_frame_space(space, base) == "no per-frame trial in the space"


def test_the_propagation_search_starts_from_the_defaults_once_their_radius_is_resolved():
    """The search's first trial is the base propagation where the space holds it. With the radius left None (the
    task's default, unresolved) no listed radius matched, and the defaults were never tried."""
    from stt.config import Config
    from stt.propagation import for_task
    from stt.sweep.space import SPACE_FILE, load_space, starting_point

    space = load_space(SPACE_FILE, Config())["propagation"]
    with pytest.raises(ValueError, match="for_task"):
        starting_point(space, PropagationConfig())
    (point,) = starting_point(space, for_task(PropagationConfig(), "davis", 8))
    assert point == {
        "propagation.aggregation": "overall",
        "propagation.topk": 10,
        "propagation.temperature": 0.07,
        "propagation.context": 20,
        "propagation.radius": 12,
    }
    assert type(point["propagation.radius"]) is int  # the space's own choice, not the resolved 12.0
    assert starting_point(space, for_task(PropagationConfig(context=7), "davis", 8)) is None  # the plans' context


def test_small_k_forces_fallbacks_that_stay_exact():
    """K = 5: trials with top-20, or a small window, find too few cached candidates at most locations;
    those are computed the usual way, and the result is the same."""
    features, first = random_video(8, seed=1)
    graph = build_graph(features, SUPERSET, k=20)
    small = build_graph(features, SUPERSET, k=5)
    stats = {}
    for cfg in trial_grid(40, max_topk=5):
        assert_same(small, first, cfg, atol=1e-5, stats=stats)
    assert stats["fallbacks"] > stats["targets"] // 4, stats  # most trials here needed the fallback somewhere
    # top-k = K = 20 and the superset itself: every location is served from the cache, none falls back
    stats = {}
    assert_same(graph, first, replace(SUPERSET, topk=20), atol=1e-5, stats=stats)
    assert stats["fallbacks"] == 0


@pytest.mark.parametrize("channels", [3, 8])
def test_fallback_rows_equal_dense_prediction(channels, monkeypatch):
    """The fallback (_exact_rows: target rows in groups, windowed slots scored on the band of grid rows their
    windows reach) against stt.propagation.predict_dense for every location and for scattered ones, across
    windows, radii (0: no window), first-frame rules and the repeated first frame; with a logit budget so
    small that groups hold one or two targets, and with the default one."""
    import stt.propagation.graph
    from stt.propagation import context_indices, predict_dense

    features, _ = random_video(channels, grid=(11, 13), frames=9, seed=5)
    features = torch.nn.functional.normalize(features, dim=1).double()
    generator = torch.Generator().manual_seed(6)
    carried = torch.softmax(3 * torch.randn(9, 143, 4, generator=generator, dtype=torch.float64), dim=2)  # T x N x L
    scattered = torch.randperm(11 * 13, generator=generator)[:40].sort().values
    settings = [
        {"radius": 0.0},
        {"radius": 1.0},
        {"radius": 2.5, "window": "circle"},
        {"radius": 4.0, "window_first_frame": False},
        {"radius": 3.0, "repeat_first_frame": True, "topk": 7},
        {"radius": 20.0, "topk": 1, "temperature": 0.2},
    ]
    for budget in (2 * 11 * 13 * 9, stt.propagation.graph.CHUNK_LOGITS):
        monkeypatch.setattr(stt.propagation.graph, "CHUNK_LOGITS", budget)
        for changes, t in itertools.product(settings, [1, 3, 8]):
            cfg = replace(SUPERSET, context=4, **changes)
            frames = context_indices(t, cfg.context, cfg.repeat_first_frame)
            labels = carried[frames].transpose(1, 2).reshape(len(frames), 4, 11, 13)
            expected = predict_dense(features[frames], labels, features[t], cfg).flatten(1).T  # N x L
            for rows in (torch.arange(11 * 13), scattered):
                ours = stt.propagation.graph._exact_rows(features, carried, t, rows, cfg, (11, 13))
                assert torch.allclose(ours, expected[rows], atol=1e-12, rtol=0), (changes, t, budget)


def test_tiny_grid_holds_every_candidate():
    """3 x 4 grid: fewer candidates than K at every target, so every trial is served whole, never a fallback."""
    features, first = random_video(5, grid=(3, 4), frames=5, seed=2)
    graph = build_graph(features, SUPERSET, k=64)
    assert not torch.isfinite(graph.value[..., -1]).any()
    stats = {}
    for cfg in trial_grid(20):
        assert_same(graph, first, cfg, atol=1e-5, stats=stats)
    assert stats["fallbacks"] == 0


@pytest.fixture(scope="module")
def davis_lab(davis_real_root):
    """Ten frames of real DAVIS (dog-agility, train split) as Lab features at stride 8 of short side 120
    (a 15 x 27 grid, three channels), and its first mask on the grid."""
    from stt.config import EvalConfig, ModelConfig
    from stt.data.layouts import DAVIS
    from stt.features import FeatureExtractor
    from stt.propagation import downsample_labels

    dataset = DAVIS(davis_real_root, split="train")
    frames, masks = dataset.read_frames("dog-agility")[:10], dataset.read_masks("dog-agility")[:10]
    features = FeatureExtractor("lab:8", ModelConfig(), EvalConfig(max_short_side=120))(frames)
    first = torch.from_numpy(np.where(masks[0] == 255, 0, masks[0]).astype(np.int64))
    return features, downsample_labels(first, int(first.max()) + 1, tuple(features.shape[-2:]))


@pytest.mark.parametrize("k", [40, 6])
def test_graph_equals_propagate_on_real_davis(davis_lab, k):
    """In float64 the graph, dense and windowed paths agree to 1e-10 on every setting: the selection is
    exact. In float32 (the evaluator's dtype), three-channel Lab features put many affinities within
    an ulp of each other near 1, where the three paths' rounding (the query divided by T before or after
    the products) may pick different but equally good candidates: dense and windowed already differ
    there. The graph's masks then agree with windowed's on all but a few pixels."""
    features, first = davis_lab
    image_size = (120, 216)  # the frames fed to the features (masks at 480p would only cost time)
    superset = replace(SUPERSET, context=7, radius=6.0)
    graph = build_graph(features.double(), superset, k)
    graph32 = build_graph(features, superset, k)
    stats, differing, pixels = {}, 0, 0
    for cfg in trial_grid(24, superset=superset, max_topk=k):
        cfg = replace(cfg, context=min(7, 2 * cfg.context + 1), radius=cfg.radius + 2)  # up to the superset's 7 and 6
        assert_same(graph, first.double(), cfg, atol=1e-10, stats=stats, image_size=image_size)
        ours = soft_labels_to_mask(propagate_with_graph(graph32, first, cfg), image_size, cfg.minmax_normalise)
        theirs = soft_labels_to_mask(propagate(features, first, cfg, "windowed"), image_size, cfg.minmax_normalise)
        differing, pixels = differing + (ours != theirs).sum().item(), pixels + ours.numel()
    print(
        f"real DAVIS, K={k}: {stats['fallbacks']} of {stats['targets']} target locations fell back; "
        f"float32 masks differ from windowed at {differing} of {pixels} pixels"
    )
    assert differing <= 1e-4 * pixels
    if k == 6:
        assert stats["fallbacks"] > 0  # top-5 trials in small windows find fewer than 5 of 6 cached


# ---------------------------------------------------------------- what the graph cannot serve


def test_settings_the_graph_cannot_serve_are_refused_with_a_reason():
    features, first = random_video(4, grid=(6, 7), frames=4)
    base = replace(SUPERSET, topk=10, window_first_frame=True)
    graph = build_graph(features, base, k=10)
    refused = {
        "aggregation='per-frame'": replace(base, aggregation="per-frame"),
        "normalize=False": replace(base, normalize=False),
        "topk=11 exceeds the graph's K=10": replace(base, topk=11),
        "context=5 exceeds": replace(base, context=5),
        "radius=5.0 exceeds": replace(base, radius=5.0),
        "radius=0 (no window)": replace(base, radius=0.0),
        "window_first_frame=False": replace(base, window_first_frame=False),
    }
    for reason, cfg in refused.items():
        assert reason in (serves(graph, cfg) or ""), (reason, serves(graph, cfg))
        with pytest.raises(ValueError, match="cannot serve"):
            propagate_with_graph(graph, first, cfg)
    # a radius 4.5 square is the radius 4 square on the integer grid: served
    assert serves(graph, replace(base, radius=4.5)) is None
    circle = build_graph(features, replace(SUPERSET, window="circle"), k=10)
    assert "not inside the graph's circle" in serves(circle, replace(base, window="square"))
    with pytest.raises(ValueError, match="'overall' top-K"):
        build_graph(features, replace(SUPERSET, aggregation="per-frame"), k=10)


def test_superset_of_a_ray_tune_space():
    """The sweep's superset of a space (stt.sweep.space.superset_config), the setting a graph is built for."""
    from ray import tune

    from stt.sweep.space import superset_config

    base = replace(PropagationConfig(), radius=12.0)
    space = {
        "propagation.aggregation": tune.choice(["overall", "per-frame"]),
        "propagation.topk": tune.choice([5, 10, 20]),
        "propagation.temperature": tune.loguniform(0.01, 0.2),
        "propagation.context": tune.randint(3, 9),
        "propagation.radius": tune.choice([6, 9, 12, 16, 24, 35]),
        "propagation.window": tune.choice(["circle"]),
        "temporal.alpha": tune.uniform(1, 2),
    }
    superset = superset_config(space, base)
    assert (superset.aggregation, superset.topk, superset.context, superset.radius) == ("overall", 20, 8, 35.0)
    assert superset.window == "square" and superset.window_first_frame  # square contains the circle
    assert default_k(superset) == 64 and default_k(replace(superset, topk=40)) == 80
    wider = superset_config(
        {
            **space,
            "propagation.radius": tune.choice([0, 12]),
            "propagation.window_first_frame": tune.choice([True, False]),
        },
        base,
    )
    assert wider.radius == 0.0 and not wider.window_first_frame
    assert superset_config({}, base) == replace(base, window="square")  # the base alone
    with pytest.raises(ValueError, match="for_task"):
        superset_config(space, PropagationConfig())


# ---------------------------------------------------------------- on disk


def test_saved_graph_is_keyed_by_superset_and_k_and_round_trips(tmp_path):
    features, first = random_video(4, grid=(6, 7), frames=5)
    feature_file = tmp_path / "ab" / "abcdef.npy"
    (graph,), (path,) = load_or_build(feature_file, features, [SUPERSET], 12)
    assert path.parent == feature_file.parent and path.name.startswith("abcdef.graph-") and path.is_file()
    assert graph_path(feature_file, replace(SUPERSET, temperature=0.5, topk=3), 12) == path  # label-only fields
    assert (
        len(
            {
                graph_path(feature_file, SUPERSET, 13),
                graph_path(feature_file, replace(SUPERSET, radius=3.0), 12),
                graph_path(feature_file, replace(SUPERSET, context=3), 12),
                path,
            }
        )
        == 4
    )
    (loaded,), _ = load_or_build(feature_file, features, [SUPERSET], 12)  # a hit: torch.load(weights_only=True)
    assert loaded.location.dtype == torch.int16 and loaded.value.dtype == torch.float32 and loaded.superset == SUPERSET
    cfg = replace(SUPERSET, topk=5, context=2)
    assert torch.equal(propagate_with_graph(loaded, first, cfg), propagate_with_graph(graph, first, cfg))
    with pytest.raises(ValueError, match="a graph of 5 frames"):
        load_graph(path, features[:4])
    save_graph(graph, tmp_path / "copy.pt")
    assert torch.equal(load_graph(tmp_path / "copy.pt", features).value, graph.value)


def test_load_or_build_reads_features_only_when_needed(tmp_path):
    """The sweep's use (stt.sweep.candidates): load=False makes sure the file exists; features given as a
    function are read for a build, never for a graph already on disk."""
    features, _ = random_video(4, grid=(6, 7), frames=5)
    feature_file, reads = tmp_path / "abcdef.npy", []

    def read():
        reads.append(1)
        return features

    assert load_or_build(feature_file, read, [SUPERSET], 12, load=False) == (
        None,
        [graph_path(feature_file, SUPERSET, 12)],
    )
    assert len(reads) == 1 and graph_path(feature_file, SUPERSET, 12).is_file()
    assert load_or_build(feature_file, read, [SUPERSET], 12, load=False)[0] is None and len(reads) == 1
    (graph,), _ = load_or_build(feature_file, read, [SUPERSET], 12)
    assert len(reads) == 2 and torch.equal(graph.value, build_graph(features, SUPERSET, 12).value)
    narrow = replace(SUPERSET, context=1)  # a lattice with one graph on disk: the other is built, the first loaded
    graphs, paths = load_or_build(feature_file, read, [narrow, SUPERSET], 12)
    assert len(reads) == 3 and paths == [graph_path(feature_file, narrow, 12), graph_path(feature_file, SUPERSET, 12)]
    assert torch.equal(graphs[0].value, build_graph(features, narrow, 12).value) and graphs[1].superset == SUPERSET


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_on_cuda_equals_cpu():
    features, first = random_video(8, grid=(20, 24), frames=6)
    cfg = replace(SUPERSET, topk=10, context=3, radius=3.0)
    cpu = propagate_with_graph(build_graph(features, SUPERSET, 40), first, cfg)
    cuda = propagate_with_graph(build_graph(features.cuda(), SUPERSET, 40), first.cuda(), cfg)
    assert torch.allclose(cuda.cpu(), cpu, atol=1e-5)
    assert torch.equal(labels_to_mask(cuda).cpu(), labels_to_mask(cpu))
