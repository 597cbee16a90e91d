"""The sweep's command line: `get_args_parser` and `main`, which checks the inputs before Ray starts, runs
the phases in order (stt.sweep.phases) and writes the outputs (stt.sweep.report)."""

from __future__ import annotations

import argparse
import ast
import time
from dataclasses import replace
from pathlib import Path

import ray

from stt.allocator import retain_freed_memory
from stt.command import parse_args
from stt.config import Config, load_config
from stt.data.synthetic import ensure_dataset
from stt.errors import InterruptedRun, UsageError
from stt.sweep.checks import check_sweep_inputs
from stt.sweep.completion import RESUME
from stt.sweep.phases import Sweep
from stt.sweep.plans import PLANS, SweepPlan
from stt.sweep.report import summary_paragraph, trials_table, write_plots
from stt.sweep.space import SPACE_FILE, load_space
from stt.train import start_ray


def get_args_parser() -> argparse.ArgumentParser:
    # The package's docstring (how the phases combine) is the command's description: read from its file, not
    # imported (the package imports this module).
    package_doc = ast.get_docstring(ast.parse(Path(__file__).with_name("__init__.py").read_text()), clean=False)
    parser = argparse.ArgumentParser(
        prog="python tune/sweep.py", description=package_doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a sweep that finishes in minutes on a laptop (same as --plan quick)"
    )
    parser.add_argument(
        "--plan",
        choices=list(PLANS),
        default="local",
        help="how much to run: quick (minutes), laptop (about two hours on real video, 2 cores), local (hours)",
    )
    parser.add_argument("--samples", type=int, help="training trials (default: the plan's)")
    parser.add_argument("--propagation-samples", type=int, help="propagation trials (default: the plan's)")
    parser.add_argument(
        "--trial-steps", type=int, help="steps of a training trial run to the end (default: the plan's)"
    )
    parser.add_argument(
        "--rungs",
        help="ASHA's rungs, comma-separated steps below --trial-steps, geometric with the plan's reduction factor, "
        "e.g. 25,50 (default: the plan's; 'none': no early stopping)",
    )
    parser.add_argument(
        "--confirm-seeds",
        type=int,
        help="new seeds with which the tuned training and the untuned defaults are each retrained and compared on "
        "the reported split (default: the plan's: 2 quick, 3 laptop and local)",
    )
    parser.add_argument("--space", default=str(SPACE_FILE), help="search space YAML (default: stt/sweep/space.yaml)")
    parser.add_argument(
        "--storage",
        default="sweeps",
        help="experiment folder root, a file system path (on a cluster: a shared mount) (default: ./sweeps)",
    )
    parser.add_argument("--name", help="experiment name (default: the plan's name); with --resume, the one to continue")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted sweep: finished trials are kept, not rerun"
    )
    parser.add_argument(
        "--data-root", default="", help="YouTube-VOS root or Parquet shards (default: embedded synthetic)"
    )
    parser.add_argument(
        "--davis-root", default="", help="DAVIS-2017 root for tuning and reporting (default: embedded synthetic)"
    )
    parser.add_argument("--tune-set", default="train", help="DAVIS split tuned on (default: train)")
    parser.add_argument("--report-set", default="val", help="DAVIS split reported, evaluated once (default: val)")
    parser.add_argument(
        "--init",
        default="",
        help="a checkpoint to start the training trials from instead of training "
        "the recipe's earlier stages (e.g. a spatial-stage one); with a one-stage recipe (vfs, "
        "temporal), the trials' initial weights",
    )
    parser.add_argument("--workers", type=int, help="Ray Train workers per training trial (default: 1)")
    parser.add_argument("--cpu", action="store_true", help="train on CPUs even if the cluster has GPUs")
    parser.add_argument("--config", help="YAML with base config sections; the space's keys are sampled on top")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.arch=resnet50")
    return parser


