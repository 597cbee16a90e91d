"""python -m stt.evaluate: label propagation on DAVIS-2017, VIP and JHMDB, and exact scoring.

Reads top to bottom in the order the algorithm runs (as DINO's eval_video_segmentation.py): load
the feature source once (EvaluationRun: extractor, feature cache, clock, metrics.json), then per
video read frames, extract features (cached), downsample the first annotation to the feature grid,
propagate, upsample, argmax, save indexed PNGs, score; last the report.

    python -m stt.evaluate davis --checkpoint CKPT|random|lab:4 --out DIR [--davis-root ROOT] [--set val]
    python -m stt.evaluate vip   --checkpoint CKPT --out DIR [--vip-root ROOT]
    python -m stt.evaluate jhmdb --checkpoint CKPT --out DIR [--jhmdb-root ROOT]
    python -m stt.evaluate score --davis-root ROOT --results DIR [--set val] [--json OUT]

Every subcommand takes `--config FILE.yaml` and trailing dotted overrides such as
`propagation.topk=5`; with no dataset root it uses the embedded synthetic default.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from stt import command
from stt.allocator import retain_freed_memory
from stt.cache import cache_dir
from stt.config import PRESETS, Config, load_config, to_dict
from stt.data.layouts import DAVIS, JHMDB, VIP, read_mask
from stt.data.synthetic import ensure_dataset
from stt.features import FeatureCache, FeatureExtractor, resolve_device
from stt.metrics import (
    DAVIS_SUMMARY_KEYS,
    VIP_NUM_CLASSES,
    confusion_matrix,
    evaluate_davis_sequence,
    mean_iou,
    pck,
    summarize_davis,
)
from stt.observe import save_overlays, with_progress
from stt.paths import check_apart
from stt.propagation import downsample_labels, for_task, propagate, soft_labels_to_mask, upsample_labels


def task_config(cfg: Config, task: str, stride: int) -> Config:
    """`cfg` with the task's propagation defaults filled in (radius None -> the authors' radius for
    `task` at feature `stride`, stt.propagation.for_task); what the report's config then shows."""
    return dataclasses.replace(cfg, propagation=for_task(cfg.propagation, task, stride))


@dataclasses.dataclass(frozen=True)
class EvaluationRun:
    """What evaluating a feature source shares on every benchmark: its feature extractor, the feature
    cache, the config with the task's propagation defaults, a clock, and the report in metrics.json.
    DAVIS, VIP and JHMDB differ only in their videos, labels and scores."""

    task: str  # davis | vip | jhmdb: the propagation defaults (task_config) and the report's `<task>_root`
    checkpoint: str
    cfg: Config
    extractor: FeatureExtractor
    cache: FeatureCache
    started: float

    @classmethod
    def open(cls, task: str, checkpoint: str, cfg: Config, device: str, feature_cache: Path | None) -> EvaluationRun:
        """Load the feature source on `device` (auto: the GPU if there is one). The clock starts once it is
        loaded, so the report's seconds are the videos' (feature extraction, propagation, scoring)."""
        extractor = FeatureExtractor(checkpoint, cfg.model, cfg.eval, resolve_device(device))
        cache = FeatureCache(feature_cache or cache_dir() / "features")
        return cls(task, checkpoint, task_config(cfg, task, extractor.stride), extractor, cache, time.perf_counter())

    def features(self, frame_paths: list[Path], read_frames) -> torch.Tensor:
        """T x C x h x w features of the frames, cached or extracted (`read_frames()` is called only to extract)."""
        return self.cache.load_or_compute(self.extractor, frame_paths, read_frames)

    def square_features(self, frame_paths: list[Path], side: int) -> torch.Tensor:
        """As `features`, of the frames resized to side x side (VIP and JHMDB are evaluated at a fixed size)."""
        resize = functools.partial(resized_frames, frame_paths, (side, side))
        return self.cache.load_or_compute(self.extractor, frame_paths, resize, variant=f"square{side}")

    def report(self, scores: dict, root: Path, out: Path | None, **dataset) -> dict:
        """The report, also written to `out/metrics.json` (if `out`): the scores, the checkpoint, `<task>_root`,
        `dataset` (what else names the data evaluated), the network forward passes (0 when every feature was
        cached), the seconds since `open`, and the config."""
        report = {
            **scores,
            "checkpoint": self.checkpoint,
            f"{self.task}_root": str(root),
            **dataset,
            "network_calls": self.extractor.network_calls,
            "seconds": time.perf_counter() - self.started,
            "config": to_dict(self.cfg),
        }
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(to_jsonable(report), indent=1))
        return report


