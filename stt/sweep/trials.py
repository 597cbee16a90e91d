"""The two kinds of Tune trial (`training_trial`, `PropagationTrial`) and the Optuna/Tune glue around them:
the searcher that records ASHA-stopped trials as PRUNED, the study storage, and how many trials fit at once.

Everything here runs in Ray: the trial functions in Tune's trial actors, the callback in the Train controller.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path

import optuna
import ray
from optuna.trial import TrialState
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.search.optuna import OptunaSearch

from stt.allocator import retain_freed_memory
from stt.checkpoint import join
from stt.config import from_dict
from stt.data.layouts import DAVIS
from stt.evaluate import EvaluationRun, predict_davis_sequence, task_config
from stt.metrics import evaluate_davis_sequence, summarize_davis
from stt.propagation.graph import load_graph, pick_graph, propagate_with_graph
from stt.propagation.per_frame import load_store, propagate_per_frame
from stt.propagation.per_frame import serves as serves_per_frame
from stt.recipes import stage_spec
from stt.sweep.space import with_params
from stt.train import build_stage_trainer, check_stopped

METRIC = "tuning_jf"


def optuna_storage(experiment: Path) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(f"sqlite:///{experiment / 'optuna.db'}")


def cluster_concurrency(cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials fit the cluster at once, from its resources."""
    resources = ray.cluster_resources()
    fits = [resources.get("CPU", 1.0) / cpus_per_trial]
    if gpus_per_trial:
        fits.append(resources.get("GPU", 0.0) / gpus_per_trial)
    # Ray counts resources in units of 1e-4: a float sum such as 0.99 + 0.01 must not lose a whole trial
    return max(1, math.floor(min(fits) + 1e-6))


# A training or confirmation trial's function only drives its TorchTrainer; the Train workers hold the CPUs. Tune
# refuses a trial of 0 CPUs, so the function takes this token share, out of its workers' (`driving_trial_resources`).
DRIVER_CPUS = 0.01


def driving_trial_resources(workers: int, cpus_per_worker: float) -> tuple[dict, float]:
    """The Tune resources of a trial that drives a TorchTrainer of `workers` workers, and what each worker asks for:
    together `workers x cpus_per_worker`, the CPUs `cluster_concurrency` counts a trial at. (With the token on top of
    whole-CPU workers, two trials needed 2.02 of a 2-core machine's 2 CPUs: the second trial's workers waited for
    the first trial to finish, so `--plan laptop` trained its trials one at a time.)"""
    return {"CPU": DRIVER_CPUS}, cpus_per_worker - DRIVER_CPUS / workers


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


def training_trial(
    params: dict, *, base: dict, stage: str, init: str, runs: str, workers: int, cpus_per_worker: float, use_gpu: bool
) -> None:
    """One Tune trial: `stage` (the recipe's last) with `params`, from the checkpoint `init` ("" for none),
    a TorchTrainer inside the trial.

    Its Ray Train run is named after the Tune trial, so a resumed sweep resumes it from its
    checkpoints instead of starting over.
    """
    cfg = with_params(base, params)
    trial_id = tune.get_context().get_trial_id()  # Ray: this Tune trial
    trainer = build_stage_trainer(
        stage_spec(cfg, stage),
        join(runs, trial_id),
        init,
        use_gpu=use_gpu,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        callbacks=[TuningJFCallback()],
        run_name="sweep",
        trial=trial_id,
    )
    # ASHA stops every trial at a rung or at max_t, so nothing else may follow this call; a trial whose loss went
    # non-finite ends by itself, and is recorded as failed with its line
    check_stopped(trainer.fit())


