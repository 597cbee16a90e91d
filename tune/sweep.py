"""python tune/sweep.py: Ray Tune + Optuna over STT's loss weights, entropy selection and label propagation.

    python tune/sweep.py --quick                          # minutes on a laptop, embedded synthetic data
    python tune/sweep.py --plan laptop --data-root ../shared/data/ytvos-real/train_all_frames \
        --davis-root ../shared/data/davis-real data.frame_gap=4   # ~75 min on real video, 2 cores
    python tune/sweep.py                                  # a longer local sweep on the same data
    python tune/sweep.py --data-root YTVOS --davis-root DAVIS --storage /mnt/shared/sweeps --name r18
    python tune/sweep.py --resume --name NAME             # continue an interrupted sweep

Ctrl-C stops the sweep with exit status 130 and one line naming the phase and how many of its trials
finished; nothing is chosen or reported from a phase that did not finish. `--resume` then runs the
phase's unfinished trials (the finished ones are kept, not rerun) and the phases after it.

How the two kinds of trial combine: nested, in four phases, each resumable.
 1. Spatial stage, once: MoCo on still images. Its encoder initialises every training trial and
    is the frozen teacher of global correlation distillation.
 2. Training trials: the temporal stage, one Ray Train `TorchTrainer` inside each Tune trial,
    with sampled loss weights and entropy settings. Every `eval_every` steps the trial reports
    J&F on the tuning split, scored with the default propagation settings so trials compare on
    features alone; ASHA stops weak trials early; OptunaSearch (TPE, seeded) proposes the next.
 3. Propagation trials: on the best training trial's final checkpoint, features of the tuning
    split are extracted once and cached; Optuna then searches the propagation factors. Each
    trial costs seconds and never runs the network (asserted).
 4. Report: the best training x propagation configuration is evaluated ONCE on the reported
    split. Tuning and reported numbers are both printed, labelled; only the reported one is the
    result (paper 004, Sec. 4.1 and 8: never report the split you tuned on).
Then the yardsticks the result is read against, once each on the reported split at the same resolution
with the default propagation: the untuned default configuration trained with one training trial's
budget, the tuned training with default propagation, random init, Lab pixels, the copied first mask.
summary.md and the trials table (kind "yardstick") show them beside the result.

ASHA-stopped trials are told to Optuna as PRUNED with their intermediate J&F, not COMPLETE, so
TPE ranks them below finished trials instead of mistaking a short run's score for a final one.

Outputs in <storage>/<name>/: trials.parquet and trials.csv (every trial: kind, config, tuning
J&F, state, cost), best.yaml (accepted by `stt.train --config` and `stt.evaluate --config`),
plots/*.png, summary.md, optuna.db (the studies), and the Ray Tune experiments for --resume.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import threading
import time
import typing
from dataclasses import dataclass, replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # plots are files; no display needed
import matplotlib.pyplot as plt
import optuna
import pandas as pd
import ray
import yaml
from optuna.trial import TrialState
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from stt.checkpoint import join
from stt.cli import InterruptedRun, UsageError, run
from stt.config import Config, apply_overrides, from_dict, load_config, to_dict, validate
from stt.data.synthetic import ensure_dataset
from stt.data.layouts import DAVIS
from stt.evaluate import copy_first_mask, evaluate_davis, resolve_device
from stt.features import FeatureCache, FeatureExtractor
from stt.graph import build_graph, default_k, graph_path, load_graph, propagate_with_graph, save_graph, serves, superset_config
from stt.propagation import for_task, propagate
from stt.objectives import stage_spec
from stt.observe import TrialProgress
from stt.train import build_stage_trainer, export_final, start_ray

SPACE_FILE = Path(__file__).with_name("space.yaml")
METRIC = "tuning_jf"
DISTRIBUTIONS = {"loguniform": tune.loguniform, "uniform": tune.uniform, "choice": tune.choice, "randint": tune.randint}


# ----------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class SweepPlan:
    """How much of each phase to run."""

    training_trials: int
    propagation_trials: int
    spatial_steps: int
    temporal_steps: int
    eval_every: int  # steps between tuning J&F reports of a training trial (ASHA's rungs)
    reduction_factor: int  # ASHA keeps 1/reduction_factor of the trials at each rung
    workers_per_trial: int = 1
    seed: int = 0
    overrides: tuple[str, ...] = ()  # config overrides that size the runs (model input, batch)


PLANS = {
    # Minutes on a 2-core laptop: small crops and batches, few steps, few trials.
    "quick": SweepPlan(training_trials=3, propagation_trials=8, spatial_steps=10, temporal_steps=12, eval_every=6,
                       reduction_factor=2, overrides=("data.crop_size=96", "train.batch_size=4", "spatial.image_size=96",
                                                      # Ray Data's stream start-up was 55-81 % of such short trials
                                                      "data.decode_in_worker=true",
                                                      "spatial.queue_size=256", "train.warmup_steps=2",
                                                      # the default rates for this plan's batch of 4 (not scaled down to it)
                                                      "train.lr_batch=4", "spatial.lr_batch=4",
                                                      # n = 7, paper 004's fixed comparison setting; phase 3 searches it
                                                      "propagation.context=7",
                                                      # every J&F of this plan (tuning and reported) at short side 128
                                                      "eval.max_short_side=128")),
    # Real video on a 2-core laptop (e.g. ../shared/data/ytvos-real with data.frame_gap=4): configs/laptop.yaml's
    # crops, batch and lr, trials long enough for features to move (its learning curve, BENCHMARKS.md: +0.15 J&F
    # over random init by step 100), J&F at short side 240 (at 128 a random-init network collapses to J&F 0.03
    # on real DAVIS, below the copied first mask). Estimated from measured step and evaluation costs: ~75 min.
    "laptop": SweepPlan(training_trials=3, propagation_trials=12, spatial_steps=100, temporal_steps=100, eval_every=50,
                        reduction_factor=2, overrides=("data.crop_size=128", "train.batch_size=8", "spatial.image_size=128",
                                                       "spatial.queue_size=1024", "train.lr=5e-4", "train.lr_batch=8",
                                                       "spatial.lr_batch=8", "train.warmup_steps=20",
                                                       "eval.max_short_side=240", "data.decode_in_worker=true")),
    # A longer local sweep on the same data (an hour or two on a laptop CPU).
    "local": SweepPlan(training_trials=8, propagation_trials=30, spatial_steps=200, temporal_steps=300, eval_every=100,
                       reduction_factor=3, overrides=("data.crop_size=128", "train.batch_size=8", "spatial.image_size=128",
                                                      "spatial.queue_size=1024", "train.lr=5e-4", "train.lr_batch=8",
                                                      "spatial.lr_batch=8", "train.warmup_steps=20")),
}


def load_space(path: Path, base: Config | None = None) -> dict[str, dict[str, object]]:
    """The YAML search space as Ray Tune domains: {"training": {key: domain}, "propagation": {...}}.

    Every entry is checked before Ray starts, against `base` (the sweep's base config; default: the
    defaults): the distribution and its arguments, and each value it can produce (each choice, both
    ends of a range) applied to a copy of `base` and validated as a config would be (stt.config.validate).
    A UsageError names the file, the entry and what was expected.
    """
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if not isinstance(spec, dict) or set(spec) - {"training", "propagation"}:
        raise UsageError(f"{path}: expected sections 'training' and/or 'propagation', got {list(spec or {})}")
    base = from_dict(to_dict(base)) if base is not None else Config()
    space: dict[str, dict[str, object]] = {"training": {}, "propagation": {}}
    for section, entries in spec.items():
        if not isinstance(entries or {}, dict):
            raise UsageError(f"{path}: {section}: expected a mapping of config keys to distributions, got {entries!r}")
        for key, distribution in (entries or {}).items():
            space[section][key] = space_entry(path, section, str(key), distribution, base)
    return space


def space_entry(path: Path, section: str, key: str, distribution, base: Config):
    """One search-space entry as a Ray Tune domain, or a UsageError naming `path`, the entry and what was expected."""
    where = f"{path}: {section}.{key}"
    if section == "propagation" and not key.startswith("propagation."):
        raise UsageError(f"{where}: the propagation section samples propagation.* keys only (propagation trials reuse "
                         "one checkpoint's features); move it under 'training'")
    if section == "training" and key.startswith("propagation."):
        raise UsageError(f"{where}: propagation.* keys belong under 'propagation' (searched on the cached features)")
    if not isinstance(distribution, dict) or len(distribution) != 1 or next(iter(distribution)) not in DISTRIBUTIONS:
        raise UsageError(f"{where}: expected one of {sorted(DISTRIBUTIONS)} with its arguments, e.g. {{uniform: [0.1, 1]}}, "
                         f"got {distribution!r}")
    (kind, arguments), = distribution.items()
    described = f"{kind} {arguments!r}"
    if not isinstance(arguments, list):
        raise UsageError(f"{where}: {described}: expected a list of arguments, e.g. {{{kind}: {EXAMPLES[kind]}}}")
    if kind == "choice":
        if not arguments:
            raise UsageError(f"{where}: {described}: expected at least one value to choose from")
        values = arguments
    else:
        if len(arguments) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in arguments):
            raise UsageError(f"{where}: {described}: expected [low, high], two numbers")
        low, high = arguments
        if kind == "randint":
            if not all(isinstance(a, int) for a in arguments):
                raise UsageError(f"{where}: {described}: expected two integers [low, high_exclusive]")
            if low >= high:
                raise UsageError(f"{where}: {described}: expected low < high (high is exclusive: [{low}, {low + 1}] samples "
                                 f"{low} only), got an empty range")
            values = [low, high - 1]
        else:
            if low >= high:
                raise UsageError(f"{where}: {described}: expected low < high")
            if kind == "loguniform" and low <= 0:
                raise UsageError(f"{where}: {described}: expected 0 < low < high (a log scale has no zero or negative values)")
            if field_type(base, key) is int:
                raise UsageError(f"{where}: {described}: {key} is an integer: expected randint or choice, not {kind}")
            values = [low, high]
    for value in values:  # each value the entry can produce (a range by its ends), applied as a trial would
        try:
            validate(apply_overrides(from_dict(to_dict(base)), [f"{key}={value}"]))
        except UsageError as error:
            raise UsageError(f"{where}: {described}: {str(error).removeprefix(f'{key}: ')}") from None
    return DISTRIBUTIONS[kind](arguments) if kind == "choice" else DISTRIBUTIONS[kind](*arguments)


EXAMPLES = {"loguniform": "[0.01, 1]", "uniform": "[0.1, 1]", "choice": "[a, b]", "randint": "[1, 10]"}


def field_type(cfg: Config, key: str):
    """The declared type of the config field `key` (Optional[X] as X), or None for an unknown key."""
    node, parts = cfg, key.split(".")
    for part in parts[:-1]:
        node = getattr(node, part, None)
        if not dataclasses.is_dataclass(node):
            return None
    annotation = typing.get_type_hints(type(node)).get(parts[-1])
    options = [a for a in typing.get_args(annotation) if a is not type(None)]
    return options[0] if len(options) == 1 else annotation


def in_domain(domain, value) -> bool:
    """Whether a Ray Tune domain (choice, uniform, loguniform, randint) can produce `value`."""
    if isinstance(domain, tune.search.sample.Categorical):
        return value in domain.categories
    return domain.lower <= value <= domain.upper if isinstance(domain, tune.search.sample.Float) else domain.lower <= value < domain.upper


def with_params(base: dict, params: dict) -> Config:
    cfg = from_dict(base)
    return apply_overrides(cfg, [f"{key}={value}" for key, value in params.items()])


def cluster_concurrency(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials fit the cluster at once, from its resources."""
    resources = ray.cluster_resources()
    fits = [resources.get("CPU", 1.0) / cpus_per_trial]
    if gpus_per_trial:
        fits.append(resources.get("GPU", 0.0) / gpus_per_trial)
    return max(1, math.floor(min(fits)))