def plan_from_options(plan: SweepPlan, args: argparse.Namespace) -> SweepPlan:
    """The plan with the command line's changes; a bad value is one line naming the option."""
    options = {
        "--samples": ("training_trials", args.samples),
        "--propagation-samples": ("propagation_trials", args.propagation_samples),
        "--trial-steps": ("trial_steps", args.trial_steps),
        "--confirm-seeds": ("confirm_seeds", args.confirm_seeds),
        "--workers": ("workers_per_trial", args.workers),
    }
    changes = {}
    for option, (field, value) in options.items():
        if value is not None:
            if value < 1:
                raise UsageError(f"{option} {value}: expected an integer >= 1")
            changes[field] = value
    if args.rungs is not None:
        try:
            changes["rungs"] = () if args.rungs == "none" else tuple(int(step) for step in args.rungs.split(","))
        except ValueError:
            raise UsageError(f"--rungs {args.rungs}: expected comma-separated steps such as 25,50, or none") from None
    given = " ".join(f"{option} {value}" for option, (_, value) in options.items() if value is not None)
    given += f" --rungs {args.rungs}" if args.rungs is not None else ""
    return replace(plan, **changes, name=f"{plan.name} {given}".strip())


def prepare(args: argparse.Namespace) -> tuple[SweepPlan, Config, dict]:
    """The plan, the base configuration and the search space of a parsed command line, every value checked
    (before Ray starts); the data roots made absolute (Ray's workers run in folders of their own) or the embedded
    default's."""
    args.plan = "quick" if args.quick else args.plan
    plan = plan_from_options(PLANS[args.plan], args)
    args.name = args.name or args.plan
    if "://" in args.storage:
        raise ValueError(
            f"--storage {args.storage}: the sweep keeps its Optuna study (SQLite), feature cache and "
            "trial runs in a folder; give a local path, or on a cluster a file system every node mounts "
            "(docs/cluster.md)"
        )
    if args.tune_set == args.report_set:
        raise ValueError(
            f"--tune-set and --report-set are both '{args.tune_set}': tuning on the reported split is "
            "what this tool exists to prevent"
        )
    base = load_config(args.config, [*plan.overrides, *args.overrides])
    space = load_space(Path(args.space), base)
    args.data_root = str(Path(args.data_root).absolute()) if args.data_root else str(ensure_dataset("ytvos"))
    args.davis_root = str(Path(args.davis_root).absolute()) if args.davis_root else str(ensure_dataset("davis"))
    base.data.root = args.data_root
    return plan, base, space


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    retain_freed_memory()  # phase 3 extracts features and builds graphs here: stt.allocator
    plan, base, space = prepare(args)
    check_sweep_inputs(args, plan, base)  # every path and the experiment folder, before Ray starts
    if not ray.is_initialized():
        # The dashboard must run: without it, ASHA-stopped trials leak their Train workers' resources.
        start_ray(include_dashboard=True)
    started = time.perf_counter()
    sweep = Sweep(args, plan, base, space)
    # Watching live: the studies' trials, intermediate J&F and pruning, while the sweep runs.
    print(
        f"sweep: watch the studies live (pip install -e '.[dashboard]'): "
        f"optuna-dashboard sqlite:///{(sweep.experiment / 'optuna.db').resolve()}"
    )
    phase = sweep.first_phase
    try:  # Ctrl-C inside a phase's fit() is told by its checks; anywhere else, it lands here
        init_checkpoint = sweep.earlier_stages()
        phase = "phase 2/5 (training trials)"
        best_training = sweep.training(init_checkpoint)
        phase = "phase 3/5 (propagation trials)"
        best_propagation = sweep.propagation(best_training)
        phase = "phase 4/5 (the report)"
        sweep.report(best_training, best_propagation)
        phase = "phase 5/5 (the confirmation)"
        sweep.confirmation(init_checkpoint, best_training, best_propagation)
        phase = "the yardsticks"
        sweep.yardsticks(best_training)
    except KeyboardInterrupt:
        raise InterruptedRun(f"{phase} interrupted; {RESUME}") from None

    table = trials_table(sweep.experiment, sweep.state)
    table.to_parquet(sweep.experiment / "trials.parquet")
    table.to_csv(sweep.experiment / "trials.csv", index=False)
    write_plots(sweep.experiment, table)
    summary = summary_paragraph(args, sweep.state, table)
    (sweep.experiment / "summary.md").write_text(summary + "\n")
    print("\n" + summary)
    print(
        f"\nbest configuration: {sweep.experiment / 'best.yaml'}   trials: {sweep.experiment / 'trials.csv'}   "
        f"({time.perf_counter() - started:.0f} s)"
    )
    return {"state": sweep.state, "table": table, "experiment": sweep.experiment}
