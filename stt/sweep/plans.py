"""How much of each phase a sweep runs: `SweepPlan`, and the named plans of `--plan`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SweepPlan:
    """How much of each phase to run."""

    training_trials: int
    propagation_trials: int
    earlier_steps: int  # steps of each stage phase 1 trains (the recipe's stages before its last)
    trial_steps: int  # steps of each training trial (the recipe's last stage), and of the untuned yardstick
    eval_every: int  # steps between tuning J&F reports of a training trial (ASHA's rungs)
    reduction_factor: int  # ASHA keeps 1/reduction_factor of the trials at each rung
    workers_per_trial: int = 1
    seed: int = 0
    overrides: tuple[str, ...] = ()  # config overrides that size the runs (model input, batch)


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
        training_trials=3,
        # 10x the 8 of the sweep before graph trials, in the same phase-3 wall time (BENCHMARKS.md, issue 12)
        propagation_trials=80,
        earlier_steps=10,
        trial_steps=12,
        eval_every=6,
        reduction_factor=2,
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
    # on real DAVIS, below the copied first mask). Estimated from measured step and evaluation costs: ~75 min.
    "laptop": SweepPlan(
        training_trials=3,
        propagation_trials=12,
        earlier_steps=100,
        trial_steps=100,
        eval_every=50,
        reduction_factor=2,
        overrides=(*REAL_VIDEO, "eval.max_short_side=240", "data.decode_in_worker=true"),
    ),
    # A longer local sweep on the same data (an hour or two on a laptop CPU).
    "local": SweepPlan(
        training_trials=8,
        propagation_trials=30,
        earlier_steps=200,
        trial_steps=300,
        eval_every=100,
        reduction_factor=3,
        overrides=REAL_VIDEO,
    ),
}
