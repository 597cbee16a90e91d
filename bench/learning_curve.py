"""Learning curves on real video: J&F on a held-out DAVIS split against training step, with yardsticks.

    python bench/learning_curve.py --data-root ../shared/data/ytvos-real/train_all_frames \
        --davis-root ../shared/data/davis-real --out outputs/learning-curve

Arms (each one `python -m stt.train` run with `--config configs/laptop.yaml`, every checkpoint kept):
- temporal: the temporal stage alone from random init (`train.recipe=temporal`: pyramid reconstruction
  and local correlation distillation; no teacher, so no global distillation);
- spatial-then-temporal: MoCo v2 on the frames of the same videos for `--spatial-steps` (no ImageNet
  exists on this machine), then the temporal stage initialised from it and distilled from it (L_gc).
Every checkpoint is evaluated on `--set` (default val) at the config's `eval.max_short_side` with the
default propagation, and so are the yardsticks, in the same run and with the same settings: the first
mask copied, Lab pixels at stride 8 and 4, and a random-init ResNet-18 (seed 0).

Results accumulate in OUT/curve.json (a rerun skips what is there, so an interrupted run loses
nothing finished); the table is printed and OUT/learning_curve.png drawn. `--phase train` or
`--phase eval` runs one half, e.g. evaluation in a second process while training goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from stt.config import load_config
from stt.evaluate import copy_first_mask, evaluate_davis

LAPTOP = Path(__file__).resolve().parents[1] / "configs" / "laptop.yaml"
YARDSTICKS = ("copy", "lab:8", "lab:4", "random:0")


def train_arms(args: argparse.Namespace) -> None:
    """Run both arms through stt.train's own command line, every checkpoint kept."""
    import ray

    from stt.train import main as train_main
    from stt.train import start_ray

    if not ray.is_initialized():
        start_ray(num_cpus=args.num_cpus)
    options = [
        "--config",
        str(args.config),
        "--storage",
        str(args.out / "runs"),
        "--cpu",
        "--workers",
        "1",
        "--keep-checkpoints",
        "0",
    ]
    overrides = [f"data.root={args.data_root}", *args.overrides]  # positional: after every option
    timings = load(args.out).setdefault("train_seconds", {})
    for arm in args.arms:
        started = time.perf_counter()
        if arm == "temporal":
            train_main(
                [
                    *options,
                    "--name",
                    "temporal",
                    "--stage",
                    "temporal",
                    "--max-steps",
                    str(args.temporal_steps),
                    *overrides,
                    "train.recipe=temporal",
                ]
            )
        elif arm == "spatial-then-temporal":
            spatial = train_main(
                [*options, "--name", arm, "--stage", "spatial", "--max-steps", str(args.spatial_steps), *overrides]
            )
            train_main(
                [
                    *options,
                    "--name",
                    arm,
                    "--stage",
                    "temporal",
                    "--max-steps",
                    str(args.temporal_steps),
                    "--init",
                    spatial["spatial"],
                    *overrides,
                ]
            )
        else:
            raise SystemExit(f"--arms: unknown arm {arm!r}; expected temporal or spatial-then-temporal")
        results = load(args.out)
        results.setdefault("train_seconds", {})[arm] = timings.get(arm, 0.0) + time.perf_counter() - started
        save(args.out, results)


def checkpoints(out: Path, arm: str) -> list[tuple[int, Path]]:
    """(step, file) of every temporal-stage checkpoint an arm has written so far, by step."""
    found = []
    for path in (out / "runs" / arm / "temporal").glob("temporal-step*/checkpoint.pt"):
        found.append((int(path.parent.name.removeprefix("temporal-step")), path))
    return sorted(found)


def load(out: Path) -> dict:
    path = out / "curve.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save(out: Path, results: dict) -> None:
    """Merge `results` into curve.json: a training and an evaluation process may both be writing it."""
    merged = load(out)
    for key, value in results.items():
        merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    tmp = out / f"curve.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(merged, indent=1))
    os.replace(tmp, out / "curve.json")  # atomic: an interrupted write never loses finished points


