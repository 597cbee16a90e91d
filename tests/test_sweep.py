"""stt.sweep (tune/sweep.py): search space, the PRUNED bookkeeping, tiny end-to-end sweeps with ASHA and --resume."""

import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
from optuna.trial import TrialState
from ray import tune

import stt.sweep.cli
from stt.checkpoint import load as load_checkpoint
from stt.command import run
from stt.config import load_config
from stt.data.synthetic import generate
from stt.errors import InterruptedRun, UsageError
from stt.recipes import stage_spec
from stt.sweep import PLANS, SPACE_FILE, load_space, main
from stt.sweep.completion import fit_in_driver
from stt.sweep.space import training_groups, tuned_stage
from stt.sweep.trials import PrunedAwareOptunaSearch, cluster_concurrency, driving_trial_resources

ENTRY_POINT = Path(__file__).resolve().parents[1] / "tune" / "sweep.py"


def test_default_space_covers_losses_and_propagation():
    space = load_space(SPACE_FILE)
    assert {"temporal.alpha", "temporal.beta", "temporal.entropy_threshold", "temporal.entropy"} <= set(
        space["training"]
    )
    assert {
        "propagation.topk",
        "propagation.temperature",
        "propagation.context",
        "propagation.radius",
        "propagation.aggregation",
    } <= set(space["propagation"])


TEMPORAL = {"temporal.alpha", "temporal.entropy_threshold", "temporal.entropy", "temporal.entropy_window"}
VFS = {"vfs.lr", "vfs.weight_decay", "vfs.color_aug"}


@pytest.mark.parametrize(
    "overrides, keys",
    [
        ([], TEMPORAL | {"temporal.beta"}),  # the default recipe distils the spatial stage's correlations
        (["train.recipe=spatial-then-temporal-no-gc"], TEMPORAL),  # no teacher: beta would change nothing
        (["temporal.beta=0"], TEMPORAL),  # beta 0 turns the teacher off in the default recipe too
        (["train.recipe=temporal"], TEMPORAL),
        (["train.recipe=spatial-then-temporal-lwf"], TEMPORAL | {"train.lwf_weight", "train.lwf_temperature"}),
        (["train.recipe=spatial-then-temporal-ewc"], TEMPORAL | {"train.ewc_weight"}),
        (["train.recipe=vfs"], VFS),
        (["train.recipe=vfs", "vfs.negatives=true"], VFS | {"spatial.temperature"}),
        (["train.recipe=vfs", "vfs.sampling=continuous"], VFS | {"vfs.interval"}),
    ],
)
def test_training_trials_sample_the_groups_of_the_recipes_last_stage(overrides, keys):
    """Which entries of the default space a training trial samples, per recipe (no Ray: load_space only)."""
    base = load_config(None, overrides)
    space = load_space(SPACE_FILE, base)
    assert set(space["training"]) == keys
    assert training_groups(stage_spec(base, tuned_stage(base)))[0] == ("vfs" if "vfs" in str(overrides) else "temporal")