def propagate_video(
    features: torch.Tensor,
    first_labels: np.ndarray,
    num_labels: int,
    out_size: tuple[int, int],
    cfg: Config,
    implementation: str,
    propagator=None,
) -> np.ndarray:
    """Propagate the first frame's label map through a video.

    features: T x C x h x w; first_labels: H x W integer ids in [0, num_labels).
    propagator: (features, labels L x h x w, cfg.propagation) -> soft labels in place of
    stt.propagation.propagate (the sweep's top-K graph path, stt/propagation/graph.py); None: propagate.
    Returns T x H x W uint8 predicted ids; frame 0 is the given annotation.
    """
    grid = tuple(features.shape[-2:])
    first = torch.from_numpy(first_labels.astype(np.int64))
    labels = downsample_labels(first, num_labels, grid, cfg.propagation.label_sampling).to(features)  # L x h x w
    if propagator is None:
        soft = propagate(features, labels, cfg.propagation, implementation=implementation)  # T x L x h x w
    else:
        soft = propagator(features, labels, cfg.propagation)
    masks = soft_labels_to_mask(soft, out_size, cfg.propagation.minmax_normalise)  # T x H x W
    masks = masks.to(torch.uint8).cpu().numpy()
    masks[0] = first_labels
    return masks


def predict_davis_sequence(
    features: torch.Tensor,
    gt: np.ndarray,
    num_objects: int,
    cfg: Config,
    implementation: str = "windowed",
    propagator=None,
) -> np.ndarray:
    """T x H x W predicted ids of a DAVIS sequence: its first annotation (void read as background)
    propagated through its features (T x C x h x w); gt: T x H x W, 255 = void. As `propagate_video`."""
    first = np.where(gt[0] == 255, 0, gt[0])
    return propagate_video(features, first, num_objects + 1, gt.shape[1:], cfg, implementation, propagator)


def save_indexed_png(mask: np.ndarray, palette: list[int], path: Path) -> None:
    image = Image.fromarray(mask.astype(np.uint8), mode="P")
    image.putpalette(palette)
    image.save(path)


def to_jsonable(value):
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def print_davis_table(summary: dict, rows: list[dict]) -> None:
    """The summary and per-object table on stdout (the sys.stdout of the moment: a default argument would
    keep the one of import time, which a caller redirecting stdout, or pytest's capsys, would not see)."""
    print("  ".join(f"{k:>9}" for k in DAVIS_SUMMARY_KEYS))
    print("  ".join(f"{summary[k]:9.3f}" for k in DAVIS_SUMMARY_KEYS))
    print(f"{'sequence':<28}{'J-Mean':>8}{'F-Mean':>8}")
    for row in rows:
        print(f"{row['sequence'] + '_' + str(row['object']):<28}{row['J-Mean']:8.3f}{row['F-Mean']:8.3f}")


# ----------------------------------------------------------------------------------------- DAVIS
def evaluate_davis(
    root: Path,
    checkpoint: str,
    cfg: Config,
    out: Path | None,
    *,
    split: str = "val",
    resolution: str = "480p",
    device: str = "auto",
    feature_cache: Path | None = None,
    implementation: str = "windowed",
    overlays: bool = False,
    progress: bool = True,
    propagator=None,
) -> dict:
    """Propagate every sequence's first mask, save the results layout under `out` (if given) and score.

    propagator: (sequence, features, labels, propagation config) -> soft labels, in place of
    stt.propagation.propagate (the sweep runs its trials on top-K graphs so); None: propagate.

    Returns the report written to `out/metrics.json`: summary (the seven official keys), one row per
    (sequence, object), and how many network forward passes ran (0 when every feature was cached).
    """
    dataset = DAVIS(root, split=split, resolution=resolution)
    run = EvaluationRun.open("davis", checkpoint, cfg, device, feature_cache)
    rows = []
    for seq in with_progress(dataset.sequences, "davis", "seq", name=str, enabled=progress):
        features = run.features(dataset.frame_paths(seq), lambda seq=seq: dataset.read_frames(seq))
        gt = dataset.read_masks(seq)  # T x H x W, 255 = void
        per_sequence = None if propagator is None else functools.partial(propagator, seq)
        pred = predict_davis_sequence(features, gt, dataset.num_objects(seq), run.cfg, implementation, per_sequence)
        if out is not None:
            palette = dataset.palette(seq)
            (out / seq).mkdir(parents=True, exist_ok=True)
            for mask, path in zip(pred, dataset.mask_paths(seq)):
                save_indexed_png(mask, palette, out / seq / f"{path.stem}.png")
            if overlays:
                save_overlays(dataset.read_frames(seq), pred, palette, out / "overlays" / seq)
        rows.extend(evaluate_davis_sequence(gt, pred, seq))
    return run.report({"summary": summarize_davis(rows), "rows": to_jsonable(rows)}, root, out, set=split)