def evaluate_all(args: argparse.Namespace) -> dict:
    """J&F of every yardstick and every checkpoint not yet in curve.json."""
    cfg = load_config(args.config, args.overrides)
    results = load(args.out)
    points = results.setdefault("points", {})

    def score(key: str, source: str) -> None:
        if key in points:
            return
        started = time.perf_counter()
        if source == "copy":
            summary = copy_first_mask(Path(args.davis_root), args.set)
        else:
            summary = evaluate_davis(
                Path(args.davis_root),
                source,
                cfg,
                None,
                split=args.set,
                device="cpu",
                feature_cache=args.out / "features",
                progress=False,
            )["summary"]
        points[key] = {
            "J&F": summary["J&F-Mean"],
            "J": summary["J-Mean"],
            "F": summary["F-Mean"],
            "seconds": time.perf_counter() - started,
        }
        save(args.out, results)
        print(f"{key}: J&F {summary['J&F-Mean']:.3f} ({points[key]['seconds']:.0f} s)", flush=True)

    for source in YARDSTICKS:
        score(source, source)
    for arm in args.arms:
        for step, path in checkpoints(args.out, arm):
            score(f"{arm}@{step}", str(path))
    results["settings"] = {
        "eval.max_short_side": cfg.eval.max_short_side,
        "set": args.set,
        "davis_root": str(args.davis_root),
        "data_root": str(args.data_root),
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
    }
    save(args.out, results)
    return results


def report(args: argparse.Namespace, results: dict) -> None:
    """The Markdown table and the plot (J&F against temporal step; yardsticks as horizontal lines)."""
    points = results.get("points", {})
    print(
        f"\n# {results['settings']['set']} split of {results['settings']['davis_root']}, short side "
        f"{results['settings']['eval.max_short_side']}, default propagation; {results['settings']['date']}"
    )
    print("| model | step | J&F | J | F |")
    print("|---|---|---|---|---|")
    for source in YARDSTICKS:
        if source in points:
            p = points[source]
            print(f"| {source} | - | {p['J&F']:.3f} | {p['J']:.3f} | {p['F']:.3f} |")
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for arm in args.arms:
        steps = sorted(int(k.split("@")[1]) for k in points if k.startswith(f"{arm}@"))
        for step in steps:
            p = points[f"{arm}@{step}"]
            print(f"| {arm} | {step} | {p['J&F']:.3f} | {p['J']:.3f} | {p['F']:.3f} |")
        if steps:
            axes.plot(steps, [points[f"{arm}@{s}"]["J&F"] for s in steps], marker="o", label=arm)
    for source, style in zip(YARDSTICKS, (":", "--", "-.", (0, (1, 3)))):
        if source in points:
            axes.axhline(points[source]["J&F"], color="grey", linestyle=style, label=source)
    axes.set_xlabel("temporal-stage step (batch 8, 128 px crops)")
    axes.set_ylabel(
        f"J&F, DAVIS {results['settings']['set']} (short side {results['settings']['eval.max_short_side']})"
    )
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(args.out / "learning_curve.png", dpi=120)
    print(f"plot: {args.out / 'learning_curve.png'}; train seconds {results.get('train_seconds', {})}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True, help="training video (YouTube-VOS layout or shards)")
    parser.add_argument("--davis-root", required=True, help="DAVIS-2017 root with the held-out split")
    parser.add_argument("--set", default="val", help="the split the curve is measured on (default val)")
    parser.add_argument("--out", type=Path, default=Path("outputs/learning-curve"))
    parser.add_argument("--config", type=Path, default=LAPTOP)
    parser.add_argument("--arms", default="temporal,spatial-then-temporal")
    parser.add_argument("--temporal-steps", type=int, default=600)
    parser.add_argument("--spatial-steps", type=int, default=200)
    parser.add_argument("--phase", choices=("train", "eval", "all"), default="all")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for training and evaluation")
    args = parser.parse_args(argv)
    args.arms = args.arms.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("train", "all"):
        train_arms(args)
    if args.phase in ("eval", "all"):
        torch.set_num_threads(max(1, torch.get_num_threads()))
        results = evaluate_all(args)
        report(args, results)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"this process: {usage.ru_utime + usage.ru_stime:.0f} CPU-s")


if __name__ == "__main__":
    main()