@pytest.mark.parametrize(
    "recipe, last",
    [
        ("spatial", "spatial"),
        ("temporal-then-spatial", "spatial"),
        ("temporal-then-spatial-ewc", "spatial"),
        ("spatiotemporal", "spatiotemporal"),
    ],
)
def test_a_recipe_whose_last_stage_cannot_be_tuned_is_refused_in_one_line(recipe, last, tmp_path, stderr, monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError("the recipe was checked after the sweep started its work")

    monkeypatch.setattr(stt.sweep.cli, "start_ray", too_late)
    monkeypatch.setattr(stt.sweep.cli, "ensure_dataset", too_late)
    assert run(main, "sweep", ["--quick", "--storage", str(tmp_path), f"train.recipe={recipe}"]) == 2
    err = stderr().strip()
    assert err == (
        f"sweep: error: train.recipe={recipe}: the sweep tunes a recipe's last stage, which must be one of "
        "temporal, vfs (the stages its search space has groups for); "
        f"this recipe ends with the {last} stage"
    )


IN_TEMPORAL = "training:\n  temporal:\n    "  # a space file's text up to an entry of the temporal group


@pytest.mark.parametrize(
    "text, message",
    [
        (
            IN_TEMPORAL + "temporal.alpah: {uniform: [1, 2]}\n",
            r"training.temporal: temporal.alpah: uniform \[1, 2\]: unknown config key 'temporal.alpah'",
        ),
        (
            IN_TEMPORAL + "temporal.alpha: {normal: [1, 2]}\n",
            r"training.temporal: temporal.alpha: expected one of \['choice', 'loguniform'",
        ),
        (
            "propagation:\n  propagation.topk: {choice: [2.5, 3]}\n",
            r"propagation: propagation.topk: choice \[2.5, 3\]: expected an integer, got 2.5",
        ),
        ("sampling:\n  temporal.alpha: {uniform: [1, 2]}\n", "expected sections"),
        (
            IN_TEMPORAL + "temporal.alpha: {uniform: [10, 1]}\n",
            r"training.temporal: temporal.alpha: uniform \[10, 1\]: expected low < high",
        ),
        (
            IN_TEMPORAL + "temporal.alpha: {loguniform: [0, 10]}\n",
            r"temporal.alpha: loguniform \[0, 10\]: expected 0 < low < high",
        ),
        (
            "propagation:\n  propagation.topk: {randint: [5, 5]}\n",
            r"propagation: propagation.topk: randint \[5, 5\]: expected low < high .*empty range",
        ),
        (
            IN_TEMPORAL + "temporal.entropy: {choice: []}\n",
            r"temporal.entropy: choice \[\]: expected at least one value",
        ),
        (
            IN_TEMPORAL + "temporal.entropy: {choice: [neglog, bogus]}\n",
            r"temporal.entropy: choice \['neglog', 'bogus'\]: expected one of \('neglog', 'shannon'.*\), got 'bogus'",
        ),
        (
            "propagation:\n  propagation.topk: {choice: [0, 5]}\n",
            r"propagation: propagation.topk: choice \[0, 5\]: expected a positive value, got 0",
        ),
        (
            IN_TEMPORAL + "temporal.entropy_threshold: {uniform: [0.5, 1.5]}\n",
            r"uniform \[0.5, 1.5\]: expected a kept fraction in \(0, 1\], got 1.5",
        ),
        (
            "propagation:\n  temporal.alpha: {uniform: [1, 2]}\n",
            "propagation: temporal.alpha: the propagation section samples propagation.. keys only",
        ),
        (
            IN_TEMPORAL + "propagation.topk: {choice: [5, 10]}\n",
            "training.temporal: propagation.topk: propagation.. keys belong under 'propagation'",
        ),
        (IN_TEMPORAL + "temporal.alpha: {uniform: 5}\n", r"temporal.alpha: uniform 5: expected a list of arguments"),
        (
            IN_TEMPORAL + "temporal.alpha: {uniform: [1, 2, 3]}\n",
            r"uniform \[1, 2, 3\]: expected \[low, high\], two numbers",
        ),
        (
            "propagation:\n  propagation.topk: {uniform: [1, 20]}\n",
            "propagation.topk is an integer: expected randint or choice",
        ),
        ("training:\n  temporal: {uniform: [1, 2]}\n", r"training.temporal: uniform: expected one of \['choice'"),
        ("training:\n  temporal: [temporal.alpha]\n", "training.temporal: expected a mapping of config keys"),
        ("training: [temporal.alpha]\n", "training: expected a mapping of stage groups to entries"),
        # the format before groups: a key where a group belongs
        (
            "training:\n  temporal.alpha: {uniform: [1, 2]}\n",
            (
                "training.temporal.alpha: expected groups of entries named after the stage they tune, one of "
                r"temporal, temporal.teacher, temporal.lwf, temporal.ewc, vfs, vfs.negatives, vfs.continuous "
                r"\(see the default space file, space.yaml\)"
            ),
        ),
        ("training:\n  spatial:\n    spatial.lr: {uniform: [0.01, 0.1]}\n", "training.spatial: expected groups"),
        # a group that does not apply is validated too
        (
            "training:\n  vfs:\n    vfs.lr: {uniform: [0, 0.1]}\n",
            r"training.vfs: vfs.lr: uniform \[0, 0.1\]: expected a positive value, got 0",
        ),
        (
            IN_TEMPORAL
            + "temporal.beta: {uniform: [1, 2]}\n  temporal+teacher:\n    temporal.beta: {uniform: [1, 2]}\n",
            (
                "training.temporal.teacher: temporal.beta: also in another group that applies to "
                "train.recipe=spatial-then-temporal; sample each key in one group"
            ),
        ),
    ],
)
def test_bad_space_files_name_the_file_and_entry(tmp_path, text, message):
    """Every mistake in a search space is one line naming the file, the entry and what was expected, before Ray
    starts."""
    path = tmp_path / "space.yaml"
    path.write_text(text)
    with pytest.raises(UsageError, match=message) as raised:
        load_space(path, load_config())
    assert str(raised.value).startswith(f"{path}: ") and "\n" not in str(raised.value)


def test_space_values_are_checked_against_the_base_config(tmp_path):
    """A value is applied to the sweep's own base config, as a trial applies it."""
    path = tmp_path / "space.yaml"
    path.write_text("training:\n  temporal:\n    temporal.entropy_threshold: {uniform: [0.5, 0.9]}\n")
    assert load_space(path, load_config())["training"]["temporal.entropy_threshold"].upper == 0.9
    path.write_text("training:\n  temporal:\n    temporal.alpha: {randint: [0, 3]}\n")
    assert load_space(path)["training"]["temporal.alpha"].lower == 0  # an integer range for a float key is fine


def test_a_bad_space_file_stops_the_command_line_in_one_line(tmp_path, stderr, monkeypatch):
    def too_late(*args, **kwargs):  # Ray may already run in this test session: the check must come first
        raise AssertionError("the space was checked after the sweep started its work")

    monkeypatch.setattr(stt.sweep.cli, "start_ray", too_late)
    monkeypatch.setattr(stt.sweep.cli, "ensure_dataset", too_late)
    path = tmp_path / "space.yaml"
    path.write_text("training:\n  temporal.alpha: {loguniform: [0, 10]}\n")
    assert run(main, "sweep", ["--quick", "--space", str(path), "--storage", str(tmp_path)]) == 2
    err = stderr().strip()
    assert err.startswith("sweep: error: ") and str(path) in err and "\n" not in err


def test_asha_stopped_trials_are_pruned_not_complete(tmp_path):
    """Ray's OptunaSearch would record an early-stopped trial's partial J&F as a final value."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.db'}")
    search = PrunedAwareOptunaSearch(
        space={"temporal.alpha": tune.loguniform(1, 10)},
        metric="jf",
        mode="max",
        seed=0,
        study_name="s",
        storage=storage,
        full_steps=12,
    )
    for trial_id, last_step in (("stopped", 6), ("finished", 12)):
        assert search.suggest(trial_id)["temporal.alpha"] > 0
        search.on_trial_result(trial_id, {"jf": 0.25, "step": 6, "training_iteration": 1})
        # ASHA's stopping result and the final one reach only on_trial_complete
        search.on_trial_complete(trial_id, {"jf": 0.5, "step": last_step, "training_iteration": last_step // 6})
    stopped, finished = optuna.load_study(study_name="s", storage=storage).trials
    assert stopped.state == TrialState.PRUNED and stopped.intermediate_values == {6: 0.25}
    assert finished.state == TrialState.COMPLETE and finished.value == 0.5
    assert finished.intermediate_values == {6: 0.25, 12: 0.5}


def test_tuning_on_the_reported_split_is_refused():
    with pytest.raises(ValueError, match="tuning on the reported split"):
        main(["--quick", "--tune-set", "val", "--report-set", "val"])


def test_object_store_storage_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="--storage s3://bucket/sweeps: the sweep keeps its Optuna study"):
        main(["--storage", "s3://bucket/sweeps"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--confirm-seeds", "0"], "--confirm-seeds 0: expected an integer >= 1"),
        (["--confirm-seeds", "-3"], "--confirm-seeds -3: expected an integer >= 1"),
        (["--samples", "0"], "--samples 0: expected an integer >= 1"),
        (["--samples", "-1"], "--samples -1: expected an integer >= 1"),
        (
            ["--plan", "laptop", "--trial-steps", "40"],
            "--plan laptop --trial-steps 40: rungs [50] exceed its trial_steps 40",
        ),
        (
            ["--plan", "laptop", "--rungs", "25,50,200"],
            "--plan laptop --rungs 25,50,200: rungs [25, 50, 200] exceed its trial_steps 100",
        ),
        (
            ["--plan", "laptop", "--rungs", "20,30"],
            "--plan laptop --rungs 20,30: rungs [20, 30] are not ASHA's for a first rung of 20, reduction factor 3",
        ),
        (["--rungs", "a,b"], "--rungs a,b: expected comma-separated steps"),
    ],
)
def test_bad_plan_options_are_one_line_before_anything_starts(argv, message, stderr):
    """A plan's counts, rungs and seeds are checked when the plan is made, before Ray or any data."""
    assert run(main, "sweep", argv) == 2
    err = stderr()
    assert err.startswith(f"sweep: error: {message}") and err.count("\n") == 1, err


def test_plans_rungs_are_ashas_milestones():
    from stt.sweep.plans import asha_milestones

    assert asha_milestones(25, 2, 100) == [25, 50] and asha_milestones(6, 2, 12) == [6]
    assert asha_milestones(100, 3, 300) == [100] and asha_milestones(10, 3, 100) == [10, 30, 90]
    for plan in PLANS.values():  # every named plan is valid (made at import) and evaluates at its rungs and end
        assert plan.evaluations == (*plan.rungs, plan.trial_steps)
    assert PLANS["laptop"].confirm_seeds == 3 and PLANS["quick"].confirm_seeds == 2


def test_the_best_training_trial_is_chosen_among_those_that_ran_the_full_budget():
    from types import SimpleNamespace

    from stt.sweep.phases import best_result

    def trial(trial_id, step, jf):
        return SimpleNamespace(metrics={"trial_id": trial_id, "step": step, "tuning_jf": jf})

    # the laptop sweep's case: a trial ASHA stopped at step 50 scored above every full run at step 100
    stopped, full, better_full = trial("a", 50, 0.314), trial("b", 100, 0.294), trial("c", 100, 0.308)
    assert best_result([stopped, full, better_full], full_steps=100) is better_full
    assert best_result([stopped, full, better_full]) is stopped  # propagation trials have no budget to compare
    with pytest.raises(RuntimeError, match="at step 100"):
        best_result([stopped], full_steps=100)


def test_paired_bootstrap_by_hand():
    """The observed difference is the official J&F's (object means of J and F, averaged) difference, averaged
    over seeds; resampling never leaves the range the seeds' and sequences' differences span."""
    from stt.sweep.confirmation import paired_bootstrap, verdict

    def rows(values):  # {sequence: [(J, F) per object]}
        return [
            {"sequence": seq, "object": i + 1, "J-Mean": j, "F-Mean": f}
            for seq, objects in values.items()
            for i, (j, f) in enumerate(objects)
        ]

    tuned = [
        rows({"a": [(0.6, 0.4)], "b": [(0.8, 0.6), (0.2, 0.0)]}),
        rows({"a": [(0.7, 0.5)], "b": [(0.8, 0.6), (0.2, 0.2)]}),
    ]
    base = [
        rows({"a": [(0.5, 0.3)], "b": [(0.7, 0.5), (0.2, 0.0)]}),
        rows({"a": [(0.5, 0.5)], "b": [(0.8, 0.6), (0.2, 0.2)]}),
    ]
    # seed 1: tuned J&F = ((0.6+0.8+0.2)/3 + (0.4+0.6+0.0)/3)/2 = 0.4333; base = ((1.4/3) + (0.8/3))/2 = 0.3667
    # seed 2: tuned = ((1.7/3) + (1.3/3))/2 = 0.5; base = ((1.5/3) + (1.3/3))/2 = 0.4667; mean difference 0.05
    difference, low, high = paired_bootstrap(tuned, base, draws=2000)
    assert difference == pytest.approx(0.05)
    # per resample the difference lies between the smallest and largest per-(seed, sequence-set) difference:
    # sequence a alone: 0.1 (seed 1), 0.1 (seed 2); b alone: 0.05, 0.0
    assert 0.0 <= low <= difference <= high <= 0.1 + 1e-12
    same, low_same, high_same = paired_bootstrap(base, base, draws=100)
    assert same == low_same == high_same == 0.0
    assert verdict(0.01, 0.2) == "better" and verdict(-0.2, -0.01) == "worse"
    assert verdict(-0.01, 0.2) == "not distinguishable from the defaults"
    with pytest.raises(ValueError, match="same number"):
        paired_bootstrap(tuned, base[:1])


# The tiny sweeps' runs: the smallest inputs every stage accepts.
TINY = (
    "data.crop_size=32",
    "train.batch_size=2",
    "spatial.image_size=32",
    "spatial.queue_size=16",
    "vfs.image_size=32",
    "train.warmup_steps=1",
    "spatial.bn_splits=1",
    "data.decode_in_worker=true",
)


@pytest.mark.slow
def test_tiny_sweep_end_to_end_then_resume(ray_local, tmp_path, monkeypatch):
    data = generate(tmp_path / "data", preset="tiny", kinds=("davis", "ytvos"))
    small = replace(
        PLANS["quick"],
        training_trials=3,
        propagation_trials=3,
        earlier_steps=2,
        trial_steps=4,
        rungs=(2,),
        reduction_factor=2,
        confirm_seeds=2,
        overrides=TINY,
    )
    monkeypatch.setitem(PLANS, "quick", small)
    argv = [
        "--quick",
        "--storage",
        str(tmp_path / "sweeps"),
        "--name",
        "tiny",
        "--data-root",
        str(data["ytvos"]),
        "--davis-root",
        str(data["davis"]),
    ]
    result = main(argv)

    experiment, table = result["experiment"], result["table"]
    training, propagation = table[table["kind"] == "training"], table[table["kind"] == "propagation"]
    assert len(training) == 3 and set(training["state"]) <= {"COMPLETE", "PRUNED"}
    assert len(propagation) == 3 and set(propagation["state"]) == {"COMPLETE"}  # each asserted zero network calls
    # Each propagation trial records whether the graphs served it (then its fallback fraction) or why not. The space
    # lists its contexts and radii, so each served trial met the graph of exactly its own: nothing fell back.
    served = propagation["graph"] == "served"
    assert propagation["graph"].notna().all()
    fallback = propagation.reindex(columns=["graph_fallback_fraction"])["graph_fallback_fraction"]  # NaN if none
    assert (fallback[served] == 0).all() and fallback[~served].isna().all()
    assert (propagation.loc[~served, "propagation.aggregation"] == "per-frame").all()
    stored = pd.read_parquet(experiment / "trials.parquet")
    assert stored.loc[stored["kind"].isin(["training", "propagation"]), "tuning_jf"].notna().all()
    # Yardsticks beside the result, on the reported split: the tuned training with default propagation,
    # random init, Lab pixels, the copied first mask.
    yardsticks = stored[stored["kind"] == "yardstick"].set_index("yardstick")["reported_jf"]
    assert set(yardsticks.index) == {
        "tuned training, default propagation",
        "random init",
        "Lab pixels (stride 8)",
        "first mask copied",
    }
    assert yardsticks.between(0, 1).all()
    # The confirmation: both arms retrained with 2 new seeds, each evaluated under both propagations.
    confirmation = stored[stored["kind"] == "confirmation"]
    assert len(confirmation) == 8 and set(confirmation["seed"]) == {1, 2}
    assert set(zip(confirmation["arm"], confirmation["propagation"])) == {
        (arm, propagation) for arm in ("defaults", "tuned") for propagation in ("default", "tuned")
    }
    assert confirmation["reported_jf"].between(0, 1).all()
    differences = result["state"]["confirmation"]["differences"]
    for difference in differences.values():
        assert difference["low"] <= difference["difference"] <= difference["high"]
    summary_text = (experiment / "summary.md").read_text()
    assert "**Confirmation** (2 new seeds per arm: 1, 2;" in summary_text
    verdict = differences["tuned configuration vs defaults"]["verdict"]
    assert f"the tuned configuration (training and propagation) is **{verdict}**" in summary_text
    assert (experiment / "trials.csv").is_file() and summary_text.count("reported split") == 1
    assert any((experiment / "plots").glob("*-history.png"))
    best = load_config(experiment / "best.yaml")  # what `stt.train --config` and `stt.evaluate --config` accept
    chosen = result["state"]["best_propagation"]["params"]
    assert best.propagation.topk == chosen["propagation.topk"]
    assert result["state"]["final"]["summary"]["J&F-Mean"] == result["state"]["final"]["reported_jf"]

    # An interrupted sweep: phases 3-4 unfinished, their Tune experiment on disk. --resume must not
    # rerun any finished trial: the Optuna studies keep exactly the trials they had.
    state = json.loads((experiment / "state.json").read_text())
    for phase in ("best_propagation", "final", "confirmation"):
        state.pop(phase)
    (experiment / "state.json").write_text(json.dumps(state))
    confirmation_files = {p: p.stat().st_mtime_ns for p in (experiment / "confirmation-runs").rglob("*") if p.is_file()}
    resumed = main(argv + ["--resume"])
    assert len(resumed["table"]) == len(table)
    assert resumed["state"]["best_propagation"]["params"] == chosen
    # the finished confirmation runs are read back, not retrained or re-evaluated
    assert {p: p.stat().st_mtime_ns for p in confirmation_files} == confirmation_files
    assert resumed["state"]["confirmation"]["differences"] == result["state"]["confirmation"]["differences"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, stage, earlier, sampled",
    [
        ("vfs", "vfs", (), VFS),
        (
            "spatial-then-temporal-lwf",
            "temporal",
            ("spatial",),
            TEMPORAL | {"train.lwf_weight", "train.lwf_temperature"},
        ),
    ],
)
def test_tiny_sweep_of_another_recipe(ray_local, tmp_path, monkeypatch, recipe, stage, earlier, sampled):
    """The sweep follows train.recipe: phase 1 trains its stages before the last (none for vfs), the training
    trials and the confirmation's runs train its last stage with that stage's space groups, best.yaml keeps it."""
    data = generate(tmp_path / "data", preset="tiny", kinds=("davis", "ytvos"))
    small = replace(
        PLANS["quick"],
        training_trials=1,
        propagation_trials=1,
        earlier_steps=2,
        trial_steps=2,
        rungs=(),
        reduction_factor=2,
        confirm_seeds=1,
        overrides=TINY,
    )  # one of each: ~70 s (vfs), ~95 s (LwF)
    monkeypatch.setitem(PLANS, "quick", small)
    result = main(
        [
            "--quick",
            "--storage",
            str(tmp_path / "sweeps"),
            "--name",
            "tiny",
            "--data-root",
            str(data["ytvos"]),
            "--davis-root",
            str(data["davis"]),
            f"train.recipe={recipe}",
        ]
    )

    experiment, table, state = result["experiment"], result["table"], result["state"]
    training = table[table["kind"] == "training"]
    assert len(training) == 1 and set(training["state"]) == {"COMPLETE"}
    # the groups of the last stage only: no temporal.beta (LwF's recipe has no teacher), no temporal.* for VFS
    assert {column for column in training.columns if "." in column and training[column].notna().any()} == sampled
    assert load_checkpoint(state["best_training"]["checkpoint"])["stage"] == stage
    assert [p.name for p in experiment.iterdir() if p.name in ("spatial", "temporal", "vfs")] == list(earlier)
    assert state["init_checkpoint"] == (str(experiment / f"{earlier[-1]}-final.pt") if earlier else "")
    for confirmation_run in state["confirmation"]["runs"]:
        assert load_checkpoint(confirmation_run["checkpoint"])["stage"] == stage
    assert load_config(experiment / "best.yaml").train.recipe == recipe
    assert set(state["yardsticks"]) >= {"tuned training, default propagation", "random init"}


# A tiny sweep run through the real entry point, tune/sweep.py, in its own process (its own Ray), so that it can
# be sent Ctrl-C; the quick plan shrunk first (the entry point reads the package's PLANS).
DRIVER = """
import runpy, sys
from dataclasses import replace
from stt.sweep import PLANS
PLANS["quick"] = replace(PLANS["quick"], earlier_steps=2, trial_steps=4, rungs=(2,), reduction_factor=2,
    confirm_seeds=1,
    overrides=("data.crop_size=32", "train.batch_size=2", "spatial.image_size=32", "spatial.queue_size=16",
               "train.warmup_steps=1", "spatial.bn_splits=1", "data.decode_in_worker=true"))
from stt.train import start_ray
start_ray(num_cpus=2, include_dashboard=True)
sys.argv = [{entry_point!r}, *sys.argv[1:]]
runpy.run_path({entry_point!r}, run_name="__main__")
"""


def finished_training_trials(experiment: Path) -> list:
    """The training study's trials that ended (COMPLETE or PRUNED), read while the sweep writes the study."""
    try:
        study = optuna.load_study(study_name="training", storage=f"sqlite:///{experiment / 'optuna.db'}")
        return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    except Exception:  # noqa: BLE001 - not created yet, or locked by the writer for a moment
        return []


def tune_trials(path: Path) -> dict:
    """{trial id: (status, its result.json, empty for a trial not yet started)} of the Tune experiment at `path`."""

    def result(trial) -> bytes:
        file = Path(trial.path) / "result.json"
        return file.read_bytes() if file.is_file() else b""

    return {t.trial_id: (t.status, result(t)) for t in tune.ExperimentAnalysis(str(path)).trials}


@pytest.mark.slow
def test_ctrl_c_during_training_trials_stops_the_sweep_and_resume_finishes_it(tmp_path):
    """Ctrl-C in phase 2: Tune saves the experiment and returns the trials so far; the sweep must not choose
    among them and report a result. It stops with the resume line, and --resume runs the unfinished trials only."""
    import os
    import signal
    import subprocess
    import time

    data = generate(tmp_path / "data", preset="tiny", kinds=("davis", "ytvos"))
    experiment = tmp_path / "sweeps" / "tiny"
    argv = [
        sys.executable,
        "-c",
        DRIVER.format(entry_point=str(ENTRY_POINT)),
        "--quick",
        "--samples",
        "2",
        "--propagation-samples",
        "2",
        "--storage",
        str(tmp_path / "sweeps"),
        "--name",
        "tiny",
        "--data-root",
        str(data["ytvos"]),
        "--davis-root",
        str(data["davis"]),
        # Ray Data's reserved CPU makes a trial 1.5 of the 2 CPUs, so the trials run one after the other and Ctrl-C
        # lands while the second is still to come. Side by side, both finished before Ctrl-C on a loaded machine.
        "data.decode_in_worker=false",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out, err = (tmp_path / "first.out").open("w"), tmp_path / "first.err"  # files: a full pipe would stall the driver
    driver = subprocess.Popen(
        argv, cwd=ENTRY_POINT.parents[1], env=env, stdout=out, stderr=err.open("w"), start_new_session=True
    )
    try:
        deadline = time.monotonic() + 900
        while not finished_training_trials(experiment):
            assert driver.poll() is None, f"the sweep ended before a training trial finished: {err.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no training trial finished in 15 minutes"
            time.sleep(0.5)
        driver.send_signal(signal.SIGINT)  # Ctrl-C: to the driver, as a terminal sends it
        driver.wait(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    stderr = err.read_text()
    assert driver.returncode == 130, stderr[-3000:]
    assert re.search(
        r"^sweep: error: phase 2/5 interrupted after 1 of 2 training trials; "
        r"run the same command with --resume to continue$",
        stderr,
        re.MULTILINE,
    ), stderr[-3000:]
    assert not (experiment / "best.yaml").exists() and not (experiment / "summary.md").exists()
    assert set(json.loads((experiment / "state.json").read_text())) == {"init_checkpoint"}  # nothing final recorded
    before = tune_trials(experiment / "training")
    finished = {trial_id: result for trial_id, (status, result) in before.items() if status == "TERMINATED"}
    assert len(finished) == 1 and len(before) == 2, before.keys()
    (finished_id,) = finished
    trial_files = (experiment / "training-runs" / finished_id).rglob("*")
    checkpoints = {p: p.stat().st_mtime_ns for p in trial_files if p.is_file()}
    study_before = [(t.number, t.state, t.params) for t in finished_training_trials(experiment)]

    resumed = subprocess.run(
        [*argv, "--resume"],
        cwd=ENTRY_POINT.parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = tune_trials(experiment / "training")
    assert set(after) == set(before) and {status for status, _ in after.values()} == {"TERMINATED"}  # no trial added
    assert after[finished_id][1] == finished[finished_id]  # the finished trial did not run again
    assert {p: p.stat().st_mtime_ns for p in checkpoints} == checkpoints
    table = pd.read_csv(experiment / "trials.csv")
    training = table[table["kind"] == "training"]
    assert len(training) == 2 and set(training["state"]) <= {"COMPLETE", "PRUNED"}  # the plan: 2 training trials
    assert len(table[table["kind"] == "propagation"]) == 2
    study_after = [(t.number, t.state, t.params) for t in finished_training_trials(experiment)]
    assert len(study_after) == 2 and all(trial in study_after for trial in study_before)  # kept as they were
    assert (experiment / "best.yaml").is_file() and (experiment / "summary.md").is_file()


class FakeTrainer:
    """A stage the driver trains: fit() returns after `seconds` with its last step and a checkpoint."""

    def __init__(self, seconds: float, step: int):
        self.seconds, self.step = seconds, step

    def fit(self):
        import time

        time.sleep(self.seconds)
        return ray.train.Result(
            metrics={"step": self.step}, checkpoint=ray.train.Checkpoint("/tmp"), error=None, path="/tmp"
        )


def test_ctrl_c_while_the_driver_trains_a_stage_is_an_interrupted_run():
    """Ray Train's own Ctrl-C handler ends the process with status 0 or 1 and no word: the stage is fitted in a
    thread, where it installs none, and Ctrl-C becomes InterruptedRun naming the phase."""
    import os
    import signal
    import threading

    assert fit_in_driver(FakeTrainer(0.0, 4), "phase 1/5 (the spatial stage)", 4).metrics["step"] == 4
    with pytest.raises(
        InterruptedRun,
        match=r"^phase 1/5 \(the spatial stage\) stopped at step 2 of 4; "
        "run the same command with --resume",
    ):
        fit_in_driver(FakeTrainer(0.0, 2), "phase 1/5 (the spatial stage)", 4)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(
        InterruptedRun, match=r"^the yardsticks interrupted; run the same command with --resume to continue$"
    ):
        fit_in_driver(FakeTrainer(30.0, 4), "the yardsticks", 4)
    timer.join()


def test_overrides_after_an_option_reach_the_sweep(tmp_path, stderr, monkeypatch):
    """Issue 28: `tune/sweep.py --quick a=1 --storage S b=2` called b=2 an unrecognized argument."""

    def too_late(*args, **kwargs):
        raise AssertionError("the override was checked after the sweep started its work")

    monkeypatch.setattr(stt.sweep.cli, "start_ray", too_late)
    monkeypatch.setattr(stt.sweep.cli, "ensure_dataset", too_late)
    argv = ["--quick", "temporal.alpha=5", "--storage", str(tmp_path), "temporal.beta=inf"]
    assert run(main, "sweep", argv) == 2
    assert stderr() == "sweep: error: temporal.beta: expected a finite number, got 'inf'\n"


# ----------------------------------------------------------------------------------------- issue 28: before Ray
class RayStarted(Exception):
    """Raised in place of starting Ray, or of the sweep's first step when Ray already runs in this test session:
    every check before it passed."""


@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("sets"), preset="tiny", kinds=("davis", "ytvos"))


@pytest.fixture
def before_ray(monkeypatch):
    """The sweep's main up to the point where it would start Ray (nothing generated, no Ray)."""

    def started(*args, **kwargs):
        raise RayStarted

    def no_generation(*args, **kwargs):
        raise AssertionError("a default dataset was generated: give --data-root and --davis-root")

    monkeypatch.setattr(stt.sweep.cli, "start_ray", started)
    monkeypatch.setattr(stt.sweep.cli, "Sweep", started)  # Ray started by an earlier test: start_ray is skipped
    monkeypatch.setattr(stt.sweep.cli, "ensure_dataset", no_generation)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def sweep_argv(tiny_sets, storage, *extra) -> list[str]:
    roots = ["--data-root", str(tiny_sets["ytvos"]), "--davis-root", str(tiny_sets["davis"])]
    return ["--quick", "--storage", str(storage), "--name", "s", *roots, *extra]


@pytest.mark.parametrize(
    "extra, code, expected",
    [
        (["--workers", "999"], 2, "--workers 999: this machine has"),
        # found inside Ray workers, a DatasetError traceback repeated as they restarted, still running at 170 s
        (["--davis-root", "/nowhere/davis"], 1, "--davis-root: /nowhere/davis: "),
        (["--data-root", "/nowhere/videos"], 1, "--data-root: /nowhere/videos: not a shard folder"),
        (["--tune-set", "bogus"], 1, "--davis-root: "),
        (["--init", "/nowhere/spatial-final.pt"], 1, "--init /nowhere/spatial-final.pt: no such checkpoint file"),
    ],
)
def test_every_sweep_option_is_checked_before_ray_starts(
    tiny_sets, tmp_path, stderr, before_ray, extra, code, expected
):
    assert run(main, "sweep", sweep_argv(tiny_sets, tmp_path / "sweeps", *extra)) == code
    err = stderr()
    assert err.startswith(f"sweep: error: {expected}") and err.count("\n") == 1, err
    assert not (tmp_path / "sweeps" / "s").exists()  # nothing written


def test_sweep_storage_is_checked_before_ray_starts(tiny_sets, tmp_path, stderr, before_ray):
    blocked = tmp_path / "a-file"
    blocked.write_text("x")
    assert run(main, "sweep", sweep_argv(tiny_sets, blocked)) == 1
    assert stderr().startswith(f"sweep: error: --storage {blocked}: cannot write the experiment folder")
    inside = tiny_sets["davis"] / "sweeps"
    assert run(main, "sweep", sweep_argv(tiny_sets, inside)) == 2
    assert "lies inside the input --davis-root" in stderr() and not inside.exists()


def test_resume_needs_a_stored_sweep_with_the_same_inputs(tiny_sets, tmp_path, stderr, before_ray):
    """Issue 28: --resume of a storage path that did not exist started a fresh sweep; a fresh run over an unfinished
    one (phase 1 or 4 interrupted: no Tune experiment to notice) carried on instead of being refused."""
    storage, experiment = tmp_path / "sweeps", tmp_path / "sweeps" / "s"
    assert run(main, "sweep", sweep_argv(tiny_sets, storage, "--resume")) == 2
    assert stderr() == (
        f"sweep: error: --resume: no sweep is stored at {experiment} to continue; expected the --storage and --name "
        "of an earlier run (without --resume a new sweep starts there)\n"
    )
    assert not storage.exists()

    with pytest.raises(RayStarted):  # a new sweep: its inputs recorded
        main(sweep_argv(tiny_sets, storage))
    assert json.loads((experiment / "inputs.json").read_text())["plan"]["training_trials"] == 3
    with pytest.raises(RayStarted):  # nothing was run yet: starting again is starting anew
        main(sweep_argv(tiny_sets, storage))

    (experiment / "state.json").write_text(json.dumps({"init_checkpoint": "x", "best_training": {}}))  # phase 4 cut
    assert run(main, "sweep", sweep_argv(tiny_sets, storage)) == 2
    assert stderr() == (
        f"sweep: error: {experiment}: an unfinished sweep is stored there; run the same command with --resume to "
        "continue, or give a new --name\n"
    )
    with pytest.raises(RayStarted):
        main(sweep_argv(tiny_sets, storage, "--resume"))
    assert run(main, "sweep", sweep_argv(tiny_sets, storage, "--resume", "--samples", "5", "temporal.alpha=5")) == 2
    assert stderr().startswith(
        f"sweep: error: {experiment}: the sweep stored there was started with other inputs "
        "(plan.training_trials: 3 -> 5, config.temporal.alpha: 1000.0 -> 5.0); run the same command"
    )

    (experiment / "state.json").write_text(json.dumps({"yardsticks": {}}))  # finished: re-read without --resume
    with pytest.raises(RayStarted):
        main(sweep_argv(tiny_sets, storage))


def test_trial_lines_count_every_run_of_a_grid():
    from ray import tune

    from stt.sweep.phases import trial_count

    # the confirmation's space: 2 arms x 3 seeds, one sample each (its lines said "2/1 done" before)
    grid = {"arm": tune.grid_search(["tuned", "defaults"]), "seed": tune.grid_search([1, 2, 3])}
    assert trial_count(grid, 1) == 6
    assert trial_count({"propagation.topk": tune.choice([5, 10])}, 80) == 80


def test_propagation_trial_setup_reads_nothing(tmp_path):
    """Tune hands a pending trial to an actor that has just finished one and kills the actor still in `setup`
    for it: with half-second trials a setup that reads the split kept the sweep's phase 3 on one actor
    (BENCHMARKS.md, session 13). So setup only keeps its arguments, and the first step reads the split."""
    from stt.config import to_dict
    from stt.sweep.trials import PropagationTrial

    trial = object.__new__(PropagationTrial)  # the Trainable without Tune's actor machinery
    missing = tmp_path / "no-such-checkpoint.pt"
    sources = {"checkpoint": str(missing), "davis_root": str(tmp_path), "tune_set": "train"}
    PropagationTrial.setup(trial, {}, base=to_dict(load_config(None)), feature_cache=str(tmp_path), **sources)
    assert trial.videos is None
    with pytest.raises(Exception, match="no-such-checkpoint"):
        trial.step()


def test_as_many_training_trials_as_the_sweep_counts_hold_their_cpus_at_once(ray_local):
    """A training or confirmation trial is a Tune trial (its own resources) driving a TorchTrainer (its workers'):
    the sweep runs as many at once as `cluster_concurrency` counts from the workers' CPUs, so all of their
    placement groups must fit together. With a token CPU share on top of whole-CPU workers, the second trial's
    workers waited for the first to finish on 2 CPUs (`--plan laptop` trained one trial at a time)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    workers, cpus_per_worker = 1, 1.0  # a real-video plan's trial: one worker that decodes its own pairs
    concurrency = cluster_concurrency(workers * cpus_per_worker, 0)
    assert concurrency == 2  # the session's 2-CPU cluster
    driver, per_worker = driving_trial_resources(workers, cpus_per_worker)
    groups = []
    for _ in range(concurrency):  # as Tune places a trial, then Ray Train its worker group
        groups += [placement_group([driver]), placement_group([{"CPU": per_worker}] * workers)]
    try:
        _, pending = ray.wait([group.ready() for group in groups], num_returns=len(groups), timeout=30)
        assert not pending, "the trials' placement groups do not fit the cluster together"
    finally:
        for group in groups:
            remove_placement_group(group)
