"""What a finished sweep writes: the trials table (trials.parquet, trials.csv), the plots, and summary.md
with the result beside its yardsticks."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # plots are files; no display needed
import matplotlib.pyplot as plt
import optuna
import pandas as pd
from optuna.trial import TrialState

from stt.sweep.confirmation import confirmation_table
from stt.sweep.trials import optuna_storage


def trials_table(experiment: Path, state: dict) -> pd.DataFrame:
    """Every trial of both kinds from the Optuna studies: config, tuning J&F, state, steps, cost."""
    storage = optuna_storage(experiment)
    rows = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        # WAITING trials never ran (a restored searcher re-enqueues its start point): not trials.
        for trial in study.get_trials(deepcopy=False, states=[s for s in TrialState if s != TrialState.WAITING]):
            steps = max(trial.intermediate_values) if trial.intermediate_values else None
            value = trial.value if trial.value is not None else trial.intermediate_values.get(steps)
            seconds = (
                (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
            )
            rows.append(
                {
                    "kind": summary.study_name,
                    "number": trial.number,
                    "state": trial.state.name,
                    "tuning_jf": value,
                    "steps": steps,
                    "seconds": seconds,
                    **trial.params,
                    **trial.user_attrs,  # propagation trials: graph (served, or why not), graph_fallback_fraction
                }
            )
    table = pd.DataFrame(rows)
    if "final" in state and len(table):
        # The reported split is evaluated once, for the chosen configuration only.
        best = state["best_propagation"]["params"]
        chosen = (table["kind"] == "propagation") & (table["tuning_jf"] == state["best_propagation"]["tuning_jf"])
        for key, value in best.items():
            chosen &= table[key] == value
        table["reported_jf"] = table["tuning_jf"].where(~chosen, state["final"]["reported_jf"]).where(chosen)
    extra = [
        {"kind": "yardstick", "yardstick": name, "state": "COMPLETE", "reported_jf": row["J&F"]}
        for name, row in state.get("yardsticks", {}).items()
    ]
    extra += [  # one row per confirmation run and propagation: the paired table's cells, seed by seed
        {
            "kind": "confirmation",
            "arm": run["arm"],
            "seed": run["seed"],
            "propagation": propagation,
            "state": "COMPLETE",
            "reported_jf": evaluation["summary"]["J&F-Mean"],
            "reported_j": evaluation["summary"]["J-Mean"],
            "reported_f": evaluation["summary"]["F-Mean"],
            "checkpoint": run["checkpoint"],
        }
        for run in state.get("confirmation", {}).get("runs", [])
        for propagation, evaluation in run["evaluations"].items()
    ]
    return pd.concat([table, pd.DataFrame(extra)], ignore_index=True) if extra else table


def write_plots(experiment: Path, table: pd.DataFrame) -> list[Path]:
    """Optimisation history, parameter importance and J&F against each parameter, per trial kind."""
    out = experiment / "plots"
    out.mkdir(exist_ok=True)
    written = []
    storage = optuna_storage(experiment)
    studies = {summary.study_name for summary in optuna.get_all_study_summaries(storage)}
    for kind in [kind for kind in table["kind"].unique() if kind in studies] if len(table) else []:
        study = optuna.load_study(study_name=kind, storage=storage)
        finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
        optuna.visualization.matplotlib.plot_optimization_history(study)
        written.append(save_figure(out / f"{kind}-history.png"))
        if len(finished) >= 2 and len({tuple(sorted(t.params.items())) for t in finished}) >= 2:
            # PED-ANOVA needs no scikit-learn (fANOVA does).
            optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
            )
            written.append(save_figure(out / f"{kind}-importance.png"))
        rows = table[table["kind"] == kind]
        params = [c for c in rows.columns if "." in c and rows[c].notna().any()]
        _, axes = plt.subplots(1, max(1, len(params)), figsize=(3.2 * max(1, len(params)), 3), squeeze=False)
        for axis, param in zip(axes[0], params):
            categorical = rows[param].dtype == object
            for state, marker in (("COMPLETE", "o"), ("PRUNED", "x")):
                subset = rows[(rows["state"] == state) & rows[param].notna() & rows["tuning_jf"].notna()]
                if len(subset):
                    x = subset[param].astype(str) if categorical else subset[param]
                    axis.scatter(x, subset["tuning_jf"], marker=marker, label=state.lower())
            axis.set_xlabel(param)
            axis.set_ylabel("tuning J&F")
        axes[0][0].legend(fontsize=7)
        written.append(save_figure(out / f"{kind}-jf-vs-params.png"))
    return written


def save_figure(path: Path) -> Path:
    plt.tight_layout()
    plt.savefig(path, dpi=110)
    plt.close("all")
    return path


def describe(params: dict) -> str:
    """{"temporal.alpha": 123.456} -> "alpha=123.5": parameters as a summary names them."""
    return ", ".join(
        f"{key.split('.', 1)[1]}={value:.4g}" if isinstance(value, float) else f"{key.split('.', 1)[1]}={value}"
        for key, value in params.items()
    )


def summary_paragraph(args: argparse.Namespace, state: dict, table: pd.DataFrame) -> str:
    training, propagation, final = state["best_training"], state["best_propagation"], state["final"]
    searched = table[table["kind"].isin(["training", "propagation"])] if len(table) else table
    counts = searched.groupby(["kind", "state"]).size().to_dict() if len(searched) else {}
    trials = ", ".join(f"{n} {kind} {status.lower()}" for (kind, status), n in sorted(counts.items()))
    return (
        f"Sweep '{args.name}' ran {trials} trials. The best training trial ({describe(training['params'])}) reached "
        f"J&F {training['tuning_jf']:.3f} on the tuning split (DAVIS '{args.tune_set}', default propagation). "
        f"Searching propagation on its cached features moved the tuning J&F from "
        f"{propagation['default_tuning_jf']:.3f} (DESIGN.md defaults) to {propagation['tuning_jf']:.3f} "
        f"({describe(propagation['params'])}). Evaluated once on the reported split (DAVIS '{args.report_set}'), the "
        f"chosen configuration scores J&F {final['reported_jf']:.3f} (J {final['summary']['J-Mean']:.3f}, "
        f"F {final['summary']['F-Mean']:.3f}): that is the result; tuning-split numbers are optimistic by "
        "construction. "
        f"Frames were fed at short side <= {final['max_short_side']}. Configuration: best.yaml."
        + yardstick_table(args, state)
        + (
            confirmation_table(state["confirmation"], args.report_set, final["max_short_side"])
            if "confirmation" in state
            else ""
        )
    )


def yardstick_table(args: argparse.Namespace, state: dict) -> str:
    """The result beside its yardsticks (the sweep's `yardsticks` phase), as a Markdown table and one verdict."""
    final, yardsticks = state["final"], state.get("yardsticks")
    if not yardsticks:
        return ""
    summary = final["summary"]
    lines = [
        f"\n\n| on DAVIS '{args.report_set}', short side <= {final['max_short_side']} | J&F | J | F |",
        "|---|---|---|---|",
        (
            f"| **tuned** (training + propagation search) | **{final['reported_jf']:.3f}** "
            f"| {summary['J-Mean']:.3f} | {summary['F-Mean']:.3f} |"
        ),
    ]
    lines += [f"| {name} | {row['J&F']:.3f} | {row['J']:.3f} | {row['F']:.3f} |" for name, row in yardsticks.items()]
    lines.append(
        "\nOne run each: whether the tuned configuration beats the untuned defaults is the confirmation's to say."
    )
    return "\n".join(lines)
