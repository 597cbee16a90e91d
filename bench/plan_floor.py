"""How close a sweep plan runs to this CPU's arithmetic limit, and the least wall it could take (issue 24).

    python bench/plan_floor.py --davis-root ../shared/data/davis-real [--plan laptop] [--threads 1] [--iters 3]

Counts the floating-point work of the plan's two repeated network calls with torch's FlopCounterMode:
  step    one temporal training step at the plan's sizes (temporal_batch_loss with the frozen teacher,
          backward, Adam), as a training or confirmation trial runs it;
  frame   stt.features.FeatureExtractor on one DAVIS frame (854 x 480) at the plan's evaluation short side;
times each on `--threads` threads (a trial's Train worker holds one CPU), and measures the same threads'
fp32 matrix-multiply rate for reference (oneDNN's convolutions can beat it slightly). Then multiplies by the
plan's counts: phase 2's steps and evaluations on the tuning split (every trial up to the first rung, and at each
rung ceil(1/reduction_factor) of those left go on, as ASHA keeps them), phase 4's one evaluation and phase 5's
confirmation runs (steps and one feature pass each) on the reported split, with the splits' frames read from
--davis-root.
Prints the plan's network work and the core-minutes it takes at the measured speeds and at the matmul rate:
with every core busy, a bound no scheduling of the trials beats on this machine. Phase 1 (the earlier
stages), the propagations and phase 3 are not counted, so the floor is a lower bound. Prints one table; not a test.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from stt.config import load_config
from stt.data.layouts import DAVIS
from stt.features import FeatureExtractor
from stt.models import build_encoder, build_teacher
from stt.stages import temporal_batch_loss, train_one_step
from stt.sweep.plans import PLANS

DAVIS_FRAME = (480, 854)  # DAVIS 480p, height x width


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--davis-root", required=True, help="DAVIS-2017 root: its train and val lists give the frames")
    parser.add_argument("--plan", default="laptop", choices=sorted(PLANS), help="the sweep plan to account for")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads, as one trial's worker (default 1)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="cores the plan runs on (default: all)")
    parser.add_argument("--iters", type=int, default=3, help="timed calls of each after one warm-up call")
    return parser


def split_frames(davis_root: str, split: str) -> int:
    """Frames of a DAVIS split at 480p."""
    dataset = DAVIS(davis_root, split=split)
    return sum(len(dataset.frame_paths(seq)) for seq in dataset.sequences)


def asha_work(plan) -> tuple[int, int]:
    """Phase 2's steps and evaluations when ASHA keeps ceil(1/reduction_factor) of the trials at each rung."""
    running, steps, evaluations, reached = plan.training_trials, 0, 0, 0
    for rung in plan.rungs:
        steps, evaluations, reached = steps + running * (rung - reached), evaluations + running, rung
        running = math.ceil(running / plan.reduction_factor)
    return steps + running * (plan.trial_steps - reached), evaluations + running


def timed(call, iters: int) -> float:
    """Median seconds of `call()` over `iters` calls, after one untimed call."""
    call()
    seconds = []
    for _ in range(iters):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return sorted(seconds)[len(seconds) // 2]


def flops_of(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def matmul_rate(iters: int, side: int = 2048) -> float:
    """fp32 FLOP/s of a square matrix product on these threads."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    return 2 * side**3 / timed(lambda: torch.mm(a, b), iters)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = PLANS[args.plan]
    cfg = load_config(None, list(plan.overrides))
    student = build_encoder(cfg.model)
    teacher = build_teacher(cfg.model, student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.temporal.lr)
    cpu = torch.device("cpu")
    size, batch = cfg.data.crop_size, cfg.train.batch_size
    frames = torch.randint(0, 256, (2, batch, 3, size, size), dtype=torch.uint8)
    pair = {"target": frames[0], "reference": frames[1]}

    def step() -> None:  # the trials' own step: losses, backward, the finite check, Adam
        train_one_step(
            lambda: temporal_batch_loss(student, teacher, pair, cfg.temporal), optimizer, cfg.temporal.lr, cpu
        )

    davis = torch.randint(0, 256, (1, *DAVIS_FRAME, 3), dtype=torch.uint8).numpy()
    extractor = FeatureExtractor("random:0", cfg.model, cfg.eval)  # the evaluator's own path: Lab, resize, res4

    def frame() -> None:
        extractor(davis)

    step_flops, frame_flops = flops_of(step), flops_of(frame)
    step_s, frame_s = timed(step, args.iters), timed(frame, args.iters)
    peak = matmul_rate(args.iters)

    tuning, reported = split_frames(args.davis_root, "train"), split_frames(args.davis_root, "val")
    trial_steps, evaluations = asha_work(plan)
    runs = 2 * plan.confirm_seeds  # the tuned and the default training, each seed
    work = {  # phase: (steps, evaluated frames)
        "2: training trials": (trial_steps, evaluations * tuning),
        "4: the chosen configuration": (0, reported),
        "5: confirmation": (runs * plan.trial_steps, runs * reported),
    }

    print(
        f"{plan.name} ({args.threads} thread{'s' * (args.threads > 1)}): step {batch} pairs at {size} px "
        f"{step_flops / 1e9:.1f} GFLOP in {step_s:.2f} s ({step_flops / step_s / 1e9:.0f} GFLOP/s); "
        f"frame at short side "
        f"{cfg.eval.max_short_side} {frame_flops / 1e9:.1f} GFLOP in {frame_s:.3f} s "
        f"({frame_flops / frame_s / 1e9:.0f} GFLOP/s); fp32 matmul {peak / 1e9:.0f} GFLOP/s"
    )
    print(f"DAVIS frames: {tuning} tuning (train), {reported} reported (val)")
    print("| phase | steps | frames | TFLOP | core-min measured | core-min at matmul rate |")
    print("|---|---|---|---|---|---|")
    total_flops = total_measured = 0.0
    for phase, (steps, evaluated) in work.items():
        flops = steps * step_flops + evaluated * frame_flops
        measured = (steps * step_s + evaluated * frame_s) / 60
        total_flops, total_measured = total_flops + flops, total_measured + measured
        print(f"| {phase} | {steps} | {evaluated} | {flops / 1e12:.1f} | {measured:.1f} | {flops / peak / 60:.1f} |")
    print(f"| total | | | {total_flops / 1e12:.1f} | {total_measured:.1f} | {total_flops / peak / 60:.1f} |")
    trials_at_once = max(1, args.cores // args.threads)  # each as fast as alone: optimistic, so still a floor
    print(
        f"On {args.cores} cores, {trials_at_once} trial(s) at once, the network work alone needs >= "
        f"{total_measured / trials_at_once:.0f} min of wall at these speeds (>= "
        f"{total_flops / peak / 60 / trials_at_once:.0f} min at the matmul rate), before propagation, phases 1 and 3."
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
