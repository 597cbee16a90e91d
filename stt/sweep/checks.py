"""What the sweep checks before Ray starts (`check_sweep_inputs`): every option and path it was given, and that the
experiment folder is the one the command means, a new sweep or the one `--resume` continues.

Found here a mistake costs a second. Found later it cost minutes or a wrong result: a missing --davis-root failed
inside Ray workers, its traceback repeated as they restarted; `--resume` of a folder that was not there started a
new sweep; and the same command without `--resume` carried on over an interrupted phase 1 or 4 (issue 28).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

from stt import checkpoint, published
from stt.config import Config, to_dict
from stt.data.layouts import DAVIS, DatasetError
from stt.data.plans import resolve_source
from stt.errors import UsageError
from stt.paths import check_apart
from stt.sweep.completion import RESUME
from stt.sweep.plans import SweepPlan
from stt.train import check_worker_count, flatten

# In the experiment folder: the inputs a sweep was started with, which continuing it must repeat.
INPUTS_FILE = "inputs.json"


def check_sweep_inputs(args: argparse.Namespace, plan: SweepPlan, base: Config) -> None:
    """Every option and path of the sweep, checked before Ray starts (path and stat checks, and the first masks of
    the DAVIS splits: milliseconds on the quick sweep), then the experiment folder: a new sweep's inputs are recorded
    in it (INPUTS_FILE) for a later --resume to be checked against. `args.init` naming a Ray Train checkpoint folder
    is replaced by the checkpoint.pt it holds."""
    check_worker_count(plan.workers_per_trial)  # the counts' lower bounds: plan_from_options (stt/sweep/cli.py)
    for option, check in (
        ("--data-root", lambda: resolve_source(args.data_root)),
        ("data.images", lambda: base.data.images and resolve_source(base.data.images, images=True)),
        ("--davis-root", lambda: DAVIS(args.davis_root, split=args.tune_set)),
        ("--davis-root", lambda: DAVIS(args.davis_root, split=args.report_set)),
    ):
        try:
            check()
        except DatasetError as error:
            raise DatasetError(f"{option}: {error}") from None
    if args.init:
        args.init = checkpoint.checkpoint_file(args.init, "--init")
        published.load_init(args.init, f"--init {args.init}", base.model.arch)
    experiment = Path(args.storage).absolute() / args.name
    check_apart(
        "--storage/--name",
        experiment,
        {"--data-root": args.data_root, "--davis-root": args.davis_root, "data.images": base.data.images},
    )
    check_experiment(experiment, args, sweep_inputs(args, plan, base))


def sweep_inputs(args: argparse.Namespace, plan: SweepPlan, base: Config) -> dict:
    """What a sweep's trials and results depend on, as JSON: the plan (trial counts included), the search space
    file's content, the data, the splits, --init and the base config."""
    local = {"data_root": args.data_root, "davis_root": args.davis_root}
    inputs = {
        **{key: value if checkpoint.is_uri(value) else str(Path(value).resolve()) for key, value in local.items()},
        "tune_set": args.tune_set,
        "report_set": args.report_set,
        "init": args.init and (args.init if checkpoint.is_uri(args.init) else str(Path(args.init).resolve())),
        "space": hashlib.sha256(Path(args.space).read_bytes()).hexdigest(),
        "plan": {key: value for key, value in asdict(plan).items() if key != "name"},  # the name repeats the options
        "config": to_dict(base),
    }
    return json.loads(json.dumps(inputs))  # tuples as lists, as they come back from the file


def check_experiment(experiment: Path, args: argparse.Namespace, inputs: dict) -> None:
    """The experiment folder is the one the command means: --resume continues a sweep stored there, started with
    the same inputs; without it a new sweep starts there, or a finished one is re-read (never an unfinished one
    continued: the docs promise the resume line for that)."""
    recorded = experiment / INPUTS_FILE
    stored = json.loads(recorded.read_text()) if recorded.is_file() else None
    work = experiment.is_dir() and any(entry.name != INPUTS_FILE for entry in experiment.iterdir())
    state_file = experiment / "state.json"
    finished = state_file.is_file() and "yardsticks" in json.loads(state_file.read_text())
    if args.resume and not work:
        raise UsageError(
            f"--resume: no sweep is stored at {experiment} to continue; expected the --storage and --name of an "
            "earlier run (without --resume a new sweep starts there)"
        )
    if work and not finished and not args.resume:
        raise UsageError(f"{experiment}: an unfinished sweep is stored there; {RESUME}, or give a new --name")
    if work and stored is not None:
        was, now = flatten(stored), flatten(inputs)
        differing = [key for key in {**was, **now} if was.get(key) != now.get(key)]
        if differing:
            changes = ", ".join(
                "space: the file's content" if key == "space" else f"{key}: {was.get(key)!r} -> {now.get(key)!r}"
                for key in differing[:6]
            )
            raise UsageError(
                f"{experiment}: the sweep stored there was started with other inputs ({changes}); "
                "run the same command to continue it, or give a new --name"
            )
    try:
        experiment.mkdir(parents=True, exist_ok=True)
        if not os.access(experiment, os.W_OK):
            raise PermissionError("not writable")
        if not work:
            recorded.write_text(json.dumps(inputs, indent=1))
    except OSError as error:
        raise PermissionError(
            f"--storage {args.storage}: cannot write the experiment folder {experiment} "
            f"({' '.join(str(error).split())[:120]})"
        ) from None
