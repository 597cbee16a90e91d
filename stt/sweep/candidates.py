"""The propagation trials' candidate sources, built once per checkpoint on the tuning split before the trials
start: each sequence's top-K affinity graph (stt.propagation.graph) for the widest "overall" setting of the
space, and its per-frame store (stt.propagation.per_frame) for the space's per-frame settings, each saved
beside the sequence's cached features, so a resumed sweep finds them on disk."""

from __future__ import annotations

import time
from pathlib import Path

from stt.config import Config
from stt.data.layouts import DAVIS
from stt.features import FeatureCache, FeatureExtractor, resolve_device
from stt.observe import with_progress
from stt.propagation import for_task
from stt.propagation.graph import default_k, load_or_build
from stt.propagation.per_frame import PerFrameSpace, build_store, fits, save_store, store_path
from stt.sweep.space import per_frame_space, superset_config


def build_graphs(space: dict, cfg: Config, checkpoint: str, cache: Path, davis_root: str, split: str) -> dict[str, str]:
    """{sequence: file of its top-K affinity graph} on DAVIS `split`, for the widest setting of the propagation
    space (`space`: {"propagation.KEY": Ray Tune domain}), saved beside its cached features in `cache`: the
    trials then filter and gather instead of recomputing affinities. A graph already on disk is kept (its
    features are not read)."""
    started = time.perf_counter()
    extractor = FeatureExtractor(checkpoint, cfg.model, cfg.eval, resolve_device("auto"))
    superset = superset_config(space, for_task(cfg.propagation, "davis", extractor.stride))
    graph_k, features_cache = default_k(superset), FeatureCache(str(cache))
    dataset = DAVIS(Path(davis_root), split=split)
    graphs = {}
    # features extracted where not cached, then each sequence's graph: minutes at native resolution
    for seq in with_progress(dataset.sequences, "sweep: graphs", "seq", name=str):
        frame_paths = dataset.frame_paths(seq)

        def features(seq=seq, frame_paths=frame_paths):
            return features_cache.load_or_compute(extractor, frame_paths, lambda: dataset.read_frames(seq))

        feature_file = features_cache.path_for(extractor.cache_key, frame_paths)
        graphs[seq] = str(load_or_build(feature_file, features, superset, graph_k, load=False)[1])
    print(
        f"sweep: top-{graph_k} affinity graphs of {len(graphs)} sequences ready in "
        f"{time.perf_counter() - started:.1f} s (context {superset.context}, radius {superset.radius}, "
        f"first frame {'in' if superset.window_first_frame else 'without'} a window)"
    )
    return graphs


def build_per_frame_stores(
    space: dict, cfg: Config, checkpoint: str, cache: Path, davis_root: str, split: str
) -> dict[str, str]:
    """{sequence: file of its per-frame store} on DAVIS `split` for the space's per-frame trials, saved beside
    its cached features in `cache`; {} (said in one line) when the space has none or the stores would not fit
    in memory (stt.propagation.per_frame.fits): those trials then run stt.propagation."""
    started = time.perf_counter()
    extractor = FeatureExtractor(checkpoint, cfg.model, cfg.eval, resolve_device("auto"))
    wanted = per_frame_space(space, for_task(cfg.propagation, "davis", extractor.stride))
    features_cache = FeatureCache(str(cache))
    dataset = DAVIS(Path(davis_root), split=split)
    if isinstance(wanted, PerFrameSpace):
        held = {
            seq: features_cache.load_or_compute(
                extractor, dataset.frame_paths(seq), lambda seq=seq: dataset.read_frames(seq)
            )
            for seq in dataset.sequences
        }
        wanted = fits(wanted, [(f.shape[0], tuple(f.shape[2:])) for f in held.values()]) or wanted
    if not isinstance(wanted, PerFrameSpace):
        print(f"sweep: per-frame propagation trials run stt.propagation: {wanted}")
        return {}
    stores = {}
    for seq in with_progress(dataset.sequences, "sweep: per-frame stores", "seq", name=str):
        path = store_path(features_cache.path_for(extractor.cache_key, dataset.frame_paths(seq)), wanted)
        if not path.is_file():
            save_store(build_store(held[seq], wanted), path)
        stores[seq] = str(path)
    print(
        f"sweep: per-frame stores of {len(stores)} sequences ready in {time.perf_counter() - started:.1f} s "
        f"(radii {list(wanted.radii)}, {len(wanted.temperatures)} temperatures, top-{wanted.k}, "
        f"context {wanted.context})"
    )
    return stores
