"""Does propagation tuned at short side 240 transfer to native 480p? (issue 25)

    python bench/tuning_resolution.py --davis-root ../shared/data/davis-real [--checkpoint lab:8]
                                      [--sizes 240 480] [--seeds 0] [--trials 24] [--space FILE] [--out DIR]
                                      [overrides ...]

For each tuning size, the sweep's phase 3 as `tune/sweep.py` runs it: the propagation space of `--space`
(default stt/sweep/space.yaml; configs/propagation-overall.yaml leaves out the per-frame trials, which no store
serves at 480p), its top-K graphs and per-frame stores (where they fit), `PropagationTrial` actors and
Optuna's TPE (once per `--seeds` seed, starting from the defaults), on DAVIS `train` at that short side. Then the
defaults and every search's best setting, each distinct setting evaluated once on `val` at native 480p, the
resolution papers report. Several seeds show how far the search itself moves the result at each size. The
radius is in feature cells, so a setting tuned at 240 covers twice the pixels at 480p: this is what the table
measures. Prints one table; not a test.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import ray
from ray import tune

from stt.allocator import retain_freed_memory
from stt.config import load_config, to_dict
from stt.evaluate import evaluate_davis
from stt.sweep.candidates import TuningSplit, build_candidates
from stt.sweep.space import SPACE_FILE, load_space, starting_point, with_params
from stt.sweep.trials import METRIC, PropagationSearch, PropagationTrial

REPORTED_SIZE = 480  # DAVIS 480p at its native size


def tune_at(size: int, seed: int, args, base, space: dict) -> tuple[dict, float]:
    """The best propagation setting on `train` at short side `size` found by TPE seeded `seed`, and its tuning J&F."""
    cfg = with_params(base, {"eval.max_short_side": size})
    cache = Path(args.out) / "features"
    split = TuningSplit(cfg, args.checkpoint, cache, args.davis_root, "train")
    graphs, stores = build_candidates(space, split)
    trainable = tune.with_parameters(  # Ray: the trial actors get these once, through the object store
        PropagationTrial,
        base=to_dict(cfg),
        checkpoint=args.checkpoint,
        davis_root=args.davis_root,
        tune_set="train",
        feature_cache=str(cache),
        graphs=graphs,
        stores=stores,
    )
    tuner = tune.Tuner(  # Ray Tune: as the sweep's phase 3 (stt.sweep.phases.Sweep.propagation)
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            search_alg=PropagationSearch(seed=seed, points_to_evaluate=starting_point(space, split.propagation)),
            num_samples=args.trials,
            max_concurrent_trials=max(1, int(ray.cluster_resources().get("CPU", 1))),
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=f"tuned-at-{size}-seed{seed}",
            storage_path=str(Path(args.out).resolve()),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
            verbose=0,
        ),
    )
    best = tuner.fit().get_best_result()
    return {key: best.config[key] for key in space}, best.metrics[METRIC]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--davis-root", required=True, help="real DAVIS-2017 (train to tune, val to report)")
    parser.add_argument("--checkpoint", default="lab:8", help="feature source, as stt.evaluate's --checkpoint")
    parser.add_argument("--sizes", type=int, nargs="+", default=[240, REPORTED_SIZE], help="tuning short sides")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="TPE seeds: one search per size and seed")
    parser.add_argument("--trials", type=int, default=24, help="propagation trials per search")
    parser.add_argument("--space", default=str(SPACE_FILE), help="search space YAML (its propagation section)")
    parser.add_argument("--out", default="bench-tuning-resolution", help="feature cache, graphs and Tune runs")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. propagation.context=7")
    args = parser.parse_args()
    args.davis_root = str(Path(args.davis_root).resolve())  # Ray's actors run in folders of their own
    retain_freed_memory()
    base = load_config(None, args.overrides)
    space = load_space(args.space, base)["propagation"]
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False)

    settings = {"defaults": ({}, None)}
    for size in args.sizes:
        for seed in args.seeds:
            name = f"tuned at {size}, seed {seed}"
            settings[name] = tune_at(size, seed, args, base, space)
            print(f"{name}: {settings[name]}", flush=True)  # kept if the evaluations are cut
    reported = with_params(base, {"eval.max_short_side": REPORTED_SIZE})
    print(f"\n{args.checkpoint}: J&F on DAVIS val at {REPORTED_SIZE}p (tuned on train, {args.trials} trials a search)")
    print(f"{'setting':<24}{'tuning J&F':>11}{'val J&F':>9}  parameters")
    val_jf = {}  # a setting two searches found is evaluated once
    for name, (params, tuning_jf) in settings.items():
        key = tuple(sorted(params.items()))
        if key not in val_jf:
            report = evaluate_davis(
                Path(args.davis_root),
                args.checkpoint,
                with_params(reported, params),
                None,
                split="val",
                feature_cache=Path(args.out) / "features",
                progress=False,
            )
            val_jf[key] = report["summary"]["J&F-Mean"]
        tuned = "-" if tuning_jf is None else f"{tuning_jf:.4f}"
        shown = ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in params.items()) or "the configured propagation"
        print(f"{name:<24}{tuned:>11}{val_jf[key]:>9.4f}  {shown}", flush=True)


if __name__ == "__main__":
    main()