def copy_first_mask(root: Path, split: str = "val", resolution: str = "480p") -> dict:
    """The no-propagation yardstick: each sequence's first mask copied to every frame, scored like a result."""
    dataset = DAVIS(root, split=split, resolution=resolution)
    rows = []
    for seq in dataset.sequences:
        gt = dataset.read_masks(seq)
        first = np.where(gt[0] == 255, 0, gt[0])
        rows.extend(evaluate_davis_sequence(gt, np.repeat(first[None], len(gt), axis=0), seq))
    return summarize_davis(rows)


def check_out(out: str, root: Path, root_option: str, feature_cache: str | None) -> None:
    """Before any work: --out must be a folder we can write, or a path where one can be made, apart from the
    dataset it is evaluated on (`root`, given as `root_option`: --out inside DAVIS's Annotations/ overwrote the
    ground truth); --feature-cache must be apart from the dataset too."""
    check_apart("--out", out, {root_option: root})
    if feature_cache:
        check_apart("--feature-cache", feature_cache, {root_option: root})
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(
            f"--out {out}: a file is there; expected a folder for the predictions and metrics.json"
        )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not os.access(existing, os.W_OK):
        raise PermissionError(f"--out {out}: {existing} is not writable")


def read_result_masks(results: Path, seq: str, stems: list[str], size: tuple[int, int]) -> np.ndarray:
    """The official evaluator reads only frames 1..T-2; first and last are filled with zeros (never scored).
    Every mask must be `size` (H, W), the ground truth's."""
    inner = []
    for stem in stems[1:-1]:
        path = results / seq / f"{stem}.png"
        inner.append(read_mask(path))
        if inner[-1].shape != size:
            raise ValueError(
                f"{path}: result mask is {inner[-1].shape[1]}x{inner[-1].shape[0]}; expected "
                f"{size[1]}x{size[0]} like the ground truth"
            )
    blank = np.zeros(size, np.uint8)
    return np.stack([blank, *inner, blank])


def score_davis(
    davis_root: Path, results: Path, split: str, resolution: str = "480p", progress: bool = True
) -> tuple[dict, list[dict]]:
    """Score a results folder `results/<seq>/<frame>.png` exactly like the official semi-supervised DAVIS tool."""
    if not results.is_dir():
        raise FileNotFoundError(f"--results {results}: no such folder; expected RESULTS/<sequence>/<frame>.png")
    dataset = DAVIS(davis_root, split=split, resolution=resolution)
    rows = []
    for seq in with_progress(dataset.sequences, "score", "seq", name=str, enabled=progress):
        gt = dataset.read_masks(seq)
        stems = [p.stem for p in dataset.mask_paths(seq)]
        pred = read_result_masks(results, seq, stems, gt.shape[1:])
        rows.extend(evaluate_davis_sequence(gt, pred, seq))
    return summarize_davis(rows), rows


def run_score(args: argparse.Namespace, cfg: Config) -> dict:
    root = Path(args.davis_root) if args.davis_root else ensure_dataset("davis")
    if args.json:  # written after the scoring: checked before it
        check_apart("--json", args.json, {"--davis-root": root, "--results": args.results})
        if Path(args.json).is_dir():
            raise IsADirectoryError(f"--json {args.json}: a folder is there; expected a file name for the scores")
    summary, rows = score_davis(root, Path(args.results), args.set, args.resolution)
    print_davis_table(summary, rows)
    report = {"summary": summary, "rows": to_jsonable(rows)}
    if args.json:
        Path(args.json).write_text(json.dumps(to_jsonable(report), indent=1))
    return report


# ----------------------------------------------------------------------------------------- VIP
def resized_frames(paths: list[Path], size: tuple[int, int]) -> np.ndarray:
    """T x size[0] x size[1] x 3 uint8: VIP and JHMDB are evaluated at a fixed square size."""
    return np.stack([np.asarray(Image.open(p).convert("RGB").resize(size[::-1], Image.BILINEAR)) for p in paths])


