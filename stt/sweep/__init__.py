"""python tune/sweep.py (or python -m stt.sweep): Ray Tune + Optuna over STT's loss weights, entropy selection and label
propagation.

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

The package, by job: plans.py (how much each phase runs), space.py (the search space file, validated
before Ray starts), trials.py (the Tune trials and the Optuna glue), phases.py (the phases over one
experiment folder, resumable), report.py (trials table, plots, summary), cli.py (the command line).
"""
from stt.sweep.cli import get_args_parser, main
from stt.sweep.phases import Sweep
from stt.sweep.plans import PLANS, SweepPlan
from stt.sweep.space import SPACE_FILE, load_space

__all__ = ["PLANS", "SPACE_FILE", "Sweep", "SweepPlan", "get_args_parser", "load_space", "main"]
