"""How much of each phase a sweep runs: `SweepPlan`, and the named plans of `--plan`."""

from __future__ import annotations

from dataclasses import dataclass

from stt.errors import UsageError


@dataclass(frozen=True)
class SweepPlan:
    """How much of each phase to run. Checked when made: a bad plan is one line, before Ray starts."""

    training_trials: int
    propagation_trials: int
    earlier_steps: int  # steps of each stage phase 1 trains (the recipe's stages before its last)
    trial_steps: int  # steps of a training trial that is never stopped early (the recipe's last stage)
    # ASHA's rungs: the steps at which a training trial reports J&F on the tuning split and the weaker trials
    # stop; geometric, rungs[i] = rungs[0] * reduction_factor**i, each below trial_steps (ASHA's milestones)
    rungs: tuple[int, ...]
    reduction_factor: int  # ASHA keeps 1/reduction_factor of the trials at each rung
    # the confirmation: the tuned and the untuned default training, each retrained with this many new seeds
    confirm_seeds: int
    workers_per_trial: int = 1
    seed: int = 0
    overrides: tuple[str, ...] = ()  # config overrides that size the runs (model input, batch)
    extra_evaluations: tuple[int, ...] = ()  # more steps to report J&F at (bench/rung_correlation.py)
    name: str = "sweep plan"  # how messages name it

    def __post_init__(self) -> None:
        for name in ("training_trials", "propagation_trials", "trial_steps", "confirm_seeds", "workers_per_trial"):
            if not getattr(self, name) >= 1:
                raise UsageError(f"{self.name}: {name} expected an integer >= 1, got {getattr(self, name)!r}")
        if self.earlier_steps < 1:
            raise UsageError(f"{self.name}: earlier_steps expected an integer >= 1, got {self.earlier_steps!r}")
        if self.reduction_factor < 2:
            raise UsageError(f"{self.name}: reduction_factor expected an integer >= 2, got {self.reduction_factor!r}")
        if any(rung >= self.trial_steps for rung in self.rungs):
            raise UsageError(
                f"{self.name}: rungs {list(self.rungs)} exceed its trial_steps {self.trial_steps}: "
                "every rung must lie below the full trial"
            )
        if any(step > self.trial_steps for step in self.extra_evaluations):
            raise UsageError(
                f"{self.name}: extra evaluations {list(self.extra_evaluations)} exceed its "
                f"trial_steps {self.trial_steps}"
            )
        if self.rungs and list(self.rungs) != asha_milestones(self.rungs[0], self.reduction_factor, self.trial_steps):
            raise UsageError(
                f"{self.name}: rungs {list(self.rungs)} are not ASHA's for a first rung of {self.rungs[0]}, "
                f"reduction factor {self.reduction_factor} and {self.trial_steps} steps: expected "
                f"{asha_milestones(self.rungs[0], self.reduction_factor, self.trial_steps)}"
            )
        if any(step < 1 for step in self.extra_evaluations):
            raise UsageError(f"{self.name}: extra evaluations expected steps >= 1, got {list(self.extra_evaluations)}")

    @property
    def evaluations(self) -> tuple[int, ...]:
        """The steps at which a training trial reports J&F on the tuning split: the rungs, then its end."""
        return tuple(sorted({*self.rungs, *self.extra_evaluations, self.trial_steps}))


def asha_milestones(first: int, reduction_factor: int, steps: int) -> list[int]:
    """The steps below `steps` at which Ray Tune's ASHAScheduler(grace_period=first, reduction_factor,
    max_t=steps) compares trials: first * reduction_factor**i."""
    if first < 1:
        raise UsageError(f"rungs: expected steps >= 1, got a first rung of {first}")
    milestones, step = [], first
    while step < steps:
        milestones.append(step)
        step *= reduction_factor
    return milestones


