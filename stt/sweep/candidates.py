"""The propagation trials' candidate sources, built once per checkpoint on the tuning split before the trials
start: each sequence's top-K affinity graphs (stt.propagation.graph), one per (context, radius) of the space's
"overall" settings or one for the widest, and its per-frame store (stt.propagation.per_frame) for the space's
per-frame settings, each saved beside the sequence's cached features, so a resumed sweep finds them on disk."""

from __future__ import annotations

import concurrent.futures
import functools
import time
from pathlib import Path

import torch

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


def build_candidates(space: dict, split: TuningSplit) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Both candidate sources of every tuning-split sequence, saved beside its cached features (a resumed sweep
    finds them on disk): ({sequence: files of its top-K affinity graphs}, {sequence: file of its per-frame store}).

    Graphs: one per (context, radius) of the space's "overall" settings where stt.sweep.space.graph_lattice
    allows, so a trial's graph holds exactly its candidates; else one for the widest setting. Stores: for the
    space's per-frame settings; none (said in one line) when the space has none or they would not fit in memory
    (stt.propagation.per_frame.fits): those trials then run stt.propagation.

    The builds run side by side on torch's intra-op threads, one thread each: one sequence's products are too
    small to keep two threads busy, and sequences are independent (on the quick plan, 19 s instead of 25 s on
    two threads, and 24 s as Ray tasks, whose fresh worker processes spent seconds importing; BENCHMARKS.md).
    """
    started = time.perf_counter()
    lattice = graph_lattice(space, split.propagation)
    if lattice is None:
        superset = superset_config(space, split.propagation)
        supersets, graph_k = [superset], default_k(superset)
    else:
        supersets, graph_k = lattice
    # features extracted here where not cached (the builds only read the cache); their shapes size the stores
    shapes = {seq: tuple(split.features(seq).shape) for seq in split.dataset.sequences}
    wanted = per_frame_space(space, split.propagation)
    if isinstance(wanted, PerFrameSpace):
        wanted = fits(wanted, [(shape[0], shape[2:]) for shape in shapes.values()]) or wanted

    def graph_files(seq: str) -> list[str]:
        features = functools.partial(split.features, seq)  # read only where a graph is missing
        return [str(path) for path in load_or_build(split.feature_file(seq), features, supersets, graph_k, False)[1]]

    def store_file(seq: str) -> str:
        path = store_path(split.feature_file(seq), wanted)
        if not path.is_file():
            save_store(build_store(split.features(seq), wanted), path)
        return str(path)

    builds = [(graph_files, seq) for seq in split.dataset.sequences]
    if isinstance(wanted, PerFrameSpace):  # first: a store takes longer than a sequence's graphs
        builds = [(store_file, seq) for seq in split.dataset.sequences] + builds
    threads = torch.get_num_threads()
    built = {}
    torch.set_num_threads(1)
    try:
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            running = {pool.submit(build, seq): (build, seq) for build, seq in builds}
            done = concurrent.futures.as_completed(running)
            for future in with_progress(done, "sweep: graphs and stores", "build", total=len(builds)):
                built[running[future]] = future.result()
    finally:
        torch.set_num_threads(threads)
    graphs = {seq: built[graph_files, seq] for seq in split.dataset.sequences}
    stores = {seq: built[store_file, seq] for seq in split.dataset.sequences if (store_file, seq) in built}
    elapsed = time.perf_counter() - started
    size = sum(Path(path).stat().st_size for paths in graphs.values() for path in paths)
    widest = supersets[-1]
    if lattice is None:
        which = f"one for context {widest.context}, radius {widest.radius}"
    else:
        contexts, radii = sorted({s.context for s in supersets}), sorted({s.radius for s in supersets})
        which = f"one per context in {contexts} and radius in {radii}: none falls back"
    print(
        f"sweep: top-{graph_k} affinity graphs of {len(graphs)} sequences ready in {elapsed:.1f} s, "
        f"{size / 2**30:.2f} GiB ({which}; first frame {'in' if widest.window_first_frame else 'without'} a window)"
    )
    if isinstance(wanted, PerFrameSpace):
        print(
            f"sweep: per-frame stores of {len(stores)} sequences ready (radii {list(wanted.radii)}, "
            f"{len(wanted.temperatures)} temperatures, top-{wanted.k}, context {wanted.context})"
        )
    else:
        print(f"sweep: per-frame propagation trials run stt.propagation: {wanted}")
    return graphs, stores