class PropagationTrial(tune.Trainable):
    """Tune trials of propagation settings on the tuning split, held in memory: seconds each.

    Ray: under TuneConfig(reuse_actors=True) one actor runs trial after trial. Its first step loads the split
    (cached features, ground truth, top-K graphs) and `reset_config` swaps only the setting, so a trial
    costs its propagation and scoring, not a checkpoint read and every feature, mask and graph file again.
    A setting the graphs serve filters and gathers from them (the same labels as stt.propagation,
    exactly: stt/propagation/graph.py); one they cannot serve runs stt.propagation and says why in "graph".
    Memory per actor: the split's features in fp16 (the feature cache's own precision: exact) and its ground
    truth, on the real DAVIS `train` (396 frames) 0.3 GB + 0.3 GB at short side 240, 1.3 + 1.3 GB at 480p; the
    graphs are memory-mapped, their pages shared by the actors: the default space's lattice of 18 graphs is about
    1.7 GiB at 240 and 6.8 GiB at 480p on disk, of which a trial reads its own graph's eighteenth.
    """

    def setup(
        self,
        config: dict,
        *,
        base: dict,
        checkpoint: str,
        davis_root: str,
        tune_set: str,
        feature_cache: str,
        graphs: dict[str, list[str]] | None = None,
        stores: dict[str, str] | None = None,
    ) -> None:
        # The split is loaded by the first step, not here: Tune hands a pending trial to an actor that has just
        # finished one and kills the actor still in `setup` for it, so with half-second trials and a setup of
        # seconds a second actor never came up (the quick plan's phase 3 ran on one; BENCHMARKS.md).
        self.params, self.base = config, from_dict(base)
        self.sources = (checkpoint, davis_root, tune_set, feature_cache, graphs, stores)
        self.videos = None

    def load_split(self) -> None:
        """The split's cached features, ground truth, graphs and per-frame stores, once per actor."""
        checkpoint, davis_root, tune_set, feature_cache, graphs, stores = self.sources
        retain_freed_memory()  # propagation's logits: stt.allocator
        run = EvaluationRun.open("davis", checkpoint, self.base, "cpu", Path(feature_cache))
        self.stride = run.extractor.stride
        dataset = DAVIS(Path(davis_root), split=tune_set)
        videos = []  # (sequence, features, ground truth, objects, graphs, per-frame store or None)
        for seq in dataset.sequences:
            features = run.features(dataset.frame_paths(seq), lambda seq=seq: dataset.read_frames(seq)).half()
            seq_graphs = [load_graph(Path(path), features) for path in graphs[seq]] if graphs else []  # memory-mapped
            store = load_store(Path(stores[seq])) if stores else None  # memory-mapped: the actors share its pages
            videos.append((seq, features, dataset.read_masks(seq), dataset.num_objects(seq), seq_graphs, store))
        if run.extractor.network_calls:
            raise RuntimeError(
                f"propagation trials ran the network {run.extractor.network_calls} times: the feature cache missed"
            )
        self.videos = videos

    def reset_config(self, new_config: dict) -> bool:
        self.params = new_config
        return True

    def step(self) -> dict:
        if self.videos is None:
            self.load_split()
        started = time.perf_counter()  # the setting's own cost: a trial's seconds leave the split's loading out
        cfg = task_config(with_params(self.base, self.params), "davis", self.stride)
        stats = {"targets": 0, "fallbacks": 0}
        per_frame = cfg.propagation.aggregation == "per-frame"
        reason, rows = "no per-frame stores" if per_frame else "no graphs", []
        for seq, held, gt, num_objects, graphs, store in self.videos:
            features, propagator = held.float(), None  # as FeatureCache.load_or_compute returns them
            if per_frame and store is not None:
                reason = serves_per_frame(store, cfg.propagation)  # the same for every sequence: one space
                if reason is None:
                    propagator = functools.partial(_on_store, store)
            elif not per_frame and graphs:
                graph, reason = pick_graph(graphs, cfg.propagation)  # the same for every sequence: one lattice
                if reason is None:
                    propagator = functools.partial(_on_graph, dataclasses.replace(graph, features=features), stats)
            rows.extend(
                evaluate_davis_sequence(
                    gt, predict_davis_sequence(features, gt, num_objects, cfg, "windowed", propagator), seq
                )
            )
        result = {
            METRIC: summarize_davis(rows)["J&F-Mean"],
            "seconds": time.perf_counter() - started,
            "graph": reason or "served",
            "done": True,  # one result per setting
        }
        if reason is None:
            result["graph_fallback_fraction"] = stats["fallbacks"] / max(1, stats["targets"])
        return result


def _on_graph(graph, stats: dict, features, labels, cfg):
    """`predict_davis_sequence`'s propagator on a graph (features: the ones the graph was loaded with)."""
    return propagate_with_graph(graph, labels, cfg, stats)


def _on_store(store, features, labels, cfg):
    """`predict_davis_sequence`'s propagator on a per-frame store (exact: it never falls back)."""
    return propagate_per_frame(store, labels, cfg)


class PropagationSearch(OptunaSearch):
    """OptunaSearch that keeps, per propagation trial, whether the graphs served it, the fraction of target
    locations computed the usual way, and its seconds, as Optuna user attributes: the trials table's columns."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result and not error and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            for key in ("graph", "graph_fallback_fraction"):
                if key in result:
                    self._ot_trials[trial_id].set_user_attr(key, result[key])
        super().on_trial_complete(trial_id, result=result, error=error)