# Real-video plans: configs/laptop.yaml's crops, batch and rates (its comments say why each).
REAL_VIDEO = (
    "data.crop_size=128",
    "train.batch_size=8",
    "spatial.image_size=128",
    "spatial.queue_size=1024",
    "temporal.lr=5e-4",
    "temporal.lr_batch=8",
    "spatial.lr_batch=8",
    "train.warmup_steps=20",
    # train.recipe=vfs: its frames at the same size, vfs.lr the effective rate at this batch (as spatial.lr)
    "vfs.image_size=128",
    "vfs.lr_batch=8",
)

PLANS = {
    # Minutes on a 2-core laptop: small crops and batches, few steps, few trials.
    "quick": SweepPlan(
        name="--plan quick",
        training_trials=3,
        # 10x the 8 of the sweep before graph trials, in the same phase-3 wall time (BENCHMARKS.md, issue 12)
        propagation_trials=80,
        earlier_steps=10,
        trial_steps=12,
        rungs=(6,),
        reduction_factor=2,
        confirm_seeds=2,
        overrides=(
            "data.crop_size=96",
            "train.batch_size=4",
            "spatial.image_size=96",
            # Ray Data's stream start-up was 55-81 % of such short trials
            "data.decode_in_worker=true",
            "spatial.queue_size=256",
            "train.warmup_steps=2",
            # the default rates for this plan's batch of 4 (not scaled down to it)
            "temporal.lr_batch=4",
            "spatial.lr_batch=4",
            "vfs.lr_batch=4",
            "vfs.image_size=96",
            # n = 7, paper 004's fixed comparison setting; phase 3 searches it
            "propagation.context=7",
            # every J&F of this plan (tuning and reported) at short side 128
            "eval.max_short_side=128",
        ),
    ),
    # Real video on a 2-core laptop (e.g. ../shared/data/ytvos-real with data.frame_gap=4): configs/laptop.yaml's
    # crops, batch and lr, trials long enough for features to move (its learning curve, BENCHMARKS.md: +0.15 J&F
    # over random init by step 100), J&F at short side 240 (at 128 a random-init network collapses to J&F 0.03
    # on real DAVIS, below the copied first mask).
    # One rung, at 50 of 100 steps: bench/rung_correlation.py on this data (BENCHMARKS.md, "Do early rungs rank
    # like full runs?") gave Spearman 0.93 (95 % 0.62-1.0) between J&F at step 50 and at 100 over 8
    # configurations, 0.64 (-0.22-1.0) at step 25, so a rung at 25 would stop trials on noise. Reduction factor 3:
    # a third of the trials go on to 100.
    # Measured costs on one core (2-core machine, idle): a step 2.7 s, an evaluation on DAVIS train at 240 165 s
    # (features 108 s, propagation 50 s; 132 s since stt.allocator): the evaluations, not the steps, bound how many
    # trials fit. Measured 2026-12-07 on an idle 2-core machine: the whole plan in 1 h 59 min (phase 2 60 min, the
    # confirmation 39 min), not one hour.
    "laptop": SweepPlan(
        name="--plan laptop",
        training_trials=12,
        propagation_trials=12,
        earlier_steps=100,
        trial_steps=100,
        rungs=(50,),
        reduction_factor=3,
        confirm_seeds=3,
        overrides=(
            *REAL_VIDEO,
            "eval.max_short_side=240",
            "data.decode_in_worker=true",
            # n = 7, paper 004's fixed comparison setting (phase 3 searches it): an evaluation on real DAVIS train at
            # 240 costs ~70 s of features and ~80 s of propagation at n = 20 on one core, ~30 s at n = 7
            "propagation.context=7",
        ),
    ),
    # A longer local sweep on the same data (an hour or two on a laptop CPU).
    "local": SweepPlan(
        name="--plan local",
        training_trials=8,
        propagation_trials=30,
        earlier_steps=200,
        trial_steps=300,
        rungs=(100,),
        reduction_factor=3,
        confirm_seeds=3,
        overrides=REAL_VIDEO,
    ),
}
