"""What one propagation trial of the sweep costs, three ways, on the tuning split (issue 12):

    cold           extract the features (into an empty cache), propagate (stt.propagation, windowed), score
    warm features  the features read from the cache, the same propagation, score (the sweep before graphs)
    warm graph     the features and each sequence's top-K graph read from disk, stt.propagation.graph
                   .propagate_with_graph, score (the graphs are built once per checkpoint)
    held graph     the same with the features, ground truth and graphs already in memory: the sweep's
                   propagation trial (stt.sweep.trials.PropagationTrial loads them once per Tune actor)

    python bench/sweep_costs.py                                   # random-init ResNet-18, the embedded synthetic DAVIS
    python bench/sweep_costs.py --davis-root ../shared/data/davis-real eval.max_short_side=128 propagation.context=7
    python bench/sweep_costs.py --davis-root ../shared/data/davis-real --sequences 1 --cache ~/.cache/stt/features

One trial is the base configuration (the dotted overrides) over every sequence of the split (or the first
--sequences): per sequence, read the ground truth, propagate, upsample, argmax, score J&F (stt.metrics), as
stt.evaluate.evaluate_davis does. The graphs are built for the superset of the sweep's search space with
K = stt.propagation.graph.default_k, saved beside the cached features (a graph already there is loaded, and its build is
not timed). Also printed: the fraction of target locations the graph computed the usual way (fallbacks), the
graphs' size, and the cost of building the feature extractor (reading and hashing the checkpoint), which
stt.evaluate.evaluate_davis pays per call and the sweep once per Tune actor. Wall seconds,
`torch.get_num_threads()` threads (1 by default, as a one-CPU Tune trial).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from stt.config import load_config
from stt.data.layouts import DAVIS
from stt.data.synthetic import ensure_dataset
from stt.evaluate import predict_davis_sequence, task_config
from stt.features import FeatureCache, FeatureExtractor
from stt.metrics import evaluate_davis_sequence, summarize_davis
from stt.propagation.graph import (
    build_graph,
    default_k,
    graph_path,
    load_graph,
    propagate_with_graph,
    save_graph,
    serves,
)
from stt.sweep import SPACE_FILE, load_space
from stt.sweep.space import superset_config


def run_trial(
    dataset: DAVIS, sequences: list[str], cfg, features_of, propagator_of=None, masks_of=None
) -> tuple[float, dict]:
    """Wall seconds and J&F summary of one trial: features_of(seq) -> features, propagator_of(seq, features) -> a
    propagator for stt.evaluate.predict_davis_sequence (None: stt.propagation.propagate), masks_of(seq) -> the
    ground truth (None: read from disk)."""
    started, rows = time.perf_counter(), []
    for seq in sequences:
        features = features_of(seq)
        gt = dataset.read_masks(seq) if masks_of is None else masks_of(seq)  # T x H x W, 255 = void
        propagator = None if propagator_of is None else propagator_of(seq, features)
        pred = predict_davis_sequence(features, gt, dataset.num_objects(seq), cfg, "windowed", propagator)
        rows.extend(evaluate_davis_sequence(gt, pred, seq))
    return time.perf_counter() - started, summarize_davis(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="random", help="checkpoint file, random[:SEED] or lab[:STRIDE]")
    parser.add_argument("--davis-root", help="DAVIS-2017 root (default: the embedded synthetic set)")
    parser.add_argument("--set", default="train", help="the tuning split")
    parser.add_argument("--sequences", type=int, help="only the first N sequences of the split (default: all)")
    parser.add_argument("--space", default=str(SPACE_FILE), help="the search space whose superset the graphs hold")
    parser.add_argument(
        "--cache",
        help="feature cache folder for the warm runs and the graphs (default: the cold "
        "run's temporary one); give one to reuse features and graphs of an earlier run",
    )
    parser.add_argument("--repeats", type=int, default=2, help="warm trials of each kind; the fastest is printed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a one-CPU Tune trial)")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides (the trial's configuration)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(None, args.overrides)
    root = Path(args.davis_root) if args.davis_root else ensure_dataset("davis")
    dataset = DAVIS(root, split=args.set)
    sequences = dataset.sequences[: args.sequences]

    started = time.perf_counter()
    extractor = FeatureExtractor(args.checkpoint, base.model, base.eval, "cpu")
    extractor_s = time.perf_counter() - started
    cfg = task_config(base, "davis", extractor.stride)
    superset = superset_config(load_space(Path(args.space))["propagation"], cfg.propagation)
    k = default_k(superset)

    with tempfile.TemporaryDirectory() as scratch:
        cold_cache = FeatureCache(Path(scratch) / "features")

        def read(cache):
            return lambda seq: cache.load_or_compute(
                extractor, dataset.frame_paths(seq), lambda: dataset.read_frames(seq)
            )

        cold_s, cold = run_trial(dataset, sequences, cfg, read(cold_cache))
        assert extractor.network_calls > 0, "the cold run found its features cached"
        cache = FeatureCache(args.cache) if args.cache else cold_cache
        for seq in sequences:  # a given cache may not hold them yet (untimed)
            read(cache)(seq)
        calls = extractor.network_calls
        warm_s, warm = min(run_trial(dataset, sequences, cfg, read(cache)) for _ in range(args.repeats))
        assert extractor.network_calls == calls, "a warm run ran the network: the feature cache missed"

        paths, build_s, built, graph_bytes = {}, 0.0, 0, 0
        for seq in sequences:
            frame_paths = dataset.frame_paths(seq)
            paths[seq] = graph_path(cache.path_for(extractor.cache_key, frame_paths), superset, k)
            features = read(cache)(seq)
            if seq == sequences[0]:
                grid = tuple(features.shape[-2:])
            if not paths[seq].is_file():
                started = time.perf_counter()
                save_graph(build_graph(features, superset, k), paths[seq])
                build_s, built = build_s + time.perf_counter() - started, built + 1
            graph_bytes += paths[seq].stat().st_size
        reason = serves(load_graph(paths[seq], features), cfg.propagation)  # one superset: the same for every graph
        stats = {"targets": 0, "fallbacks": 0}

        def on_graph(seq, features):
            return lambda f, labels, c: propagate_with_graph(load_graph(paths[seq], f), labels, c, stats)

        graph_runs = [
            run_trial(dataset, sequences, cfg, read(cache), None if reason else on_graph) for _ in range(args.repeats)
        ]
        graph_s, graph = min(graph_runs, key=lambda run: run[0])
        held_features = {seq: read(cache)(seq) for seq in sequences}
        held_masks = {seq: dataset.read_masks(seq) for seq in sequences}
        held_graphs = {seq: load_graph(paths[seq], held_features[seq]) for seq in sequences}

        def on_held_graph(seq, features):
            return lambda f, labels, c: propagate_with_graph(held_graphs[seq], labels, c)

        held_runs = [
            run_trial(dataset, sequences, cfg, held_features.get, None if reason else on_held_graph, held_masks.get)
            for _ in range(args.repeats)
        ]
        held_s, held = min(held_runs, key=lambda run: run[0])
        assert extractor.network_calls == calls, "a graph run ran the network: the feature cache missed"

    frames = sum(len(dataset.frame_paths(seq)) for seq in sequences)
    print(
        f"# {args.checkpoint} features on {root} ({args.set}, {len(sequences)} sequences, {frames} frames), "
        f"grid {grid} for {sequences[0]}; torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        f"overrides: {' '.join(args.overrides) or 'none'}"
    )
    print(
        f"# graphs: superset of {Path(args.space).name} (context {superset.context}, radius {superset.radius} "
        f"{superset.window}), K = {k}, {graph_bytes / 2**20:.1f} MiB on disk; "
        + (
            f"built {built} in {build_s:.1f} s ({build_s / max(1, built):.1f} s per sequence)"
            if built
            else "all found on disk (built by an earlier run)"
        )
    )
    print("| trial | seconds | vs cold | J&F |")
    print("|---|---|---|---|")
    for name, seconds, summary in [
        ("cold: extract + propagate + score", cold_s, cold),
        ("warm features: cached features, windowed propagation", warm_s, warm),
        ("warm graph: cached features and graph read from disk, gather", graph_s, graph),
        ("held graph: features, masks and graph in memory (the sweep's trial)", held_s, held),
    ]:
        print(f"| {name} | {seconds:.2f} | {cold_s / seconds:.1f}x | {summary['J&F-Mean']:.6f} |")
    if reason:
        print(f"\nthe graph cannot serve this trial ({reason}): the warm graph row ran stt.propagation")
    else:
        print(
            f"\nfallbacks: {stats['fallbacks'] / max(1, stats['targets']):.2%} of {stats['targets'] // args.repeats} "
            f"target locations per trial computed the usual way; J&F graph - windowed: "
            f"{graph['J&F-Mean'] - warm['J&F-Mean']:+.2e}, cold - warm: {cold['J&F-Mean'] - warm['J&F-Mean']:+.2e}"
        )
    print(f"not in these rows: building the feature extractor {extractor_s:.2f} s (per evaluate_davis call)")


if __name__ == "__main__":
    main()
