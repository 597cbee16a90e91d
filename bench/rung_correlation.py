"""Do early rungs rank training trials like full runs? The evidence a sweep plan's ASHA rungs are chosen by.

    python bench/rung_correlation.py --plan laptop --configs 8 --evaluate-at 10,25,50 \
        --data-root ../shared/data/ytvos-real/train_all_frames --davis-root ../shared/data/davis-real data.frame_gap=4

Runs the sweep's own phases 1-2 (stt.sweep: the recipe's earlier stages, then training trials of its last stage)
with the plan's sizes, but with no early stopping: `--configs` configurations of the space, drawn by the sweep's
own seeded searcher (Optuna's TPE, which samples at random for its first 10 trials), each trained to the plan's
full `trial_steps` and evaluated (J&F on the tuning split, the plan's propagation) at every `--evaluate-at` step and
at the end. Then, for each evaluation step, the Spearman rank correlation between the J&F there and the final J&F
over the configurations, with a bootstrap 95 % interval (configurations resampled), and how often ASHA with the
plan's reduction factor would have kept the finally-best configuration at that rung (it keeps the top
1/reduction_factor). Prints the table and writes `<storage>/<name>/rung_correlation.csv`; the experiment folder is
a sweep's, so an interrupted run continues with `--resume`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import numpy as np
import optuna
import pandas as pd
import ray
from optuna.trial import TrialState
from scipy.stats import spearmanr

from stt.command import run
from stt.errors import UsageError
from stt.sweep.cli import get_args_parser, prepare
from stt.sweep.phases import Sweep
from stt.sweep.trials import optuna_storage
from stt.train import start_ray


def trial_curves(experiment: Path) -> pd.DataFrame:
    """configurations x evaluation steps: the tuning J&F of every finished training trial at every step."""
    study = optuna.load_study(study_name="training", storage=optuna_storage(experiment))
    curves = {t.number: t.intermediate_values for t in study.get_trials(states=(TrialState.COMPLETE,))}
    return pd.DataFrame(curves).T.sort_index(axis=1)


def correlation_table(curves: pd.DataFrame, reduction_factor: int, draws: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Per evaluation step: Spearman's rho with the final step, its bootstrap 95 % interval over configurations,
    and whether the top 1/reduction_factor at that step holds the finally-best configuration."""
    final = curves.columns[-1]
    rng = np.random.default_rng(seed)
    n = len(curves)
    kept = max(1, n // reduction_factor)
    rows = []
    for step in curves.columns:
        rho = spearmanr(curves[step], curves[final]).statistic
        resampled = []
        for _ in range(draws):
            pick = rng.integers(0, n, n)
            if len(set(pick)) > 2:  # a rank correlation needs at least three distinct configurations
                resampled.append(spearmanr(curves[step].values[pick], curves[final].values[pick]).statistic)
        low, high = np.nanpercentile(resampled, [2.5, 97.5])
        best = curves[final].idxmax()
        rows.append(
            {
                "step": step,
                "spearman": rho,
                "low": low,
                "high": high,
                f"final best in top {kept} of {n}": best in curves[step].nlargest(kept).index,
                "mean J&F": curves[step].mean(),
                "spread (max - min)": curves[step].max() - curves[step].min(),
            }
        )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    parser.prog, parser.description = "python bench/rung_correlation.py", __doc__
    parser.add_argument("--configs", type=int, default=8, help="configurations trained to the full budget")
    parser.add_argument(
        "--evaluate-at", default="10,25,50", help="steps below the plan's trial_steps to evaluate at (and the end)"
    )
    args = parser.parse_args(argv)
    if args.configs < 3:
        raise UsageError(f"--configs {args.configs}: expected at least 3 (a rank correlation needs three)")
    args.name = args.name or f"rung-correlation-{'quick' if args.quick else args.plan}"
    args.rungs = "none"  # every configuration runs to the end
    plan, base, space = prepare(args)
    try:
        steps = tuple(int(step) for step in args.evaluate_at.split(","))
    except ValueError:
        raise UsageError(f"--evaluate-at {args.evaluate_at}: expected comma-separated steps") from None
    plan = replace(plan, training_trials=args.configs, rungs=(), extra_evaluations=steps)
    if not ray.is_initialized():
        start_ray(include_dashboard=True)
    sweep = Sweep(args, plan, base, space)
    sweep.training(sweep.earlier_stages())

    curves = trial_curves(sweep.experiment)
    table = correlation_table(curves, plan.reduction_factor)
    table.to_csv(sweep.experiment / "rung_correlation.csv", index=False)
    curves.to_csv(sweep.experiment / "curves.csv")
    pd.set_option("display.width", 200)
    print(f"\nJ&F on DAVIS '{args.tune_set}' per configuration (rows) and step (columns):")
    print(curves.round(4).to_string())
    print(f"\nRank agreement with the final step ({plan.trial_steps}), {len(curves)} configurations:")
    print(table.round(3).to_string(index=False))


if __name__ == "__main__":
    sys.exit(run(main, "rung_correlation"))
