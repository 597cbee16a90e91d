"""Training throughput under Ray Train: pairs/s and the fraction of step time spent waiting for data.

Runs `python -m stt.train` (the real trainer: Ray Data stream -> TorchTrainer workers) for a few
steps of one stage and prints rank 0's reported pairs/s and data-wait fraction, averaged over the
reports after the first (warm-up) one. Target on an H100: data wait under 10% at batch 64.

    python bench/train_throughput.py --gpu                       # the documented path: 1 GPU worker, batch 64, 256 px
    python bench/train_throughput.py --workers 2 --batch 64 --gpu --data-cpus 14
    python bench/train_throughput.py                             # CPU smoke: batch 4, 64 px, 1 worker

With no --data it streams the embedded synthetic YouTube-VOS set (prepare shards with
`python -m stt.data.prepare` and pass --data for real numbers).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ray
import ray.train

from stt.train import main as train_main


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="GPU workers, bf16 autocast (default: CPU smoke settings)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--stage", choices=("spatial", "temporal"), default="temporal")
    parser.add_argument("--batch", type=int, help="pairs per worker per step (default: 64 on GPU, 4 on CPU)")
    parser.add_argument("--size", type=int, help="crop size (default: 256 on GPU, 64 on CPU)")
    parser.add_argument("--arch", default="resnet18", choices=("resnet18", "resnet50"))
    parser.add_argument("--steps", type=int, help="steps to run (default: 60 on GPU, 12 on CPU)")
    parser.add_argument("--data", default="", help="shard folder or raw layout (default: the embedded synthetic set)")
    parser.add_argument("--data-cpus", type=float, help="CPUs for Ray Data (default: all but one per worker)")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per training worker (default: 1 on GPU)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    batch = args.batch or (64 if args.gpu else 4)
    size = args.size or (256 if args.gpu else 64)
    steps = args.steps or (60 if args.gpu else 12)
    log_every = max(1, steps // 6)
    if not ray.is_initialized():
        ray.init()
    cpus = ray.cluster_resources().get("CPU", 1.0)
    cpus_per_worker = args.cpus_per_worker or (1.0 if args.gpu else 0.5)
    data_cpus = args.data_cpus or max(0.5, cpus - cpus_per_worker * args.workers)
    # Global distillation needs a spatial teacher; its cost is part of the step, so a random one stands in.
    with tempfile.TemporaryDirectory() as storage:
        overrides = [
            f"model.arch={args.arch}",
            f"train.batch_size={batch}",
            f"data.crop_size={size}",
            f"spatial.image_size={size}",
            f"data.data_cpus={data_cpus}",
            f"data.root={args.data}",
            "train.eval_every=0",
            f"train.log_every={log_every}",
            f"train.checkpoint_every={steps}",
            "train.warmup_steps=1",
            f"spatial.queue_size={max(batch * args.workers, 256)}",
        ]
        if args.stage == "temporal":
            overrides.append("temporal.beta=0")  # no spatial checkpoint here; see --help of stt.train
        argv = [
            "--workers",
            str(args.workers),
            "--stage",
            args.stage,
            "--max-steps",
            str(steps),
            "--storage",
            storage,
            "--name",
            "bench",
            "--cpus-per-worker",
            str(cpus_per_worker),
            *([] if args.gpu else ["--cpu"]),
            *overrides,
        ]
        started = time.perf_counter()
        train_main(argv)
        wall = time.perf_counter() - started
        result = ray.train.Result.from_path(f"{storage}/bench/{args.stage}")
        history = result.metrics_dataframe
    # Only checkpoint reports are kept; with checkpoint_every = steps that is the final one, which
    # averages the steps since the previous log report.
    last = history.iloc[-1]
    print(
        f"{'device':>8} {'arch':>9} {'stage':>9} {'workers':>7} {'batch':>5} {'size':>4} {'steps':>5} "
        f"{'pairs/s':>8} {'data wait':>9} {'wall s':>7}"
    )
    print(
        f"{'gpu' if args.gpu else 'cpu':>8} {args.arch:>9} {args.stage:>9} {args.workers:>7} {batch:>5} {size:>4} "
        f"{steps:>5} {last['pairs_per_s']:8.1f} {last['data_wait_fraction']:9.1%} {wall:7.1f}"
    )
    return {
        "gpu": args.gpu,
        "arch": args.arch,
        "stage": args.stage,
        "workers": args.workers,
        "batch": batch,
        "size": size,
        "steps": steps,
        "pairs_per_s": float(last["pairs_per_s"]),
        "data_wait_fraction": float(last["data_wait_fraction"]),
        "wall_s": wall,
    }


if __name__ == "__main__":
    main()
