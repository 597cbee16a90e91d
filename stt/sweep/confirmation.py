"""Phase 5, the confirmation: is the tuned configuration better than the defaults by more than run-to-run noise?

The search picks the best of many noisy trials on the tuning split, so its own numbers are optimistic twice over
(the split it tuned on, and the luckiest seed). The confirmation retrains the chosen training configuration and the
untuned defaults (the base configuration, nothing sampled) with `confirm_seeds` NEW seeds each (train.seed + 1,
+ 2, ...: none is the search's own), from the same initial checkpoint, for a full trial's steps; evaluates every run
once on the REPORTED split with the default and with the tuned propagation; and compares them pairwise.

    confirmation_trial   one Tune trial: train (arm, seed), then evaluate it twice; the per-object J and F go to a
                         JSON file beside its run, so a resumed sweep reads finished runs instead of redoing them
    paired_bootstrap     the 95 % interval of a difference of J&F, resampling seeds and sequences
    confirmation_table   the paired table and the verdict, for summary.md

The interval: a two-level paired bootstrap. Each of 10,000 draws resamples the seeds (with replacement; the same
seed indices for both arms, since seed s gives both arms the same data order and augmentations) and, independently,
the sequences of the reported split (the same for both arms and seeds: they are scored on the same videos), and
computes the difference of the mean J&F over the drawn seeds, each J&F the official one (mean J and mean F over the
drawn sequences' objects, averaged). The 2.5th and 97.5th percentiles are the interval (percentile bootstrap).
With 3 seeds the seed level can take only 10 distinct resamples: the interval is honest about sequences and
coarse about seeds. The verdict follows the interval only: "better" if it lies above 0, "worse" if below,
else "not distinguishable from the defaults".
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ray import tune

from stt.allocator import retain_freed_memory
from stt.checkpoint import CHECKPOINT_FILE, join
from stt.evaluate import evaluate_davis
from stt.recipes import stage_spec
from stt.sweep.space import with_params
from stt.train import build_stage_trainer, check_stopped

ARMS = ("defaults", "tuned")  # the untuned base configuration; the search's best training configuration
PROPAGATIONS = ("default", "tuned")  # the base configuration's propagation; the searched one
DRAWS = 10_000


def run_name(arm: str, seed: int) -> str:
    return f"{arm}-seed{seed}"


def confirmation_trial(
    config: dict,
    *,
    base: dict,
    training_params: dict,
    propagation_params: dict,
    stage: str,
    init: str,
    runs: str,
    workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    davis_root: str,
    report_set: str,
    feature_cache: str,
) -> None:
    """Tune trial (config: {"arm", "seed"}): train the arm's configuration with that seed from `init`, as the Ray
    Train run `<runs>/<arm>-seed<seed>` (a resumed sweep resumes it from its checkpoints), then evaluate its last
    checkpoint on the reported split under both propagations; writes `evaluation.json` there, reports the J&F."""
    retain_freed_memory()  # its evaluations' activations: stt.allocator
    arm, seed = config["arm"], config["seed"]
    cfg = with_params(base, {**(training_params if arm == "tuned" else {}), "train.seed": seed})
    run_dir = join(runs, run_name(arm, seed))
    trainer = build_stage_trainer(
        stage_spec(cfg, stage),
        run_dir,
        init,
        use_gpu=use_gpu,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        run_name="confirmation",
        trial=run_name(arm, seed),
    )
    result = check_stopped(trainer.fit())  # a non-finite loss: its own line
    if result.checkpoint is None or result.metrics.get("step") != cfg.train.max_steps:
        raise RuntimeError(f"confirmation run {run_name(arm, seed)} ended at step {result.metrics.get('step')}")
    checkpoint = str(Path(result.checkpoint.path) / CHECKPOINT_FILE)
    evaluations = {}
    for propagation in PROPAGATIONS:  # the second reads the features the first extracted
        evaluated = with_params(cfg, propagation_params if propagation == "tuned" else {})
        report = evaluate_davis(
            Path(davis_root),
            checkpoint,
            evaluated,
            None,
            split=report_set,
            feature_cache=Path(feature_cache),
            progress=False,
        )
        evaluations[propagation] = {
            "summary": report["summary"],
            "rows": [{k: row[k] for k in ("sequence", "object", "J-Mean", "F-Mean")} for row in report["rows"]],
        }
    entry = {"arm": arm, "seed": seed, "checkpoint": checkpoint, "evaluations": evaluations}
    (Path(run_dir) / "evaluation.json").write_text(json.dumps(entry, indent=1))
    tune.report({f"{p}_propagation_jf": evaluations[p]["summary"]["J&F-Mean"] for p in PROPAGATIONS})  # Ray


def read_runs(runs: Path, seeds: list[int]) -> list[dict]:
    """The finished runs' evaluation.json entries, arm by arm and seed by seed (a missing one is an error)."""
    entries = []
    for arm in ARMS:
        for seed in seeds:
            path = runs / run_name(arm, seed) / "evaluation.json"
            if not path.is_file():
                raise RuntimeError(f"confirmation run {run_name(arm, seed)} finished without {path}")
            entries.append(json.loads(path.read_text()))
    return entries


# ------------------------------------------------------------------------------------------------ the statistics