def evaluate_vip(
    root: Path,
    checkpoint: str,
    cfg: Config,
    out: Path | None,
    *,
    device: str = "auto",
    feature_cache: Path | None = None,
    implementation: str = "windowed",
    progress: bool = True,
) -> dict:
    """Semantic part propagation on VIP: mIoU over its 20 classes at the annotated frames after the first.

    VIP annotates every 25th frame and, as in paper 004 Sec. 7, labels are propagated along the
    annotated frames themselves (25 raw frames apart), fed at `eval.vip_size` squared.
    """
    dataset = VIP(root)
    run = EvaluationRun.open("vip", checkpoint, cfg, device, feature_cache)
    confusion = np.zeros((VIP_NUM_CLASSES, VIP_NUM_CLASSES), dtype=np.int64)
    for video in with_progress(dataset.videos, "vip", "video", name=str, enabled=progress):
        annotated = sorted(dataset.label_paths(video).items())
        all_frames = dataset.frame_paths(video)
        frame_paths = [all_frames[index] for index, _ in annotated]
        features = run.square_features(frame_paths, run.cfg.eval.vip_size)
        labels = np.stack([dataset.read_label(path) for _, path in annotated])  # T x H x W
        pred = propagate_video(features, labels[0], VIP_NUM_CLASSES, labels.shape[1:], run.cfg, implementation)
        if out is not None:
            (out / video).mkdir(parents=True, exist_ok=True)
            for mask, (_, path) in zip(pred, annotated):
                Image.fromarray(mask).save(out / video / f"{path.stem}.png")
        confusion += confusion_matrix(labels[1:], pred[1:], num_classes=VIP_NUM_CLASSES)
    miou, per_class = mean_iou(confusion)
    return run.report({"mIoU": miou, "per_class_iou": per_class}, root, out)


# ----------------------------------------------------------------------------------------- JHMDB
def joints_to_heatmaps(
    joints: np.ndarray, image_size: tuple[int, int], grid: tuple[int, int], sigma: float
) -> torch.Tensor:
    """15 x 2 joint (x, y) pixel coordinates -> 15 x h x w Gaussian maps on the feature grid (sigma in cells)."""
    (height, width), (h, w) = image_size, grid
    cx = (joints[:, 0] + 0.5) * w / width - 0.5  # pixel centre -> cell coordinates
    cy = (joints[:, 1] + 0.5) * h / height - 0.5
    ys, xs = np.mgrid[0:h, 0:w]
    d2 = (xs[None] - cx[:, None, None]) ** 2 + (ys[None] - cy[:, None, None]) ** 2
    return torch.from_numpy(np.exp(-d2 / (2 * sigma**2))).float()