# ----------------------------------------------------------------------------------------- search machinery
class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that keeps the training step and records trials stopped early as PRUNED.

    Ray's OptunaSearch indexes intermediate values by Tune's iteration count and tells Optuna
    COMPLETE for any trial that ended with a result, so an ASHA-stopped trial's early J&F would
    count as a final value; and the result on which ASHA stops a trial never reaches
    `on_trial_result`. Here every J&F is reported at its training step (`step`), the last one
    included, and a trial that ended before `full_steps` is told as PRUNED: TPE then ranks it by its
    intermediate values, below the trials that finished.
    """

    def __init__(self, *args, full_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.full_steps = full_steps

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._completed_trials:
            self._ot_trials[trial_id].report(result[self.metric], result["step"])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error and trial_id not in self._completed_trials:
            self.on_trial_result(trial_id, result)  # Optuna ignores a step it already has
            if result["step"] < self.full_steps:
                self._ot_study.tell(self._ot_trials[trial_id], state=TrialState.PRUNED)
                self._completed_trials.add(trial_id)
                return
        super().on_trial_complete(trial_id, result=result, error=error)


def fail_stale_trials(experiment: Path, study_name: str) -> None:
    """Trials a crashed sweep left RUNNING in the study: recorded as FAIL, as they are."""
    storage = optuna_storage(experiment)
    if study_name not in {s.study_name for s in optuna.get_all_study_summaries(storage)}:
        return
    study = optuna.load_study(study_name=study_name, storage=storage)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)


class TuningJFCallback(TuneReportCallback):
    """Forward to Tune only the Ray Train reports that carry J&F, renamed to the sweep's metric.

    The trainer also reports losses between evaluations; Tune's searcher and ASHA need the metric
    in every result they see.
    """

    def after_report(self, run_context, metrics, checkpoint):
        if "J&F" not in metrics[0]:
            return
        metrics = [{**metrics[0], METRIC: metrics[0]["J&F"]}] + list(metrics[1:])
        super().after_report(run_context, metrics, checkpoint)


def optuna_storage(experiment: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{experiment / 'optuna.db'}")


# ----------------------------------------------------------------------------------------- trials
def training_trial(params: dict, *, base: dict, spatial_checkpoint: str, runs: str, workers: int,
                   cpus_per_worker: float, use_gpu: bool) -> None:
    """One Tune trial: the temporal stage with `params`, a TorchTrainer inside the trial.

    Its Ray Train run is named after the Tune trial, so a resumed sweep resumes it from its
    checkpoints instead of starting over.
    """
    cfg = with_params(base, params)
    trial_id = tune.get_context().get_trial_id()
    trainer = build_stage_trainer(stage_spec(cfg, "temporal"), join(runs, trial_id), spatial_checkpoint, use_gpu=use_gpu,
                                  workers=workers, cpus_per_worker=cpus_per_worker, callbacks=[TuningJFCallback()],
                                  run_name="sweep", trial=trial_id)
    trainer.fit()  # ASHA stops every trial at a rung or at max_t, so nothing may follow this call


def propagation_trial(params: dict, *, base: dict, checkpoint: str, davis_root: str, tune_set: str, feature_cache: str,
                      graphs: dict[str, str] | None = None) -> None:
    """One Tune trial: propagation with `params` on cached features of the tuning split (seconds).

    graphs: {sequence: file of its top-K affinity graph} (stt/graph.py, built once by `Sweep.propagation`).
    A trial the graphs serve filters and gathers from them (the same labels as stt.propagation, exactly);
    one they cannot serve runs stt.propagation as usual and reports why in "graph".
    """
    stats = {"targets": 0, "fallbacks": 0}
    features_changed = sorted(key for key in params if not key.startswith("propagation."))
    reason = ("no graphs" if not graphs else
              f"the trial sets {', '.join(features_changed)}: the graphs hold other features" if features_changed else None)

    def on_graph(sequence: str, features, labels, cfg):
        nonlocal reason
        graph = load_graph(Path(graphs[sequence]), features)
        reason = serves(graph, cfg)  # the same for every sequence: the graphs share one superset
        if reason is not None:
            return propagate(features, labels, cfg)
        return propagate_with_graph(graph, labels, cfg, stats)

    report = evaluate_davis(Path(davis_root), checkpoint, with_params(base, params), None, split=tune_set,
                            device="cpu", feature_cache=Path(feature_cache), progress=False,
                            propagator=on_graph if reason is None else None)
    if report["network_calls"]:
        raise RuntimeError(f"a propagation trial ran the network {report['network_calls']} times: the feature cache missed")
    tune.report({METRIC: report["summary"]["J&F-Mean"], "seconds": report["seconds"], "graph": reason or "served",
                 "graph_fallback_fraction": stats["fallbacks"] / max(1, stats["targets"])})


# ----------------------------------------------------------------------------------------- phases
class Sweep:
    """The four phases over one experiment folder; `state.json` records what is finished."""

    def __init__(self, args: argparse.Namespace, plan: SweepPlan, base: Config, space: dict):
        self.args, self.plan, self.space = args, plan, space
        self.base = base
        self.experiment = Path(args.storage).absolute() / args.name
        self.experiment.mkdir(parents=True, exist_ok=True)
        self.state_file = self.experiment / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        self.use_gpu = not args.cpu and ray.cluster_resources().get("GPU", 0) >= 1
        # A worker that decodes its own data (data.decode_in_worker) needs a whole core; else half of one beside Ray Data's.
        self.cpus_per_worker = 1.0 if self.use_gpu or base.data.decode_in_worker else 0.5

    def save_state(self, **entries) -> None:
        self.state.update(entries)
        self.state_file.write_text(json.dumps(self.state, indent=1))

    def tuner(self, name: str, trainable, param_space: dict, search: OptunaSearch, scheduler, concurrency: int, samples: int):
        path = self.experiment / name
        # A phase that crashed before Tune saved its first experiment state has nothing to restore.
        if self.args.resume and any(path.glob("experiment_state-*.json")):
            print(f"sweep: resuming the {name} trials from {path}")
            return tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True, resume_errored=True,
                                      param_space=param_space)
        if not self.args.resume and any(path.glob("experiment_state-*.json")):
            raise UsageError(f"{path}: the {name} trials of an unfinished sweep are stored there; run the same command "
                             "with --resume to continue it, or give a new --name")
        fail_stale_trials(self.experiment, name)
        return tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(metric=METRIC, mode="max", search_alg=search, scheduler=scheduler,
                                        num_samples=samples, max_concurrent_trials=concurrency),
            run_config=tune.RunConfig(name=name, storage_path=str(self.experiment), callbacks=[TrialProgress(name, samples)],
                                      failure_config=tune.FailureConfig(fail_fast=False)),  # a failed trial is recorded, the sweep goes on
        )

    def spatial(self) -> str:
        if "spatial_checkpoint" in self.state:
            return self.state["spatial_checkpoint"]
        if self.args.init:
            checkpoint = self.args.init
        else:
            cfg = replace_train(self.base, max_steps=self.plan.spatial_steps, eval_every=0)
            print(f"sweep: phase 1/4, spatial stage ({self.plan.spatial_steps} steps)")
            trainer = build_stage_trainer(stage_spec(cfg, "spatial"), str(self.experiment / "spatial"), "", use_gpu=self.use_gpu,
                                          workers=self.plan.workers_per_trial, cpus_per_worker=self.cpus_per_worker)
            checkpoint = str(self.experiment / "spatial-final.pt")
            export_final(fit_in_driver(trainer, "phase 1/4 (the spatial stage)", self.plan.spatial_steps).checkpoint, checkpoint)
        self.save_state(spatial_checkpoint=checkpoint)
        return checkpoint

    def training(self, spatial_checkpoint: str) -> dict:
        if "best_training" in self.state:
            return self.state["best_training"]
        plan = self.plan
        print(f"sweep: phase 2/4, {plan.training_trials} training trials of {plan.temporal_steps} steps, "
              f"J&F on DAVIS '{self.args.tune_set}' every {plan.eval_every}")
        base = to_dict(replace_train(self.base, max_steps=plan.temporal_steps, eval_every=plan.eval_every,
                                     checkpoint_every=plan.eval_every, eval_davis_root=self.args.davis_root,
                                     eval_davis_set=self.args.tune_set))
        trial_cpus = plan.workers_per_trial * self.cpus_per_worker + (0.0 if self.base.data.decode_in_worker else self.base.data.data_cpus)
        trainable = tune.with_resources(
            tune.with_parameters(training_trial, base=base, spatial_checkpoint=spatial_checkpoint, runs=str(self.experiment / "training-runs"),
                                 workers=plan.workers_per_trial, cpus_per_worker=self.cpus_per_worker, use_gpu=self.use_gpu),
            {"CPU": 0.01},  # the trial only drives its TorchTrainer, whose workers hold the real resources (Tune refuses 0)
        )
        search = PrunedAwareOptunaSearch(seed=plan.seed, study_name="training", storage=optuna_storage(self.experiment),
                                         full_steps=plan.temporal_steps)
        asha = ASHAScheduler(time_attr="step", max_t=plan.temporal_steps, grace_period=plan.eval_every,
                             reduction_factor=plan.reduction_factor)
        concurrency = cluster_concurrency(trial_cpus, plan.workers_per_trial if self.use_gpu else 0)
        results = self.tuner("training", trainable, self.space["training"], search, asha, concurrency, plan.training_trials).fit()
        check_finished(results, "phase 2/4", "training", plan.training_trials)
        # Each trial's last J&F report carries its latest checkpoint, so comparing last results keeps
        # the chosen J&F and the chosen checkpoint the same model (an early peak's weights may be gone).
        best = best_result(results)
        run = self.experiment / "training-runs" / best.metrics["trial_id"] / "temporal"
        chosen = {"params": {k: best.config[k] for k in self.space["training"]}, "tuning_jf": best.metrics[METRIC],
                  "checkpoint": str(latest_checkpoint(run))}
        self.save_state(best_training=chosen)
        return chosen

    def propagation(self, best_training: dict) -> dict:
        if "best_propagation" in self.state:
            return self.state["best_propagation"]
        plan, args = self.plan, self.args
        base = to_dict(with_params(to_dict(self.base), best_training["params"]))
        cache = str(self.experiment / "features")
        print(f"sweep: phase 3/4, {plan.propagation_trials} propagation trials on cached features of {best_training['checkpoint']}")
        # Extract once here, so every trial is a cache hit (each asserts it ran no network).
        default = evaluate_davis(Path(args.davis_root), best_training["checkpoint"], from_dict(base), None,
                                 split=args.tune_set, feature_cache=Path(cache), progress=False)
        # Once per checkpoint, the top-K affinity graph of each sequence (stt/graph.py) for the widest setting
        # of the space, saved beside its cached features: the trials then filter and gather instead of
        # recomputing affinities. A resumed sweep finds them on disk.
        cfg, started = from_dict(base), time.perf_counter()
        extractor = FeatureExtractor(best_training["checkpoint"], cfg.model, cfg.eval, resolve_device("auto"))
        superset = superset_config(self.space["propagation"], for_task(cfg.propagation, "davis", extractor.stride))
        graph_k, dataset, features_cache, graphs = default_k(superset), DAVIS(Path(args.davis_root), split=args.tune_set), FeatureCache(cache), {}
        for seq in dataset.sequences:
            frame_paths = dataset.frame_paths(seq)
            path = graph_path(features_cache.path_for(extractor.cache_key, frame_paths), superset, graph_k)
            if not path.is_file():
                features = features_cache.load_or_compute(extractor, frame_paths, lambda: dataset.read_frames(seq))
                save_graph(build_graph(features, superset, graph_k), path)
            graphs[seq] = str(path)
        print(f"sweep: top-{graph_k} affinity graphs of {len(graphs)} sequences ready in {time.perf_counter() - started:.1f} s "
              f"(context {superset.context}, radius {superset.radius}, first frame {'in' if superset.window_first_frame else 'without'} a window)")
        trainable = tune.with_parameters(propagation_trial, base=base, checkpoint=best_training["checkpoint"],
                                         davis_root=args.davis_root, tune_set=args.tune_set, feature_cache=cache, graphs=graphs)
        defaults = {key: getattr(self.base.propagation, key.split(".", 1)[1]) for key in self.space["propagation"]}
        # The configured defaults are the first point, where the space contains them.
        start = [defaults] if all(in_domain(self.space["propagation"][k], v) for k, v in defaults.items()) else None
        search = OptunaSearch(seed=plan.seed, study_name="propagation", storage=optuna_storage(self.experiment),
                              points_to_evaluate=start)
        concurrency = cluster_concurrency(1.0, 0)
        results = self.tuner("propagation", trainable, self.space["propagation"], search, None, concurrency,
                             plan.propagation_trials).fit()
        check_finished(results, "phase 3/4", "propagation", plan.propagation_trials)
        on_graph = [r.metrics for r in results if r.metrics and r.metrics.get("graph") == "served"]
        print(f"sweep: {len(on_graph)} of {len(results)} propagation trials ran on the graphs"
              + (f", {sum(m['graph_fallback_fraction'] for m in on_graph) / len(on_graph):.2%} of their target locations "
                 "computed the usual way" if on_graph else ""))
        best = best_result(results)
        chosen = {"params": {k: best.config[k] for k in self.space["propagation"]}, "tuning_jf": best.metrics[METRIC],
                  "default_tuning_jf": default["summary"]["J&F-Mean"]}
        self.save_state(best_propagation=chosen)
        return chosen

    def report(self, best_training: dict, best_propagation: dict) -> dict:
        if "final" in self.state:
            return self.state["final"]
        args = self.args
        cfg = with_params(to_dict(self.base), {**best_training["params"], **best_propagation["params"]})
        print(f"sweep: phase 4/4, the best configuration evaluated once on DAVIS '{args.report_set}'")
        final = evaluate_davis(Path(args.davis_root), best_training["checkpoint"], cfg, self.experiment / "final-results",
                               split=args.report_set, feature_cache=self.experiment / "features", progress=False)
        (self.experiment / "best.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        entry = {"reported_jf": final["summary"]["J&F-Mean"], "summary": final["summary"], "checkpoint": best_training["checkpoint"],
                 "max_short_side": cfg.eval.max_short_side}
        self.save_state(final=entry)
        return entry


    def yardsticks(self, spatial_checkpoint: str, best_training: dict) -> dict:
        """What the reported J&F is read against, each evaluated once on the reported split at the result's
        resolution with the default propagation: the tuned training with default propagation (what the
        propagation search added), the untuned default configuration trained with one training trial's
        budget (what the training search added), random init, Lab pixels and the first mask copied."""
        if "yardsticks" in self.state:
            return self.state["yardsticks"]
        args, plan = self.args, self.plan
        print(f"sweep: yardsticks on DAVIS '{args.report_set}' (the untuned defaults trained {plan.temporal_steps} steps, "
              "random init, Lab pixels, the copied first mask)")
        default_checkpoint = self.experiment / "untuned-temporal-final.pt"
        if not default_checkpoint.exists():  # trained once; a rerun of the sweep only re-reads it
            cfg = replace_train(self.base, max_steps=plan.temporal_steps, eval_every=0, checkpoint_every=plan.temporal_steps)
            trainer = build_stage_trainer(stage_spec(cfg, "temporal"), str(self.experiment / "untuned-run"), spatial_checkpoint,
                                          use_gpu=self.use_gpu, workers=plan.workers_per_trial, cpus_per_worker=self.cpus_per_worker)
            export_final(fit_in_driver(trainer, "the yardsticks (training the untuned defaults)", plan.temporal_steps).checkpoint,
                         str(default_checkpoint))
        sources = {"tuned training, default propagation": best_training["checkpoint"],
                   "untuned defaults": str(default_checkpoint),
                   "random init": f"random:{plan.seed}",
                   f"Lab pixels (stride {self.base.model.stride})": f"lab:{self.base.model.stride}"}
        rows = {}
        for name, source in sources.items():  # cached features: a rerun costs propagation only
            summary = evaluate_davis(Path(args.davis_root), source, self.base, None, split=args.report_set,
                                     feature_cache=self.experiment / "features", progress=False)["summary"]
            rows[name] = {"source": source, "J&F": summary["J&F-Mean"], "J": summary["J-Mean"], "F": summary["F-Mean"]}
        summary = copy_first_mask(Path(args.davis_root), args.report_set)
        rows["first mask copied"] = {"source": "copy", "J&F": summary["J&F-Mean"], "J": summary["J-Mean"], "F": summary["F-Mean"]}
        self.save_state(yardsticks=rows)
        return rows


RESUME = "run the same command with --resume to continue"


def check_finished(results, phase: str, kind: str, planned: int) -> None:
    """InterruptedRun unless every planned trial of the phase finished (TERMINATED, or ERROR: recorded as failed).

    On Ctrl-C, Tune saves the experiment and `Tuner.fit()` returns the trials so far as if done; going
    on would choose among them and report a sweep that never ran. The trials not finished are resumed
    by `--resume` (Tuner.restore, resume_unfinished), the finished ones kept.
    The statuses are read from the experiment state Tune saved as the run ended: the ResultGrid's are
    taken after Tune's cleanup, which marks every trial it stopped TERMINATED, the interrupted ones too
    (Ray 2.60; results.num_terminated counted 2 of 2 after Ctrl-C with one trial running).
    """
    default_sigint()
    saved = tune.ExperimentAnalysis(results.experiment_path).trials  # Ray: the trials as saved, with their statuses
    finished = sum(trial.status in ("TERMINATED", "ERROR") for trial in saved)
    if finished < planned:
        raise InterruptedRun(f"{phase} interrupted after {finished} of {planned} {kind} trials; {RESUME}")


def default_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt again. Tune's handler (after a fit, it stays installed and would
    swallow the next Ctrl-C) and Ray Train's (bound to a controller that is gone) are removed."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def fit_in_driver(trainer, phase: str, steps: int) -> "ray.train.Result":
    """`trainer.fit()` of a stage the driver trains itself, or InterruptedRun if Ctrl-C stopped it or it ended before `steps`.

    Run in a thread: there Ray Train installs no SIGINT handler of its own (in the main thread its handler
    aborts the run and ends the process with status 1 and no word, or 0), so Ctrl-C reaches this thread as
    KeyboardInterrupt. The run's checkpoints stay where `--resume` picks them up; its controller and
    workers end with the driver's Ray.
    """
    outcome: dict = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as error:  # noqa: BLE001 - raised again in the main thread just below
            outcome["error"] = error

    thread = threading.Thread(target=fit, name=f"sweep: {phase}", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(timeout=0.5)
    except KeyboardInterrupt:
        raise InterruptedRun(f"{phase} interrupted; {RESUME}") from None
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    step = (result.metrics or {}).get("step", 0)
    if result.checkpoint is None or step < steps:
        raise InterruptedRun(f"{phase} stopped at step {step} of {steps}; {RESUME}")
    return result


def best_result(results) -> "ray.tune.Result":
    """The trial with the highest last-reported J&F. Ties (common on tiny or early models) go to the larger
    trial id, so a resumed sweep, whose restored results Tune may list in another order, chooses the same trial."""
    scored = [result for result in results if result.metrics and METRIC in result.metrics]
    if not scored:
        raise RuntimeError("no trial reported a tuning J&F; see the trials' errors above")
    return max(scored, key=lambda result: (result.metrics[METRIC], result.metrics["trial_id"]))


def latest_checkpoint(run: Path) -> Path:
    """The newest `checkpoint.pt` of a training trial's Ray Train run (the checkpoint of its last J&F report)."""
    found = sorted(run.glob("temporal-step*/checkpoint.pt"))
    if not found:
        raise FileNotFoundError(f"no checkpoint under {run}")
    return found[-1]