def per_sequence(rows: list[dict], sequences: list[str]) -> np.ndarray:
    """sequences x 3: each sequence's sum of J over its objects, sum of F, number of objects."""
    table = np.zeros((len(sequences), 3))
    index = {name: i for i, name in enumerate(sequences)}
    for row in rows:
        table[index[row["sequence"]]] += (row["J-Mean"], row["F-Mean"], 1.0)
    return table


def jf_of(tables: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The official J&F of resampled sequences: tables (..., sequences, 3) as `per_sequence`, counts (draws,
    sequences) how often each sequence was drawn -> (draws, ...) mean J and mean F over the drawn objects, averaged."""
    sums = np.einsum("ds,...sk->d...k", counts, tables)
    return (sums[..., 0] + sums[..., 1]) / (2.0 * sums[..., 2])


def paired_bootstrap(
    first: list[list[dict]], second: list[list[dict]], draws: int = DRAWS, seed: int = 0
) -> tuple[float, float, float]:
    """Mean J&F of `first` minus `second` and its 95 % percentile interval.

    first, second: one list of per-object rows (sequence, object, J-Mean, F-Mean) per seed, in the same seed order
    (paired). Resamples seeds (shared by both) and sequences (shared by both and by every seed), `draws` times.
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"paired_bootstrap: expected the same number (>= 1) of seeds, got {len(first)}, {len(second)}")
    sequences = sorted({row["sequence"] for rows in first for row in rows})
    a = np.stack([per_sequence(rows, sequences) for rows in first])  # seeds x sequences x 3
    b = np.stack([per_sequence(rows, sequences) for rows in second])
    whole = np.ones((1, len(sequences)))
    observed = float((jf_of(a, whole) - jf_of(b, whole)).mean())
    rng = np.random.default_rng(seed)
    seed_counts = rng.multinomial(len(first), [1 / len(first)] * len(first), size=draws)  # draws x seeds
    sequence_counts = rng.multinomial(len(sequences), [1 / len(sequences)] * len(sequences), size=draws)
    difference = jf_of(a, sequence_counts) - jf_of(b, sequence_counts)  # draws x seeds
    resampled = (seed_counts * difference).sum(axis=1) / len(first)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return observed, float(low), float(high)


def verdict(low: float, high: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not distinguishable from the defaults"


def compare(runs: list[dict], seeds: list[int]) -> dict:
    """Per (arm, propagation): J&F per seed, mean and std; and the three paired differences with their intervals."""
    by = {(run["arm"], run["seed"]): run["evaluations"] for run in runs}
    cells = {}
    for arm in ARMS:
        for propagation in PROPAGATIONS:
            scores = [by[arm, seed][propagation]["summary"]["J&F-Mean"] for seed in seeds]
            cells[f"{arm}/{propagation}"] = {
                "jf": scores,
                "mean": float(np.mean(scores)),
                "std": float(np.std(scores, ddof=1)) if len(scores) > 1 else 0.0,
            }

    def rows(arm: str, propagation: str) -> list[list[dict]]:
        return [by[arm, seed][propagation]["rows"] for seed in seeds]

    differences = {}
    for name, (a, b) in {
        "tuned configuration vs defaults": (("tuned", "tuned"), ("defaults", "default")),
        "tuned training, default propagation": (("tuned", "default"), ("defaults", "default")),
        "tuned training, tuned propagation": (("tuned", "tuned"), ("defaults", "tuned")),
    }.items():
        difference, low, high = paired_bootstrap(rows(*a), rows(*b))
        differences[name] = {"difference": difference, "low": low, "high": high, "verdict": verdict(low, high)}
    return {"seeds": seeds, "cells": cells, "differences": differences}


def confirmation_table(confirmation: dict, report_set: str, max_short_side: int) -> str:
    """The paired table and the verdict (Markdown), from `compare`'s result."""
    cells, differences, seeds = confirmation["cells"], confirmation["differences"], confirmation["seeds"]

    def cell(key: str) -> str:
        return f"{cells[key]['mean']:.3f} ± {cells[key]['std']:.3f}"

    def interval(name: str) -> str:
        d = differences[name]
        return f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"

    overall = differences["tuned configuration vs defaults"]
    lines = [
        f"\n\n**Confirmation** ({len(seeds)} new seeds per arm: {', '.join(map(str, seeds))}; each run trained a "
        f"full trial's steps from the same start and evaluated once on DAVIS '{report_set}', short side <= "
        f"{max_short_side}; mean ± std over seeds; 95 % intervals from a paired bootstrap over seeds and "
        "sequences, stt/sweep/confirmation.py):",
        "",
        "| training | default propagation | tuned propagation |",
        "|---|---|---|",
        f"| untuned defaults | {cell('defaults/default')} | {cell('defaults/tuned')} |",
        f"| tuned | {cell('tuned/default')} | {cell('tuned/tuned')} |",
        f"| tuned - defaults | {interval('tuned training, default propagation')} "
        f"| {interval('tuned training, tuned propagation')} |",
        "",
        f"Verdict: the tuned configuration (training and propagation) is **{overall['verdict']}**: "
        f"{interval('tuned configuration vs defaults')} J&F against the untuned defaults with default propagation. "
        f"The training search alone (same propagation): "
        f"{differences['tuned training, default propagation']['verdict']} with the default propagation, "
        f"{differences['tuned training, tuned propagation']['verdict']} with the tuned one.",
    ]
    return "\n".join(lines)
