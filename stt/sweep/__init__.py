"""python tune/sweep.py (or python -m stt.sweep): Ray Tune + Optuna over a training recipe's settings (STT's loss
weights and entropy selection by default) and label propagation.

    python tune/sweep.py --quick                          # minutes on a laptop, embedded synthetic data
    python tune/sweep.py --plan laptop --data-root ../shared/data/ytvos-real/train_all_frames \
        --davis-root ../shared/data/davis-real data.frame_gap=4   # about two hours on real video, 2 cores
    python tune/sweep.py                                  # a longer local sweep on the same data
    python tune/sweep.py --data-root YTVOS --davis-root DAVIS --storage /mnt/shared/sweeps --name r18
    python tune/sweep.py --resume --name NAME             # continue an interrupted sweep
    python tune/sweep.py --quick train.recipe=vfs         # another recipe: VFS (paper 003), LwF, EWC, ...

Ctrl-C stops the sweep with exit status 130 and one line naming the phase and how many of its trials
finished; nothing is chosen or reported from a phase that did not finish. `--resume` then runs the
phase's unfinished trials (the finished ones are kept, not rerun) and the phases after it.

How the two kinds of trial combine: nested, in five phases, each resumable. The sweep follows
`train.recipe` (stt.recipes; default spatial-then-temporal) and tunes its LAST stage, temporal or vfs.
 1. The recipe's earlier stages, once (the default: the spatial stage, MoCo on still images). The last
    one's encoder initialises every training trial (and is the frozen teacher of global correlation
    distillation, LwF's old network, or EWC's anchor). A one-stage recipe (vfs, temporal) has none:
    its trials start from --init, or from scratch. --init also stands in for the earlier stages.
 2. Training trials: the last stage, one Ray Train `TorchTrainer` inside each Tune trial, with the
    settings of the space file's groups for that stage sampled (the default recipe: loss weights and
    entropy settings; space.yaml says which group applies when). At each of the plan's rungs (e.g. steps 25
    and 50 of 100) the trial reports J&F on the tuning split, scored with the default propagation settings so
    trials compare on features alone, and ASHA stops the weaker ones (bench/rung_correlation.py measures
    whether early rungs rank trials like full runs); OptunaSearch (TPE, seeded) proposes the next.
 3. Propagation trials: on the best training trial's final checkpoint, features of the tuning
    split are extracted once and cached, a top-K affinity graph is built per sequence for the widest
    "overall" setting of the space (stt/propagation/graph.py) and a per-frame store for its per-frame settings
    (stt/propagation/per_frame.py, where it fits in memory); Optuna then searches the propagation factors. Each
    Tune actor holds the split in memory and runs trial after trial (reuse_actors): a trial the graphs or
    stores serve is a filter and gather, any other propagates anew; it costs seconds and never runs the
    network (asserted).
 4. Report: the best training x propagation configuration is evaluated ONCE on the reported
    split. Tuning and reported numbers are both printed, labelled; only the reported one is the
    result (paper 004, Sec. 4.1 and 8: never report the split you tuned on).
 5. Confirmation: is it better than the defaults by more than run-to-run noise? The chosen training
    configuration and the untuned defaults (the same recipe, nothing sampled) are each retrained with
    `--confirm-seeds` NEW seeds from the same start, every run evaluated once on the reported split with the
    default and with the tuned propagation; summary.md prints the paired table (mean, std, the differences
    with 95 % intervals from a paired bootstrap over seeds and sequences) and the verdict, "better", "not
    distinguishable from the defaults" or "worse", read from the interval only (stt/sweep/confirmation.py).
Then the yardsticks the result is read against, once each on the reported split at the same resolution
with the default propagation: the tuned training with default propagation, random init, Lab pixels, the
copied first mask. summary.md and the trials table (kinds "yardstick" and "confirmation") show them.

ASHA-stopped trials are told to Optuna as PRUNED with their intermediate J&F, not COMPLETE, so
TPE ranks them below finished trials instead of mistaking a short run's score for a final one.

Outputs in <storage>/<name>/: trials.parquet and trials.csv (every trial: kind, config, tuning
J&F, state, cost), best.yaml (accepted by `stt.train --config` and `stt.evaluate --config`),
plots/*.png, summary.md, optuna.db (the studies), and the Ray Tune experiments for --resume.

The package, by job: plans.py (how much each phase runs: trials, steps, rungs, seeds), space.py (the search
space file, validated before Ray starts), trials.py (the Tune trials and the Optuna glue), confirmation.py
(phase 5's runs and statistics), candidates.py (the graphs and per-frame stores of phase 3), phases.py (the phases
over one experiment folder, resumable), completion.py (how a phase knows it finished), report.py (trials table,
plots, summary), cli.py (the command line).
"""

from stt.sweep.cli import get_args_parser, main
from stt.sweep.phases import Sweep
from stt.sweep.plans import PLANS, SweepPlan
from stt.sweep.space import SPACE_FILE, load_space

__all__ = ["PLANS", "SPACE_FILE", "Sweep", "SweepPlan", "get_args_parser", "load_space", "main"]
