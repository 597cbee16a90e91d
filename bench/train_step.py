"""Throughput and peak memory of one temporal training step against the bare backbone.

    python bench/train_step.py [--device cpu|cuda] [--arch resnet18 resnet50] [--size 256]
                               [--batch 2] [--iters 3] [--warmup 1] [--compile]

Two measurements per architecture, in the same run and on the same random uint8 frame pairs:
  backbone   the student encoder forward (res3, res4, res5) + backward on both frames of each pair;
  temporal   stt.stages.train_one_step of temporal_batch_loss (Lab conversion, colour bottleneck,
             student pyramid, frozen teacher, all losses; backward, finite check, Adam step), under
             the default recipe.
On CUDA both run under bf16 autocast with channels_last; `--compile` adds torch.compile'd rows.
Each measurement runs in its own process, so "peak" is that process's alone: on CUDA the peak
of allocated memory, on CPU the peak resident set (which includes ~0.3-0.5 GB of Python, torch
and libraries). Prints one table; not a test.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import torch

from stt.config import Config
from stt.features import resolve_device
from stt.models import LEVELS, build_encoder, build_teacher
from stt.stages import temporal_batch_loss, train_one_step


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default=resolve_device("auto").type, choices=("cpu", "cuda"))
    parser.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"], choices=("resnet18", "resnet50"))
    parser.add_argument("--size", type=int, default=256, help="square crop side (training uses 256)")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: 2 on CPU, 32 on CUDA)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps (default: 3 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 1 on CPU, 5 on CUDA)")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile'd student and step")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    return parser


def measure(case: dict) -> dict:
    """One row: run `case["what"]` for warmup + iters steps in this (fresh) process."""
    if case["threads"]:
        torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    cfg = Config()
    cfg.model.arch = case["arch"]
    student = build_encoder(cfg.model).to(device)
    teacher = build_teacher(cfg.model, student.state_dict()).to(device)
    if cuda:
        student.to(memory_format=torch.channels_last)
        teacher.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.temporal.lr)
    size, batch = case["size"], case["batch"]
    frames = torch.randint(0, 256, (2, batch, 3, size, size), dtype=torch.uint8, device=device)
    pair = {"target": frames[0], "reference": frames[1]}

    forward = torch.compile(student) if case["compile"] else student
    step_losses = torch.compile(temporal_batch_loss) if case["compile"] else temporal_batch_loss

    def backbone_step() -> None:
        x = torch.cat([pair["target"], pair["reference"]]).float().div(255.0)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        pyramid = forward(x, layers=LEVELS)
        sum(features.float().mean() for features in pyramid.values()).backward()
        student.zero_grad(set_to_none=True)

    def full_step() -> None:  # the trainer's own step: losses, backward, the finite check, Adam
        # the default recipe keeps L_gc: beta as configured
        train_one_step(lambda: step_losses(forward, teacher, pair, cfg.temporal), optimizer, cfg.temporal.lr, device)

    step = backbone_step if case["what"] == "backbone" else full_step

    def run(count: int) -> None:
        for _ in range(count):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                step()
        if cuda:
            torch.cuda.synchronize()

    run(case["warmup"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    run(case["iters"])
    seconds = time.perf_counter() - started
    if cuda:
        peak_gb = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return {
        **case,
        "pairs_per_s": batch * case["iters"] / seconds,
        "step_s": seconds / case["iters"],
        "peak_gb": peak_gb,
    }


def main(args: argparse.Namespace) -> None:
    cpu = args.device == "cpu"
    defaults = {"batch": 2 if cpu else 32, "iters": 3 if cpu else 20, "warmup": 1 if cpu else 5}
    settings = {
        name: getattr(args, name) if getattr(args, name) is not None else value for name, value in defaults.items()
    }
    cases = [
        {
            "arch": arch,
            "what": what,
            "compile": compiled,
            "device": args.device,
            "size": args.size,
            "threads": args.threads,
            **settings,
        }
        for arch in args.arch
        for compiled in ([False, True] if args.compile else [False])
        for what in ("backbone", "temporal")
    ]
    # A fresh process per row keeps peaks separate and one row's caches out of the next's timing.
    context = multiprocessing.get_context("spawn")
    rows = []
    for case in cases:
        with context.Pool(1) as pool:
            rows.append(pool.apply(measure, (case,)))

    memory = "peak alloc GB" if not cpu else "peak RSS GB"
    precision = "bf16 autocast, channels_last" if not cpu else "fp32"
    threads = args.threads or torch.get_num_threads()
    print(
        f"device={args.device} ({precision}{f', {threads} threads' if cpu else ''}), {args.size}x{args.size}, "
        f"{settings['batch']} pairs/step, {settings['iters']} timed steps after {settings['warmup']} warm-up"
    )
    print(f"{'arch':<10} {'mode':<8} {'measured':<40} {'pairs/s':>9} {'s/step':>8} {memory:>14} {'x backbone':>11}")
    baseline = {}
    for row in rows:
        mode = "compile" if row["compile"] else "eager"
        label = "backbone fwd+bwd" if row["what"] == "backbone" else "temporal step (+teacher, losses, Adam)"
        key = (row["arch"], mode)
        if row["what"] == "backbone":
            baseline[key] = row["step_s"]
        ratio = row["step_s"] / baseline[key] if key in baseline else float("nan")
        print(
            f"{row['arch']:<10} {mode:<8} {label:<40} {row['pairs_per_s']:>9.2f} {row['step_s']:>8.3f} "
            f"{row['peak_gb']:>14.2f} {ratio:>11.2f}"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
