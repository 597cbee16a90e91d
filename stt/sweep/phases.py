"""The phases of one sweep over one experiment folder (`Sweep`): the recipe's earlier stages, the training
trials of its last stage, the propagation trials (on the candidates of stt/sweep/candidates.py), the report, the
confirmation and the yardsticks. How a phase knows it finished is stt/sweep/completion.py; `state.json` records
what finished, so `--resume` skips it."""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import ray
import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from stt.config import Config, PropagationConfig, to_dict
from stt.errors import UsageError
from stt.evaluate import copy_first_mask, evaluate_davis
from stt.models import feature_stride
from stt.observe import TrialProgress
from stt.recipes import recipe_of, stage_spec
from stt.sweep.candidates import TuningSplit, build_candidates
from stt.sweep.completion import check_finished, fit_in_driver
from stt.sweep.confirmation import ARMS, compare, confirmation_trial, read_runs
from stt.sweep.plans import SweepPlan
from stt.sweep.space import starting_point, training_groups, tuned_stage, with_params
from stt.sweep.trials import (
    METRIC,
    PropagationSearch,
    PropagationTrial,
    PrunedAwareOptunaSearch,
    cluster_concurrency,
    driving_trial_resources,
    fail_stale_trials,
    optuna_storage,
    training_trial,
)
from stt.train import build_stage_trainer, export_final


