"""One table for every model: DAVIS J&F of several checkpoints under ONE propagation protocol (issue #16).

    python bench/compare_models.py --davis-root ../shared/data/davis-real \\
        --checkpoint lab:8 --checkpoint random:0 --checkpoint stt=runs/stt/temporal-final.pt \\
        --checkpoint vfs=runs/vfs/vfs-final.pt [--preset authors] [--tune-trials 12] eval.max_short_side=240

Paper 004's lesson: implementation factors (the propagation above all) move J&F as much as the method,
so every model here is scored by the same `stt.evaluate.evaluate_davis` with the same settings: stt's
default protocol (paper 004's Algorithm 1, DESIGN.md), or the STT authors' evaluator with `--preset
authors`; dotted overrides apply to all. `--checkpoint` takes anything `stt.evaluate --checkpoint`
takes (stt checkpoints, published releases, random:SEED, lab:STRIDE), optionally as NAME=SOURCE;
each checkpoint's own input space and stride come from the file, as in stt.evaluate.

With `--tune-trials N` each model also gets its own propagation: N Optuna (TPE) trials over the
`propagation` section of stt/sweep/space.yaml (`--space`), the configured defaults first, maximising
J&F on `--tune-set` (DAVIS `train`), the best setting then scored once on `--set` (`val`), never
tuned on. (The sweep's propagation phase runs its trials as Ray Tune trials of one sweep's experiment,
so this is the small loop the issue allows.) Trials run on the cached features, served by top-K
affinity graphs (stt/propagation/graph.py) where they can be, else by stt.propagation.

Prints one Markdown table: model | J&F | J | F | tuned J&F (| the tuned setting).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from datetime import date
from pathlib import Path

import optuna
import torch
from ray.tune.search.optuna import OptunaSearch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stt.config import PRESETS, Config, load_config
from stt.data.layouts import DAVIS
from stt.evaluate import evaluate_davis
from stt.features import FeatureCache, FeatureExtractor, resolve_device
from stt.propagation import for_task, propagate
from stt.propagation.graph import default_k, load_or_build, propagate_with_graph, serves
from stt.sweep.space import load_space, starting_point, superset_config, with_params

DEFAULT_SPACE = Path(__file__).resolve().parents[1] / "stt" / "sweep" / "space.yaml"


def parse_checkpoint(argument: str) -> tuple[str, str]:
    """NAME=SOURCE -> (NAME, SOURCE); a bare SOURCE is its own name."""
    name, sep, source = argument.partition("=")
    return (name, source) if sep and name and "/" not in name else (argument, argument)


def tune_propagation(
    root: Path,
    source: str,
    cfg: Config,
    space: dict,
    trials: int,
    split: str,
    cache: Path,
    device: str,
    seed: int,
) -> tuple[dict, float, float]:
    """(best params, its J&F on `split`, the default's J&F on `split`) after `trials` TPE trials over `space`
    ({"propagation.KEY": Ray Tune domain}, stt.sweep.space.load_space's, as the sweep's propagation phase)."""
    extractor = FeatureExtractor(source, cfg.model, cfg.eval, resolve_device(device))
    superset = superset_config(space, for_task(cfg.propagation, "davis", extractor.stride))
    k, dataset, features_cache, graphs = default_k(superset), DAVIS(root, split=split), FeatureCache(cache), {}

    def on_graph(sequence, features, labels, pcfg):
        if sequence not in graphs:
            feature_file = features_cache.path_for(extractor.cache_key, dataset.frame_paths(sequence))
            (graphs[sequence],), _ = load_or_build(feature_file, features, [superset], k)
        if serves(graphs[sequence], pcfg) is not None:
            return propagate(features, labels, pcfg)
        return propagate_with_graph(graphs[sequence], labels, pcfg)

    def score(params: dict) -> float:
        report = evaluate_davis(
            root,
            source,
            with_params(cfg, params),
            None,
            split=split,
            device=device,
            feature_cache=cache,
            progress=False,
            propagator=on_graph,
        )
        return float(report["summary"]["J&F-Mean"])

    start = starting_point(space, for_task(cfg.propagation, "davis", extractor.stride))  # the default radius, in cells
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    if start:  # the configured defaults are the first trial, where the space holds them (as the sweep)
        study.enqueue_trial(start[0])
    distributions = OptunaSearch.convert_search_space(space)  # the Tune domains as Optuna's, as the sweep's search
    for _ in range(trials):
        trial = study.ask(distributions)
        study.tell(trial, score(trial.params))
    return study.best_params, study.best_value, study.trials[0].value if start else float("nan")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--davis-root", required=True, help="a DAVIS-2017 root (ImageSets/2017/{train,val}.txt)")
    parser.add_argument(
        "--checkpoint",
        action="append",
        required=True,
        help="[NAME=]SOURCE: an stt or published checkpoint, random:SEED or lab:STRIDE (repeat it)",
    )
    parser.add_argument("--set", default="val", help="the split reported (default val)")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="a named evaluation protocol for all models (authors)"
    )
    parser.add_argument("--config", help="YAML config applied to every model (propagation, eval sections)")
    parser.add_argument(
        "--tune-trials", type=int, default=0, help="per-model propagation trials on --tune-set (0: no tuned column)"
    )
    parser.add_argument("--tune-set", default="train", help="the split propagation is tuned on (default train)")
    parser.add_argument("--space", type=Path, default=DEFAULT_SPACE, help="search space file (its propagation section)")
    parser.add_argument("--feature-cache", type=Path, default=Path("~/.cache/stt/features").expanduser())
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="dotted overrides for every model, e.g. eval.max_short_side=240")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, [*(PRESETS[args.preset] if args.preset else ()), *args.overrides])
    root = Path(args.davis_root)
    space = load_space(args.space, cfg)["propagation"] if args.tune_trials else {}
    if args.tune_trials and not space:
        raise SystemExit(f"compare_models: {args.space}: no 'propagation' section to tune")

    print(
        f"# DAVIS {root} '{args.set}', short side <= {cfg.eval.max_short_side}, propagation "
        f"{args.preset or 'default'} protocol; {date.today()}; {platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        flush=True,
    )
    rows = []
    for name, source in map(parse_checkpoint, args.checkpoint):
        started = time.perf_counter()
        summary = evaluate_davis(
            root,
            source,
            cfg,
            None,
            split=args.set,
            device=args.device,
            feature_cache=args.feature_cache,
            progress=False,
        )["summary"]
        row = {"model": name, "J&F": summary["J&F-Mean"], "J": summary["J-Mean"], "F": summary["F-Mean"]}
        if args.tune_trials:
            params, tuned_on, default_on = tune_propagation(
                root, source, cfg, space, args.tune_trials, args.tune_set, args.feature_cache, args.device, args.seed
            )
            tuned = evaluate_davis(
                root,
                source,
                with_params(cfg, params),
                None,
                split=args.set,
                device=args.device,
                feature_cache=args.feature_cache,
                progress=False,
            )["summary"]
            row.update(
                {
                    "tuned J&F": tuned["J&F-Mean"],
                    "tuned on": tuned_on,
                    "default on": default_on,
                    "setting": ", ".join(
                        f"{k.split('.', 1)[1]}={v:.3g}" if isinstance(v, float) else f"{k.split('.', 1)[1]}={v}"
                        for k, v in params.items()
                    ),
                }
            )
        row["seconds"] = time.perf_counter() - started
        rows.append(row)
        print(
            f"compare_models: {name}: J&F {row['J&F']:.3f}"
            + (f", tuned {row['tuned J&F']:.3f}" if "tuned J&F" in row else "")
            + f" ({row['seconds']:.0f} s)",
            flush=True,
        )

    tuned = bool(args.tune_trials)
    print()
    print(
        "| model | J&F | J | F |"
        + (f" tuned J&F | J&F on '{args.tune_set}': default -> tuned | tuned propagation |" if tuned else "")
    )
    print("|---|---|---|---|" + ("---|---|---|" if tuned else ""))
    for row in rows:
        line = f"| {row['model']} | {row['J&F']:.3f} | {row['J']:.3f} | {row['F']:.3f} |"
        if tuned:
            line += f" {row['tuned J&F']:.3f} | {row['default on']:.3f} -> {row['tuned on']:.3f} | {row['setting']} |"
        print(line)
    return rows


if __name__ == "__main__":
    main()