def heatmaps_to_joints(heatmaps: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """T x 15 x h x w propagated maps -> T x 15 x 2 (x, y) pixel coordinates of each map's peak at image size."""
    up = upsample_labels(heatmaps, image_size)  # T x 15 x H x W
    flat = up.flatten(2).argmax(-1).cpu().numpy()
    return np.stack([flat % image_size[1], flat // image_size[1]], axis=-1).astype(np.float64)


def evaluate_jhmdb(
    root: Path,
    checkpoint: str,
    cfg: Config,
    out: Path | None,
    *,
    device: str = "auto",
    feature_cache: Path | None = None,
    implementation: str = "windowed",
    progress: bool = True,
    sigma: float = 0.5,
) -> dict:
    """Keypoint propagation on JHMDB split 1 (test): PCK@0.1 and @0.2, frames fed at `eval.jhmdb_size` squared."""
    dataset = JHMDB(root)
    run = EvaluationRun.open("jhmdb", checkpoint, cfg, device, feature_cache)
    predictions, truths = [], []
    for action, video in with_progress(dataset.videos, "jhmdb", "video", name="/".join, enabled=progress):
        joints = dataset.joints(action, video)  # T x 15 x 2
        # Some JHMDB videos have more frames than joint annotations: use the shorter (as VFS does).
        frame_paths = dataset.frame_paths(action, video)[: len(joints)]
        joints = joints[: len(frame_paths)]
        features = run.square_features(frame_paths, run.cfg.eval.jhmdb_size)
        image_size = Image.open(frame_paths[0]).size[::-1]
        first = joints_to_heatmaps(joints[0], image_size, tuple(features.shape[-2:]), sigma).to(features)
        soft = propagate(features, first, run.cfg.propagation, implementation=implementation)
        predictions.append(heatmaps_to_joints(soft, image_size))
        truths.append(joints)
    return run.report(pck(predictions, truths), root, out)


# ----------------------------------------------------------------------------------------- the benchmarks
@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A propagation benchmark as a subcommand: its evaluation, its own options and how its result is printed.
    Its dataset root is `--<name>-root` (default: the embedded synthetic set of that name)."""

    evaluate: Callable[..., dict]  # (root, checkpoint, cfg, out, *, device, feature_cache, implementation, ...)
    options: Callable[[argparse.Namespace], dict]  # the benchmark's own keyword arguments from the command line
    show: Callable[[dict], None]  # the result on stdout


BENCHMARKS = {
    "davis": Benchmark(
        evaluate_davis,
        lambda args: {"split": args.set, "resolution": args.resolution, "overlays": args.overlays},
        lambda report: print_davis_table(report["summary"], report["rows"]),
    ),
    "vip": Benchmark(evaluate_vip, lambda args: {}, lambda report: print(f"VIP mIoU {report['mIoU']:.4f}")),
    "jhmdb": Benchmark(
        evaluate_jhmdb,
        lambda args: {},
        lambda report: print("  ".join(f"{k} {v:.4f}" for k, v in report.items() if k.startswith("PCK"))),
    ),
}


def run_benchmark(args: argparse.Namespace, cfg: Config) -> dict:
    """`python -m stt.evaluate davis|vip|jhmdb`: check --out, evaluate, print the result; returns the report."""
    name, benchmark = args.command, BENCHMARKS[args.command]
    given = getattr(args, f"{name}_root")
    root = Path(given) if given else ensure_dataset(name)
    check_out(args.out, root, f"--{name}-root", args.feature_cache)
    report = benchmark.evaluate(
        root,
        args.checkpoint,
        cfg,
        Path(args.out),
        device=args.device,
        feature_cache=args.feature_cache,
        implementation=args.implementation,
        **benchmark.options(args),
    )
    benchmark.show(report)
    return report


# ----------------------------------------------------------------------------------------- parser
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m stt.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", help="YAML file with config sections (propagation, eval, model)")
        sub.add_argument(
            "--preset",
            choices=sorted(PRESETS),
            help="a named protocol (config.PRESETS), applied "
            "after --config and before the overrides; 'authors': the authors' DAVIS evaluator",
        )
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. propagation.topk=5")

    def propagation_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--checkpoint",
            default="random",
            help="checkpoint file (local path or URI, e.g. s3://), 'random[:SEED]', or 'lab[:STRIDE]' (Lab pixels)",
        )
        sub.add_argument("--out", required=True, help="output folder for predictions and metrics.json")
        sub.add_argument("--device", default="auto", help="auto | cpu | cuda")
        sub.add_argument("--feature-cache", help="feature cache folder (default: $STT_CACHE/features)")
        sub.add_argument("--implementation", default="windowed", choices=("windowed", "dense"))
        sub.add_argument("--overlays", action="store_true", help="also write PNG/GIF overlays of the predictions")

    davis = commands.add_parser("davis", help="propagate DAVIS-2017 masks and score them")
    davis.add_argument("--davis-root", help="DAVIS-2017 root (default: the embedded synthetic set)")
    davis.add_argument("--set", default="val", help="ImageSets/2017/<set>.txt")
    davis.add_argument("--resolution", default="480p", choices=("480p", "Full-Resolution"))
    propagation_args(davis)
    common(davis)

    vip = commands.add_parser("vip", help="propagate VIP part labels and report mIoU")
    vip.add_argument("--vip-root", help="folder holding VIP_Fine/ (default: the embedded synthetic set)")
    propagation_args(vip)
    common(vip)

    jhmdb = commands.add_parser("jhmdb", help="propagate JHMDB keypoints and report PCK")
    jhmdb.add_argument(
        "--jhmdb-root", help="folder holding Rename_Images/, joint_positions/, splits/ (default: synthetic)"
    )
    propagation_args(jhmdb)
    common(jhmdb)

    score = commands.add_parser("score", help="score a results folder like the official DAVIS tool")
    score.add_argument("--davis-root", help="DAVIS-2017 root (default: the embedded synthetic set)")
    score.add_argument("--results", required=True, help="folder of indexed PNGs: RESULTS/<seq>/<frame>.png")
    score.add_argument("--set", default="val")
    score.add_argument("--resolution", default="480p", choices=("480p", "Full-Resolution"))
    score.add_argument("--json", help="also write the scores to this JSON file")
    common(score)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = command.parse_args(get_args_parser(), argv)
    cfg = load_config(args.config, [*PRESETS.get(args.preset or "", ()), *args.overrides])
    return (run_score if args.command == "score" else run_benchmark)(args, cfg)


if __name__ == "__main__":
    retain_freed_memory()  # the activations at 480p: stt.allocator
    sys.exit(command.run(main, "stt.evaluate"))
