"""The propagation trials' candidate sources, built once per checkpoint on the tuning split before the trials
start: each sequence's top-K affinity graphs (stt.propagation.graph), one per (context, radius) of the space's
"overall" settings or one for the widest, and its per-frame store (stt.propagation.per_frame) for the space's
per-frame settings, each saved beside the sequence's cached features, so a resumed sweep finds them on disk."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from stt.config import Config
from stt.data.layouts import DAVIS
from stt.features import FeatureCache, FeatureExtractor, resolve_device
from stt.observe import with_progress
from stt.propagation import for_task
from stt.propagation.graph import default_k, load_or_build
from stt.propagation.per_frame import PerFrameSpace, build_store, fits, save_store, store_path
from stt.sweep.space import graph_lattice, per_frame_space, superset_config


class TuningSplit:
    """The tuning split's sequences and their features under one checkpoint, read through the feature cache in
    `cache` (computed where not cached): what both candidate sources are built from."""

    def __init__(self, cfg: Config, checkpoint: str, cache: Path, davis_root: str, split: str):
        self.extractor = FeatureExtractor(checkpoint, cfg.model, cfg.eval, resolve_device("auto"))
        self.cache = FeatureCache(str(cache))
        self.dataset = DAVIS(Path(davis_root), split=split)
        # the trials' base propagation, its radius resolved for this checkpoint's stride
        self.propagation = for_task(cfg.propagation, "davis", self.extractor.stride)

    def features(self, seq: str):
        return self.cache.load_or_compute(
            self.extractor, self.dataset.frame_paths(seq), lambda: self.dataset.read_frames(seq)
        )

    def feature_file(self, seq: str) -> Path:
        """Where the sequence's features are cached: its graph and store are saved beside them."""
        return self.cache.path_for(self.extractor.cache_key, self.dataset.frame_paths(seq))


def build_graphs(space: dict, split: TuningSplit) -> dict[str, list[str]]:
    """{sequence: files of its top-K affinity graphs} on the tuning split, saved beside its cached features: the
    trials then filter and gather instead of recomputing affinities. One graph per (context, radius) of the
    propagation space (`space`: {"propagation.KEY": Ray Tune domain}) where stt.sweep.space.graph_lattice allows,
    so a trial's graph holds exactly its candidates; else one for the widest setting. A graph already on disk is
    kept (its features are not read)."""
    started = time.perf_counter()
    lattice = graph_lattice(space, split.propagation)
    if lattice is None:
        superset = superset_config(space, split.propagation)
        supersets, graph_k = [superset], default_k(superset)
    else:
        supersets, graph_k = lattice
    graphs = {}
    # features extracted where not cached, then each sequence's graphs: minutes at native resolution
    for seq in with_progress(split.dataset.sequences, "sweep: graphs", "seq", name=str):
        features = functools.partial(split.features, seq)
        graphs[seq] = [
            str(path) for path in load_or_build(split.feature_file(seq), features, supersets, graph_k, load=False)[1]
        ]
    size = sum(Path(path).stat().st_size for paths in graphs.values() for path in paths)
    widest = supersets[-1]
    if lattice is None:
        which = f"one for context {widest.context}, radius {widest.radius}"
    else:
        contexts, radii = sorted({s.context for s in supersets}), sorted({s.radius for s in supersets})
        which = f"one per context in {contexts} and radius in {radii}: none falls back"
    print(
        f"sweep: top-{graph_k} affinity graphs of {len(graphs)} sequences ready in "
        f"{time.perf_counter() - started:.1f} s, {size / 2**30:.2f} GiB ({which}; "
        f"first frame {'in' if widest.window_first_frame else 'without'} a window)"
    )
    return graphs


def build_per_frame_stores(space: dict, split: TuningSplit) -> dict[str, str]:
    """{sequence: file of its per-frame store} on the tuning split for the space's per-frame trials, saved beside
    its cached features; {} (said in one line) when the space has none or the stores would not fit in memory
    (stt.propagation.per_frame.fits): those trials then run stt.propagation."""
    started = time.perf_counter()
    wanted = per_frame_space(space, split.propagation)
    if isinstance(wanted, PerFrameSpace):
        held = {seq: split.features(seq) for seq in split.dataset.sequences}
        wanted = fits(wanted, [(f.shape[0], tuple(f.shape[2:])) for f in held.values()]) or wanted
    if not isinstance(wanted, PerFrameSpace):
        print(f"sweep: per-frame propagation trials run stt.propagation: {wanted}")
        return {}
    stores = {}
    for seq in with_progress(split.dataset.sequences, "sweep: per-frame stores", "seq", name=str):
        path = store_path(split.feature_file(seq), wanted)
        if not path.is_file():
            save_store(build_store(held[seq], wanted), path)
        stores[seq] = str(path)
    print(
        f"sweep: per-frame stores of {len(stores)} sequences ready in {time.perf_counter() - started:.1f} s "
        f"(radii {list(wanted.radii)}, {len(wanted.temperatures)} temperatures, top-{wanted.k}, "
        f"context {wanted.context})"
    )
    return stores