def replace_train(cfg: Config, **changes) -> Config:
    copy = from_dict(to_dict(cfg))
    copy.train = replace(copy.train, **changes)
    return copy


# ----------------------------------------------------------------------------------------- outputs
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
            seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() if trial.datetime_complete else None
            rows.append({"kind": summary.study_name, "number": trial.number, "state": trial.state.name,
                         "tuning_jf": value, "steps": steps, "seconds": seconds, **trial.params})
    table = pd.DataFrame(rows)
    if "final" in state and len(table):
        # The reported split is evaluated once, for the chosen configuration only.
        best = state["best_propagation"]["params"]
        chosen = (table["kind"] == "propagation") & (table["tuning_jf"] == state["best_propagation"]["tuning_jf"])
        for key, value in best.items():
            chosen &= table[key] == value
        table["reported_jf"] = table["tuning_jf"].where(~chosen, state["final"]["reported_jf"]).where(chosen)
    yardsticks = [{"kind": "yardstick", "yardstick": name, "state": "COMPLETE", "reported_jf": row["J&F"]}
                  for name, row in state.get("yardsticks", {}).items()]
    return pd.concat([table, pd.DataFrame(yardsticks)], ignore_index=True) if yardsticks else table


def write_plots(experiment: Path, table: pd.DataFrame) -> list[Path]:
    """Optimisation history, parameter importance and J&F against each parameter, per trial kind."""
    out = experiment / "plots"
    out.mkdir(exist_ok=True)
    written = []
    storage = optuna_storage(experiment)
    for kind in [kind for kind in table["kind"].unique() if kind != "yardstick"] if len(table) else []:  # the studies
        study = optuna.load_study(study_name=kind, storage=storage)
        finished = [t for t in study.trials if t.state == TrialState.COMPLETE]
        optuna.visualization.matplotlib.plot_optimization_history(study)
        written.append(save_figure(out / f"{kind}-history.png"))
        if len(finished) >= 2 and len({tuple(sorted(t.params.items())) for t in finished}) >= 2:
            # PED-ANOVA needs no scikit-learn (fANOVA does).
            optuna.visualization.matplotlib.plot_param_importances(study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
            written.append(save_figure(out / f"{kind}-importance.png"))
        rows = table[table["kind"] == kind]
        params = [c for c in rows.columns if "." in c and rows[c].notna().any()]
        figure, axes = plt.subplots(1, max(1, len(params)), figsize=(3.2 * max(1, len(params)), 3), squeeze=False)
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
    return ", ".join(f"{key.split('.', 1)[1]}={value:.4g}" if isinstance(value, float) else f"{key.split('.', 1)[1]}={value}"
                     for key, value in params.items())


def summary_paragraph(args: argparse.Namespace, state: dict, table: pd.DataFrame) -> str:
    training, propagation, final = state["best_training"], state["best_propagation"], state["final"]
    searched = table[table["kind"] != "yardstick"] if len(table) else table
    counts = searched.groupby(["kind", "state"]).size().to_dict() if len(searched) else {}
    trials = ", ".join(f"{n} {kind} {status.lower()}" for (kind, status), n in sorted(counts.items()))
    return (
        f"Sweep '{args.name}' ran {trials} trials. The best training trial ({describe(training['params'])}) reached J&F "
        f"{training['tuning_jf']:.3f} on the tuning split (DAVIS '{args.tune_set}', default propagation). Searching propagation on "
        f"its cached features moved the tuning J&F from {propagation['default_tuning_jf']:.3f} (DESIGN.md defaults) to "
        f"{propagation['tuning_jf']:.3f} ({describe(propagation['params'])}). Evaluated once on the reported split (DAVIS "
        f"'{args.report_set}'), the chosen configuration scores J&F {final['reported_jf']:.3f} (J {final['summary']['J-Mean']:.3f}, "
        f"F {final['summary']['F-Mean']:.3f}): that is the result; tuning-split numbers are optimistic by construction. "
        f"Frames were fed at short side <= {state['final']['max_short_side']}. Configuration: best.yaml."
        + yardstick_table(args, state)
    )


def yardstick_table(args: argparse.Namespace, state: dict) -> str:
    """The result beside its yardsticks (the sweep's `yardsticks` phase), as a Markdown table and one verdict."""
    final, yardsticks = state["final"], state.get("yardsticks")
    if not yardsticks:
        return ""
    lines = [f"\n\n| on DAVIS '{args.report_set}', short side <= {final['max_short_side']} | J&F | J | F |", "|---|---|---|---|",
             f"| **tuned** (training + propagation search) | **{final['reported_jf']:.3f}** | {final['summary']['J-Mean']:.3f} "
             f"| {final['summary']['F-Mean']:.3f} |"]
    lines += [f"| {name} | {row['J&F']:.3f} | {row['J']:.3f} | {row['F']:.3f} |" for name, row in yardsticks.items()]
    margin = final["reported_jf"] - yardsticks["untuned defaults"]["J&F"]
    verdict = "beats" if margin > 0 else "does not beat"
    lines.append(f"\nThe tuned configuration {verdict} the untuned defaults trained with the same budget by {margin:+.3f} J&F "
                 f"on DAVIS '{args.report_set}' (yardsticks: default propagation, same split and resolution).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- main
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tune/sweep.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a sweep that finishes in minutes on a laptop (same as --plan quick)")
    parser.add_argument("--plan", choices=list(PLANS), default="local",
                        help="how much to run: quick (minutes), laptop (~75 min on real video, 2 cores), local (hours)")
    parser.add_argument("--samples", type=int, help="training trials (default: the plan's)")
    parser.add_argument("--propagation-samples", type=int, help="propagation trials (default: the plan's)")
    parser.add_argument("--space", default=str(SPACE_FILE), help="search space YAML (default: tune/space.yaml)")
    parser.add_argument("--storage", default="sweeps",
                        help="experiment folder root, a file system path (on a cluster: a shared mount) (default: ./sweeps)")
    parser.add_argument("--name", help="experiment name (default: the plan's name); with --resume, the one to continue")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted sweep: finished trials are kept, not rerun")
    parser.add_argument("--data-root", default="", help="YouTube-VOS root or Parquet shards (default: embedded synthetic)")
    parser.add_argument("--davis-root", default="", help="DAVIS-2017 root for tuning and reporting (default: embedded synthetic)")
    parser.add_argument("--tune-set", default="train", help="DAVIS split tuned on (default: train)")
    parser.add_argument("--report-set", default="val", help="DAVIS split reported, evaluated once (default: val)")
    parser.add_argument("--init", default="", help="a spatial-stage checkpoint to use instead of training one")
    parser.add_argument("--workers", type=int, help="Ray Train workers per training trial (default: 1)")
    parser.add_argument("--cpu", action="store_true", help="train on CPUs even if the cluster has GPUs")
    parser.add_argument("--config", help="YAML with base config sections; the space's keys are sampled on top")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. model.arch=resnet50")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    args.plan = "quick" if args.quick else args.plan
    plan = PLANS[args.plan]
    plan = replace(plan, training_trials=args.samples or plan.training_trials,
                   propagation_trials=args.propagation_samples or plan.propagation_trials,
                   workers_per_trial=args.workers or plan.workers_per_trial)
    args.name = args.name or args.plan
    if "://" in args.storage:
        raise ValueError(f"--storage {args.storage}: the sweep keeps its Optuna study (SQLite), feature cache and trial "
                         "runs in a folder; give a local path, or on a cluster a file system every node mounts (docs/cluster.md)")
    if args.tune_set == args.report_set:
        raise ValueError(f"--tune-set and --report-set are both '{args.tune_set}': tuning on the reported split is what this tool exists to prevent")
    base = load_config(args.config, [*plan.overrides, *args.overrides])
    space = load_space(Path(args.space), base)
    if not args.data_root:
        args.data_root = str(ensure_dataset("ytvos"))
    if not args.davis_root:
        args.davis_root = str(ensure_dataset("davis"))
    base.data.root = args.data_root
    if not ray.is_initialized():
        # The dashboard must run: without it, ASHA-stopped trials leak their Train workers' resources.
        start_ray(include_dashboard=True)
    started = time.perf_counter()
    sweep = Sweep(args, plan, base, space)
    # Watching live: the studies' trials, intermediate J&F and pruning, while the sweep runs.
    print(f"sweep: watch the studies live (pip install -e '.[dashboard]'): "
          f"optuna-dashboard sqlite:///{(sweep.experiment / 'optuna.db').resolve()}")
    phase = "phase 1/4 (the spatial stage)"
    try:  # Ctrl-C inside a phase's fit() is told by its checks; anywhere else, it lands here
        spatial_checkpoint = sweep.spatial()
        phase = "phase 2/4 (training trials)"
        best_training = sweep.training(spatial_checkpoint)
        phase = "phase 3/4 (propagation trials)"
        best_propagation = sweep.propagation(best_training)
        phase = "phase 4/4 (the report)"
        sweep.report(best_training, best_propagation)
        phase = "the yardsticks"
        sweep.yardsticks(spatial_checkpoint, best_training)
    except KeyboardInterrupt:
        raise InterruptedRun(f"{phase} interrupted; {RESUME}") from None

    table = trials_table(sweep.experiment, sweep.state)
    table.to_parquet(sweep.experiment / "trials.parquet")
    table.to_csv(sweep.experiment / "trials.csv", index=False)
    write_plots(sweep.experiment, table)
    summary = summary_paragraph(args, sweep.state, table)
    (sweep.experiment / "summary.md").write_text(summary + "\n")
    print("\n" + summary)
    print(f"\nbest configuration: {sweep.experiment / 'best.yaml'}   trials: {sweep.experiment / 'trials.csv'}   "
          f"({time.perf_counter() - started:.0f} s)")
    return {"state": sweep.state, "table": table, "experiment": sweep.experiment}


if __name__ == "__main__":
    sys.exit(run(main, "sweep"))