class Sweep:
    """The five phases over one experiment folder; `state.json` records what is finished."""

    def __init__(self, args: argparse.Namespace, plan: SweepPlan, base: Config, space: dict):
        self.args, self.plan, self.space = args, plan, space
        self.base = base
        # The training trials tune the recipe's last stage; phase 1 trains the ones before it.
        self.stage = tuned_stage(base)
        self.earlier = recipe_of(base).stages[:-1]
        self.experiment = Path(args.storage).absolute() / args.name
        self.experiment.mkdir(parents=True, exist_ok=True)
        self.state_file = self.experiment / "state.json"
        self.state = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
        if "spatial_checkpoint" in self.state:  # its name in sweeps stored before any recipe could be swept
            self.state["init_checkpoint"] = self.state.pop("spatial_checkpoint")
        self.use_gpu = not args.cpu and ray.cluster_resources().get("GPU", 0) >= 1
        # A worker that decodes its own data (data.decode_in_worker) needs a whole core; else half of one beside
        # Ray Data's.
        self.cpus_per_worker = 1.0 if self.use_gpu or base.data.decode_in_worker else 0.5

    def save_state(self, **entries) -> None:
        self.state.update(entries)
        self.state_file.write_text(json.dumps(self.state, indent=1))

    def tuner(
        self,
        name: str,
        trainable,
        param_space: dict,
        search: OptunaSearch,
        scheduler,
        concurrency: int,
        samples: int,
        reuse_actors: bool = False,
        metric: str | None = METRIC,
    ):
        path = self.experiment / name
        # A phase that crashed before Tune saved its first experiment state has nothing to restore.
        stored = any(path.glob("experiment_state-*.json"))
        if self.args.resume and stored:
            print(f"sweep: resuming the {name} trials from {path}")
            return tune.Tuner.restore(
                str(path), trainable=trainable, resume_unfinished=True, resume_errored=True, param_space=param_space
            )
        if stored:
            raise UsageError(
                f"{path}: the {name} trials of an unfinished sweep are stored there; run the same command "
                "with --resume to continue it, or give a new --name"
            )
        fail_stale_trials(self.experiment, name)
        return tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=metric,
                mode="max" if metric else None,
                search_alg=search,
                scheduler=scheduler,
                num_samples=samples,
                max_concurrent_trials=concurrency,
                reuse_actors=reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=str(self.experiment),
                callbacks=[TrialProgress(name, trial_count(param_space, samples))],
                # a propagation trial (a class Trainable) is one result, nothing to resume from; Tune's default
                # for classes would save each one's state at its end
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                # a failed trial is recorded, the sweep goes on
                failure_config=tune.FailureConfig(fail_fast=False),
            ),
        )

    def train_in_driver(self, cfg: Config, stage: str, run_dir: str, init: str, phase: str, destination: Path) -> str:
        """Train `stage` under `cfg` (for `cfg.train.max_steps`) as the driver's own Ray Train run, and export
        its final checkpoint to `destination`."""
        trainer = build_stage_trainer(
            stage_spec(cfg, stage),
            run_dir,
            init,
            use_gpu=self.use_gpu,
            workers=self.plan.workers_per_trial,
            cpus_per_worker=self.cpus_per_worker,
        )
        export_final(fit_in_driver(trainer, phase, cfg.train.max_steps).checkpoint, str(destination))
        return str(destination)

    @property
    def first_phase(self) -> str:
        """Phase 1 as its messages name it."""
        if not self.earlier:
            return "phase 1/5 (no earlier stage)"
        return f"phase 1/5 (the {' and '.join(self.earlier)} stage{'s' if len(self.earlier) > 1 else ''})"

    def earlier_stages(self) -> str:
        """Phase 1: the recipe's stages before the one the trials tune, each from the one before; returns the
        checkpoint the training trials start from (and distil, or are regularised toward): the last of them,
        or `--init` instead of training them ("" for a one-stage recipe without --init)."""
        if "init_checkpoint" in self.state:
            return self.state["init_checkpoint"]
        checkpoint, recipe = self.args.init, self.base.train.recipe
        if not self.earlier:
            print(
                f"sweep: phase 1/5 skipped: train.recipe={recipe} has one stage, {self.stage}, which the training "
                f"trials tune{f' from --init {checkpoint}' if checkpoint else ''}"
            )
        elif checkpoint:
            print(f"sweep: phase 1/5 skipped: --init {checkpoint} stands for the {' and '.join(self.earlier)} stage")
        else:
            cfg = replace_train(self.base, max_steps=self.plan.earlier_steps, eval_every=0)
            for stage in self.earlier:
                print(f"sweep: phase 1/5, {stage} stage ({self.plan.earlier_steps} steps)")
                checkpoint = self.train_in_driver(
                    cfg,
                    stage,
                    str(self.experiment / stage),
                    checkpoint,
                    self.first_phase,
                    self.experiment / f"{stage}-final.pt",
                )
        self.save_state(init_checkpoint=checkpoint)
        return checkpoint

    def training(self, init_checkpoint: str) -> dict:
        if "best_training" in self.state:
            return self.state["best_training"]
        plan = self.plan
        groups = ", ".join(training_groups(stage_spec(self.base, self.stage)))
        rungs = (
            f"ASHA keeps 1/{plan.reduction_factor} of the trials at each rung: step {', '.join(map(str, plan.rungs))}"
            if plan.rungs
            else "no early stopping"
        )
        print(
            f"sweep: phase 2/5, {plan.training_trials} training trials of the {self.stage} stage "
            f"(train.recipe={self.base.train.recipe}, space groups {groups}), up to {plan.trial_steps} steps each, "
            f"J&F on DAVIS '{self.args.tune_set}' at steps {', '.join(map(str, plan.evaluations))} ({rungs})"
        )
        search = PrunedAwareOptunaSearch(
            seed=plan.seed, study_name="training", storage=optuna_storage(self.experiment), full_steps=plan.trial_steps
        )
        asha = (
            ASHAScheduler(
                time_attr="step",
                max_t=plan.trial_steps,
                grace_period=plan.rungs[0],
                reduction_factor=plan.reduction_factor,
            )
            if plan.rungs
            else None
        )
        concurrency = cluster_concurrency(self.trial_cpus, plan.workers_per_trial if self.use_gpu else 0)
        trainable = self.training_trainable(init_checkpoint)
        results = self.tuner(
            "training", trainable, self.space["training"], search, asha, concurrency, plan.training_trials
        ).fit()
        check_finished(results, "phase 2/5", "training", plan.training_trials)
        # Each trial's last J&F report carries its latest checkpoint, so comparing last results keeps
        # the chosen J&F and the chosen checkpoint the same model (an early peak's weights may be gone).
        best = best_result(results, full_steps=plan.trial_steps)
        run = self.experiment / "training-runs" / best.metrics["trial_id"] / self.stage
        chosen = {
            "params": {k: best.config[k] for k in self.space["training"]},
            "tuning_jf": best.metrics[METRIC],
            "checkpoint": str(latest_checkpoint(run, self.stage)),
        }
        self.save_state(best_training=chosen)
        return chosen

    @property
    def trial_cpus(self) -> float:
        """The CPUs of one training run: its Train workers, and Ray Data's unless the workers decode."""
        plan, data = self.plan, self.base.data
        return plan.workers_per_trial * self.cpus_per_worker + (0.0 if data.decode_in_worker else data.data_cpus)

    def training_trainable(self, init_checkpoint: str):
        """The training trial with its fixed arguments: the base config for the plan's trial length and
        evaluations, the stage, its initialisation and where its runs go."""
        plan = self.plan
        driver, cpus_per_worker = driving_trial_resources(plan.workers_per_trial, self.cpus_per_worker)
        base = to_dict(
            replace_train(
                self.base,
                max_steps=plan.trial_steps,
                eval_every=0,
                eval_steps=plan.evaluations,
                checkpoint_every=plan.trial_steps,
                eval_davis_root=self.args.davis_root,
                eval_davis_set=self.args.tune_set,
            )
        )
        return tune.with_resources(
            tune.with_parameters(
                training_trial,
                base=base,
                stage=self.stage,
                init=init_checkpoint,
                runs=str(self.experiment / "training-runs"),
                workers=plan.workers_per_trial,
                cpus_per_worker=cpus_per_worker,
                use_gpu=self.use_gpu,
            ),
            driver,
        )

    def propagation(self, best_training: dict) -> dict:
        if "best_propagation" in self.state:
            return self.state["best_propagation"]
        plan, args, started = self.plan, self.args, time.perf_counter()
        cfg = with_params(self.base, best_training["params"])
        base, checkpoint, cache = to_dict(cfg), best_training["checkpoint"], self.experiment / "features"
        print(f"sweep: phase 3/5, {plan.propagation_trials} propagation trials on cached features of {checkpoint}")
        # Extract once here, so every trial is a cache hit (each asserts it ran no network).
        default = evaluate_davis(
            Path(args.davis_root), checkpoint, cfg, None, split=args.tune_set, feature_cache=cache, progress=False
        )
        space = self.space["propagation"]
        split = TuningSplit(cfg, checkpoint, cache, args.davis_root, args.tune_set)
        graphs, stores = build_candidates(space, split)
        trainable = tune.with_parameters(  # Ray: the trial actors get these once, through the object store
            PropagationTrial,
            base=base,
            checkpoint=checkpoint,
            davis_root=args.davis_root,
            tune_set=args.tune_set,
            feature_cache=str(cache),
            graphs=graphs,
            stores=stores,
        )
        results = self.tuner(
            "propagation",
            trainable,
            space,
            self.propagation_search(split.propagation),
            None,
            cluster_concurrency(1.0, 0),
            plan.propagation_trials,
            # a trial's own work is seconds: a fresh actor would load the split again for every one
            reuse_actors=True,
        ).fit()
        check_finished(results, "phase 3/5", "propagation", plan.propagation_trials)
        print(f"{graph_use(results)}; phase 3 took {time.perf_counter() - started:.0f} s")
        best = best_result(results)
        chosen = {
            "params": {k: best.config[k] for k in self.space["propagation"]},
            "tuning_jf": best.metrics[METRIC],
            "default_tuning_jf": default["summary"]["J&F-Mean"],
        }
        self.save_state(best_propagation=chosen)
        return chosen

    def propagation_search(self, base: PropagationConfig) -> PropagationSearch:
        """Optuna over the propagation space, starting from `base` (the trials' base propagation, its radius
        resolved for the checkpoint's stride) where the space holds it."""
        return PropagationSearch(
            seed=self.plan.seed,
            study_name="propagation",
            storage=optuna_storage(self.experiment),
            points_to_evaluate=starting_point(self.space["propagation"], base),
        )

    def report(self, best_training: dict, best_propagation: dict) -> dict:
        if "final" in self.state:
            return self.state["final"]
        args = self.args
        cfg = with_params(self.base, {**best_training["params"], **best_propagation["params"]})
        print(f"sweep: phase 4/5, the best configuration evaluated once on DAVIS '{args.report_set}'")
        final = evaluate_davis(
            Path(args.davis_root),
            best_training["checkpoint"],
            cfg,
            self.experiment / "final-results",
            split=args.report_set,
            feature_cache=self.experiment / "features",
            progress=False,
        )
        (self.experiment / "best.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        entry = {
            "reported_jf": final["summary"]["J&F-Mean"],
            "summary": final["summary"],
            "checkpoint": best_training["checkpoint"],
            "max_short_side": cfg.eval.max_short_side,
        }
        self.save_state(final=entry)
        return entry

    def confirmation(self, init_checkpoint: str, best_training: dict, best_propagation: dict) -> dict:
        """Phase 5: the chosen training configuration and the untuned defaults, each retrained with `confirm_seeds`
        new seeds and evaluated on the reported split under the default and the tuned propagation, compared
        pairwise with bootstrap intervals (stt/sweep/confirmation.py). Two runs at a time where the CPUs allow;
        a resumed sweep keeps the finished runs."""
        if "confirmation" in self.state:
            return self.state["confirmation"]
        plan, args = self.plan, self.args
        seeds = [self.base.train.seed + 1 + i for i in range(plan.confirm_seeds)]
        print(
            f"sweep: phase 5/5, the confirmation: the tuned training and the untuned defaults, {len(seeds)} new "
            f"seed{'s' if len(seeds) > 1 else ''} each ({', '.join(map(str, seeds))}), {plan.trial_steps} steps, "
            f"each evaluated on DAVIS '{args.report_set}' with the default and the tuned propagation"
        )
        runs = self.experiment / "confirmation-runs"
        trainable = self.confirmation_trainable(init_checkpoint, best_training, best_propagation, runs)
        grid = {"arm": tune.grid_search(list(ARMS)), "seed": tune.grid_search(seeds)}
        concurrency = cluster_concurrency(self.trial_cpus, plan.workers_per_trial if self.use_gpu else 0)
        results = self.tuner("confirmation", trainable, grid, None, None, concurrency, 1, metric=None).fit()
        check_finished(results, "phase 5/5", "confirmation", len(ARMS) * len(seeds))
        failed = [result for result in results if result.error]
        if failed:
            raise RuntimeError(f"{len(failed)} confirmation runs failed; the first: {failed[0].error}")
        confirmation = {**compare(read_runs(runs, seeds), seeds), "runs": read_runs(runs, seeds)}
        self.save_state(confirmation=confirmation)
        return confirmation

    def confirmation_trainable(self, init_checkpoint: str, best_training: dict, best_propagation: dict, runs: Path):
        """The confirmation run with its fixed arguments: both arms' settings, the plan's trial length, the
        reported split; its runs go under `runs`."""
        plan, args = self.plan, self.args
        base = replace_train(self.base, max_steps=plan.trial_steps, eval_every=0, checkpoint_every=plan.trial_steps)
        driver, cpus_per_worker = driving_trial_resources(plan.workers_per_trial, self.cpus_per_worker)
        return tune.with_resources(
            tune.with_parameters(
                confirmation_trial,
                base=to_dict(base),
                training_params=best_training["params"],
                propagation_params=best_propagation["params"],
                stage=self.stage,
                init=init_checkpoint,
                runs=str(runs),
                workers=plan.workers_per_trial,
                cpus_per_worker=cpus_per_worker,
                use_gpu=self.use_gpu,
                davis_root=args.davis_root,
                report_set=args.report_set,
                feature_cache=str(self.experiment / "features"),
            ),
            driver,
        )

    def yardsticks(self, best_training: dict) -> dict:
        """What the reported J&F is read against, each evaluated once on the reported split at the result's
        resolution with the default propagation: the tuned training with default propagation (what the
        propagation search added), random init, Lab pixels and the first mask copied. (The untuned defaults are
        the confirmation's, several seeds of them.)"""
        if "yardsticks" in self.state:
            return self.state["yardsticks"]
        args, plan = self.args, self.plan
        stride = feature_stride(self.base.model, self.base.eval.layer)  # the trained model's grid, e.g. 8 for 8-maxpool
        print(f"sweep: yardsticks on DAVIS '{args.report_set}' (random init, Lab pixels, the copied first mask)")
        sources = {
            "tuned training, default propagation": best_training["checkpoint"],
            "random init": f"random:{plan.seed}",
            f"Lab pixels (stride {stride})": f"lab:{stride}",
        }
        rows = {}
        for name, source in sources.items():  # cached features: a rerun costs propagation only
            summary = evaluate_davis(
                Path(args.davis_root),
                source,
                self.base,
                None,
                split=args.report_set,
                feature_cache=self.experiment / "features",
                progress=False,
            )["summary"]
            rows[name] = {"source": source, **jf_row(summary)}
        copied = copy_first_mask(Path(args.davis_root), args.report_set)
        rows["first mask copied"] = {"source": "copy", **jf_row(copied)}
        self.save_state(yardsticks=rows)
        return rows


