"""Propagation trials on the top-K affinity graph (stt/propagation/graph.py) vs the existing windowed path, on real
DAVIS features: build time once per sequence, then per-trial time of both paths for a few settings
of the sweep's space, the fraction of target locations that fell back, and agreement with the windowed
path (max |diff| of soft labels, differing mask pixels; --dense adds how far dense and windowed differ
from each other: the same fp32 near-ties). Not a test.

    python bench/propagation_graph.py                                  # random-init R18, short side 240
    python bench/propagation_graph.py --checkpoint CKPT --short-side 480 --sequences 8

Features come from the feature cache (stt.features.FeatureCache, extracted on the first run); the
graph is built for the superset of stt/sweep/space.yaml's propagation section, with K =
stt.propagation.graph.default_k unless --k; --lattice adds the sweep's graphs, one per (context, radius).
Times are CPU seconds of this process (time.process_time: with the default one thread they hold on a
loaded machine, where wall seconds varied 8x between runs; --wall for wall seconds), `--threads` threads:
"graph s" is propagate_with_graph, "masks s" the upsampling and argmax of its labels at the masks' size.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from stt.cache import cache_dir
from stt.config import Config
from stt.data.layouts import DAVIS
from stt.features import FeatureCache, FeatureExtractor
from stt.propagation import downsample_labels, for_task, propagate, soft_labels_to_mask
from stt.propagation.graph import build_graphs, default_k, pick_graph, propagate_with_graph
from stt.sweep import SPACE_FILE, load_space
from stt.sweep.space import graph_lattice, superset_config

# Settings drawn from stt/sweep/space.yaml's values (window, repeat_first_frame, minmax and hard labels are label-side
# factors the space may add); the last is per-frame, which the graph refuses: timed on the existing path only.
SETTINGS = {
    "defaults k10 n20 r12 T.07": {},
    "k5 n5 r6 T.01": {"topk": 5, "context": 5, "radius": 6.0, "temperature": 0.01},
    "k10 n10 r9 circle T.2": {"topk": 10, "context": 10, "radius": 9.0, "window": "circle", "temperature": 0.2},
    "k20 n20 r24 T.03": {"topk": 20, "context": 20, "radius": 24.0, "temperature": 0.03},
    "authors rules k10 n20 r12": {"repeat_first_frame": True, "minmax_normalise": True},
    "hard labels k20 n10 r16": {"topk": 20, "context": 10, "radius": 16.0, "soft_labels": False},
    "per-frame k10 n20 r12": {"aggregation": "per-frame"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--davis-root", default=str(ROOT.parent / "shared" / "data" / "davis-real"))
    parser.add_argument("--set", default="train", help="the tuning split (default: train)")
    parser.add_argument("--sequences", type=int, default=2, help="the first N sequences of the split")
    parser.add_argument(
        "--checkpoint", default="random", help="feature source: checkpoint, random[:SEED] or lab[:STRIDE]"
    )
    parser.add_argument("--short-side", type=int, default=240, help="eval.max_short_side (the laptop sweep plan's 240)")
    parser.add_argument("--space", default=str(SPACE_FILE))
    parser.add_argument(
        "--k",
        type=int,
        nargs="+",
        help="cached candidates per target, one graph each (default: "
        "stt.propagation.graph.default_k of the superset); the windowed path is timed once for all",
    )
    parser.add_argument(
        "--lattice",
        action="store_true",
        help="also the sweep's lattice: one graph per (context, radius) of the space, K its largest top-k "
        "(stt.sweep.space.graph_lattice), each trial on the graph of its own context and radius",
    )
    parser.add_argument("--cache", default=str(cache_dir() / "features"), help="feature cache folder")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: a sweep's propagation trial "
        "holds one CPU, and Ray gives a one-CPU task one OpenMP thread)",
    )
    parser.add_argument(
        "--dense",
        action="store_true",
        help="also run the dense implementation: how far windowed and "
        "dense differ themselves (fp32 rounding of near-tied affinities)",
    )
    parser.add_argument("--wall", action="store_true", help="wall seconds instead of CPU seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.perf_counter if args.wall else time.process_time

    cfg = Config()
    cfg.eval.max_short_side = args.short_side
    dataset = DAVIS(Path(args.davis_root), split=args.set)
    extractor = FeatureExtractor(args.checkpoint, cfg.model, cfg.eval, "cpu")
    cache = FeatureCache(args.cache)
    base = for_task(cfg.propagation, "davis", extractor.stride)
    space = load_space(Path(args.space))["propagation"]
    superset = superset_config(space, base)
    # each entry: a name and the supersets and K of its graphs (trials pick the first that serves them)
    kinds = {f"K={k}": ([superset], k) for k in args.k or [default_k(superset)]}
    if args.lattice:
        lattice, lattice_k = graph_lattice(space, base) or (None, None)
        if lattice is None:
            parser.error(f"--lattice: {args.space} lists no contexts and radii (stt.sweep.space.graph_lattice)")
        kinds[f"lattice of {len(lattice)}, K={lattice_k}"] = (lattice, lattice_k)
    ks = list(kinds)
    print(
        f"features: {args.checkpoint}, layer {cfg.eval.layer}, short side {args.short_side}; "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        f"superset of {Path(args.space).name}: context {superset.context}, radius {superset.radius} {superset.window}, "
        f"window_first_frame {superset.window_first_frame}; graphs: {ks}"
    )

    windowed_seconds, dense_diff = dict.fromkeys(SETTINGS, 0.0), {}
    reasons = {}
    totals = {
        (k, name): {"graph": 0.0, "masks": 0.0, "fallbacks": 0, "targets": 0, "pixels": 0, "differing": 0, "diff": 0.0}
        for k in ks
        for name in SETTINGS
    }
    build_seconds, graph_bytes, frames_total = dict.fromkeys(ks, 0.0), dict.fromkeys(ks, 0), 0
    for seq in dataset.sequences[: args.sequences]:
        frame_paths = dataset.frame_paths(seq)
        started = clock()
        features = cache.load_or_compute(extractor, frame_paths, lambda seq=seq: dataset.read_frames(seq))
        loaded = clock() - started
        frames_total += len(features)
        masks = dataset.read_masks(seq)
        first = torch.from_numpy(np.where(masks[0] == 255, 0, masks[0]).astype(np.int64))
        labels = downsample_labels(first, int(first.max()) + 1, tuple(features.shape[-2:]))
        graphs = {}
        for k, (supersets, graph_k) in kinds.items():
            started = clock()
            graphs[k] = build_graphs(features, supersets, graph_k)  # a lattice in one pass
            seconds = clock() - started
            size = sum(t.numel() * t.element_size() for g in graphs[k] for t in (g.value, g.frame, g.location))
            build_seconds[k] += seconds
            graph_bytes[k] += size
            print(
                f"{seq}: {tuple(features.shape)} features (loaded in {loaded:.1f} s), "
                f"{k} graphs built in {seconds:.1f} s, "
                f"{size / 2**20:.1f} MiB"
            )
        for name, changes in SETTINGS.items():
            trial = replace(base, **changes)
            started = clock()
            theirs = propagate(features, labels, trial, "windowed")
            windowed_seconds[name] += clock() - started
            theirs_masks = soft_labels_to_mask(theirs, masks.shape[1:], trial.minmax_normalise)
            if args.dense:
                dense = propagate(features, labels, trial, "dense")
                dense_diff[name] = max(dense_diff.get(name, 0.0), (dense - theirs).abs().max().item())
            for k, held in graphs.items():
                graph, reason = pick_graph(held, trial)
                if reason is not None:
                    reasons[name] = reason
                    continue
                row, stats = totals[k, name], {}
                started = clock()
                ours = propagate_with_graph(graph, labels, trial, stats)
                row["graph"] += clock() - started
                row["fallbacks"] += stats["fallbacks"]
                row["targets"] += stats["targets"]
                row["diff"] = max(row["diff"], (ours - theirs).abs().max().item())
                if args.dense:
                    row["vs_dense"] = max(row.get("vs_dense", 0.0), (ours - dense).abs().max().item())
                started = clock()
                ours_masks = soft_labels_to_mask(ours, masks.shape[1:], trial.minmax_normalise)
                row["masks"] += clock() - started  # upsampling and argmax at the masks' size
                row["differing"] += (ours_masks != theirs_masks).sum().item()
                row["pixels"] += ours_masks.numel()

    sequences = min(args.sequences, len(dataset.sequences))
    for k in ks:
        print(
            f"\n{k}: build {build_seconds[k]:.1f} s for {sequences} sequences ({frames_total} frames, "
            f"{1000 * build_seconds[k] / frames_total:.0f} ms/frame), graphs {graph_bytes[k] / 2**20:.1f} MiB in all"
        )
        print(
            f"{'setting':<28}{'windowed s':>11}{'graph s':>9}{'masks s':>9}{'speed-up':>9}{'fallback':>10}"
            f"{'max |diff|':>12}{'mask px differ':>16}" + ("  graph-dense  windowed-dense" if args.dense else "")
        )
        for name in SETTINGS:
            row = totals[k, name]
            if name in reasons:
                print(
                    f"{name:<28}{windowed_seconds[name]:>11.2f}{'-':>9}{'-':>9}{'-':>9}{'-':>10}{'-':>12}{'-':>16}"
                    f"   refused: {reasons[name]}"
                )
                continue
            print(
                f"{name:<28}{windowed_seconds[name]:>11.2f}{row['graph']:>9.2f}{row['masks']:>9.2f}"
                f"{windowed_seconds[name] / row['graph']:>8.0f}x"
                f"{row['fallbacks'] / row['targets']:>10.2%}{row['diff']:>12.1e}"
                f"{row['differing']:>9} of {row['pixels'] / 1e6:.0f}M"
                + (f"{row['vs_dense']:>13.1e}{dense_diff[name]:>15.1e}" if args.dense else "")
            )


if __name__ == "__main__":
    main()