def trial_count(param_space: dict, samples: int) -> int:
    """How many trials Tune runs: `samples` of every combination of the space's grid_search values (the
    confirmation's arms x seeds), `samples` when it has none."""
    grids = [v["grid_search"] for v in param_space.values() if isinstance(v, dict) and "grid_search" in v]
    return samples * math.prod(len(values) for values in grids)


def jf_row(summary: dict) -> dict[str, float]:
    """A yardstick's numbers from an evaluation's DAVIS summary."""
    return {"J&F": summary["J&F-Mean"], "J": summary["J-Mean"], "F": summary["F-Mean"]}


def graph_use(results) -> str:
    """A line saying how many propagation trials the graphs served, and what fraction of their targets fell back."""
    on_graph = [r.metrics for r in results if r.metrics and r.metrics.get("graph") == "served"]
    line = f"sweep: {len(on_graph)} of {len(results)} propagation trials ran on the graphs"
    if on_graph:
        fraction = sum(m["graph_fallback_fraction"] for m in on_graph) / len(on_graph)
        line += f", {fraction:.2%} of their target locations computed the usual way"
    return line


def best_result(results, full_steps: int | None = None) -> ray.tune.Result:
    """The trial with the highest last-reported J&F. With `full_steps` (training), only trials that trained the
    full budget compete: a trial ASHA stopped at a rung reports an early J&F, not comparable with a full run's,
    and its configuration is retrained (confirmation) and propagated (phase 3) at the full budget. Ties (common on
    tiny or early models) go to the larger trial id, so a resumed sweep, whose restored results Tune may list in
    another order, chooses the same trial."""
    scored = [result for result in results if result.metrics and METRIC in result.metrics]
    if full_steps is not None:
        scored = [result for result in scored if result.metrics.get("step", 0) >= full_steps]
    if not scored:
        budget = f" at step {full_steps}" if full_steps is not None else ""
        raise RuntimeError(f"no trial reported a tuning J&F{budget}; see the trials' errors above")
    return max(scored, key=lambda result: (result.metrics[METRIC], result.metrics["trial_id"]))


def latest_checkpoint(run: Path, stage: str) -> Path:
    """The newest `checkpoint.pt` of a training trial's Ray Train run (the checkpoint of its last J&F report)."""
    found = sorted(run.glob(f"{stage}-step*/checkpoint.pt"))
    if not found:
        raise FileNotFoundError(f"no checkpoint under {run}")
    return found[-1]


def replace_train(cfg: Config, **changes) -> Config:
    """A copy of `cfg` with `changes` to its train section."""
    copy = with_params(cfg, {})
    copy.train = replace(copy.train, **changes)
    return copy
