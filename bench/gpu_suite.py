"""The GPU measurements in one command: propagation, training step, DAVIS evaluation, Ray training.

Built to run once, unattended, on a briefly lent H100/H200 (well under 8 minutes), and to be known
to work before then: `--smoke` runs the same code paths on the CPU at tiny sizes in seconds
(tests/test_gpu_suite.py). Every part is wrapped: a failing part is recorded in the JSON with its
traceback and the others still run. Writes one JSON and prints one table.

    bench/stage_gpu.sh                                     # here: .gpu/davis-real (+ .gpu/ytvos-real)
    python bench/gpu_suite.py --out gpu.json               # on the device (call 1: propagation step evaluate)
    python bench/gpu_suite.py --parts train --out t.json   # call 2, with the Ray wheels carried
    python bench/gpu_suite.py --smoke --out smoke.json     # CPU, tiny sizes

Parts (reusing bench/propagation.py, bench/train_step.py and bench/train_throughput.py):
  propagation  one step at DAVIS size (60 x 107, C 256, first + 20 context frames, radius 12,
               top-10): dense and windowed, fp32 and fp16; ms/frame, peak MiB, argmax agreement with fp32 dense.
  step         bench/train_step.measure: bare backbone vs temporal step, R18/R50, bf16 autocast +
               channels_last, eager.
  compile      the same rows under torch.compile (not in --smoke: minutes on 2 cores).
  evaluate     stt.evaluate.evaluate_davis on the real val split, wall time split into decode,
               features, propagation, scoring (exclusive times); J&F per sequence checked against
               the CPU reference in bench/gpu_suite_reference.json (|diff| <= 1e-3).
  train        bench/train_throughput (the real `stt.train --workers 1` path) with use_gpu:
               pairs/s and data-wait fraction; needs Ray (carried as wheels on the device).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import platform
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `bench.*` and `stt` import from the checkout

import torch  # noqa: E402

from bench.propagation import PeakMemory, synthetic_video, time_frames  # noqa: E402
from stt.config import PropagationConfig  # noqa: E402
from stt.features import resolve_device  # noqa: E402
from stt.propagation import predict_dense, predict_windowed  # noqa: E402

# Order of running: the torch.compile rows take longest, so they come after everything but Ray training
# (a separate call); a run cut off at its limit keeps the parts before.
PARTS = ("propagation", "step", "evaluate", "compile", "train")
REFERENCE = ROOT / "bench" / "gpu_suite_reference.json"
JF_TOLERANCE = 1e-3

# Full size is the issue's DAVIS setting; smoke keeps every code path at a size 2 CPU cores finish in seconds.
SIZES = {
    "full": {
        "grid": (60, 107),
        "channels": 256,
        "context": 20,
        "radius": 12.0,
        "topk": 10,
        "frames": 10,
        "archs": ("resnet18", "resnet50"),
        "size": 256,
        "batch": 32,
        "iters": 10,
        "warmup": 3,
        "train_batch": 64,
        "train_size": 256,
        "train_steps": 150,
    },
    "smoke": {
        "grid": (12, 20),
        "channels": 16,
        "context": 3,
        "radius": 3.0,
        "topk": 5,
        "frames": 2,
        "archs": ("resnet18",),
        "size": 32,
        "batch": 2,
        "iters": 1,
        "warmup": 1,
        "train_batch": 4,
        "train_size": 64,
        "train_steps": 4,
    },
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny sizes: the same code paths in seconds")
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS,
        help="default: all but train (its Ray wheels travel in a second call); --smoke: also not compile",
    )
    parser.add_argument("--out", default="gpu_suite.json", help="JSON report")
    parser.add_argument("--device", help="default: cuda if available (cpu with --smoke)")
    parser.add_argument(
        "--davis-root",
        default=str(ROOT / ".gpu" / "davis-real"),
        help="DAVIS root (bench/stage_gpu.sh stages the val split here); --smoke: the embedded synthetic set",
    )
    parser.add_argument(
        "--ytvos-root",
        default=str(ROOT / ".gpu" / "ytvos-real"),
        help="training video for the train part; --smoke: the embedded synthetic set",
    )
    parser.add_argument("--reference", default=str(REFERENCE), help="CPU J&F per sequence to compare against")
    parser.add_argument("--train-steps", type=int, help="steps of the train part (default: 150, about 2 minutes)")
    return parser


# ------------------------------------------------------------------------------------ propagation
def run_propagation(size: dict, device: torch.device) -> dict:
    cfg = replace(PropagationConfig(), context=size["context"], radius=size["radius"], topk=size["topk"])
    num_context = cfg.context + 1
    features, labels = synthetic_video(num_context + size["frames"], size["channels"], size["grid"], 4, seed=0)
    predictors = {
        "dense": lambda c, y, g: predict_dense(c, y, g, cfg),
        "windowed": lambda c, y, g: predict_windowed(c, y, g, cfg),
    }
    rows, reference = [], None
    for dtype in (torch.float32, torch.float16):
        x, y = features.to(device, dtype), labels.to(device, dtype)
        for name, predict in predictors.items():
            row = {"implementation": name, "dtype": str(dtype).removeprefix("torch.")}
            try:
                with torch.no_grad(), PeakMemory(device) as memory:
                    ms, masks = time_frames(predict, x, y, num_context, size["frames"], device)
                reference = masks if reference is None else reference  # fp32 dense runs first
                row.update(
                    ms_per_frame=ms,
                    peak_mib=memory.peak_bytes / 2**20,
                    argmax_agreement=(masks == reference).float().mean().item(),
                )
            except Exception as err:  # one implementation's failure (e.g. no fp16 kernel) keeps the rest
                row["error"] = f"{type(err).__name__}: {err}"
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {
        "grid": list(size["grid"]),
        "channels": size["channels"],
        "context": cfg.context,
        "radius": cfg.radius,
        "topk": cfg.topk,
        "timed_frames": size["frames"],
        "rows": rows,
    }


# ------------------------------------------------------------------------------------------- step
def run_step(size: dict, device: torch.device, compiled: bool, save_partial=lambda rows: None) -> dict:
    from bench.train_step import measure

    cases = [
        {
            "arch": arch,
            "what": what,
            "compile": compiled,
            "device": device.type,
            "size": size["size"],
            "threads": None,
            "batch": size["batch"],
            "iters": size["iters"],
            "warmup": size["warmup"],
        }
        for arch in size["archs"]
        for what in ("backbone", "temporal")
    ]
    context = multiprocessing.get_context("spawn")  # a fresh process per row: separate peaks, no shared caches
    rows = []
    for case in cases:
        try:
            with context.Pool(1) as pool:
                rows.append(pool.apply(measure, (case,)))
        except Exception as err:
            rows.append({**case, "error": f"{type(err).__name__}: {err}"})
        print(
            f"[gpu_suite] step {case['arch']} {'compile' if case['compile'] else 'eager'} {case['what']}: "
            f"{rows[-1].get('pairs_per_s', rows[-1].get('error'))}",
            flush=True,
        )
        save_partial(rows)  # compiling a row can take minutes: a run cut off keeps the finished rows
    for row in rows:
        bare = next(
            (
                r
                for r in rows
                if r["arch"] == row["arch"]
                and r["compile"] == row["compile"]
                and r["what"] == "backbone"
                and "step_s" in r
            ),
            None,
        )
        if "step_s" in row and bare is not None:
            row["fraction_of_bare"] = bare["step_s"] / row["step_s"]
    return {"precision": "bf16 autocast, channels_last" if device.type == "cuda" else "fp32", "rows": rows}


# --------------------------------------------------------------------------------------- evaluate
class Stopwatch:
    """Exclusive wall time per category: time inside a nested timed call counts for the inner one only."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._stack = device, {}, []

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, category: str, fn):
        def timed(*args, **kwargs):
            self._sync()
            self._stack.append(0.0)  # time spent in nested timed calls
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._sync()
                elapsed = time.perf_counter() - started
                nested = self._stack.pop()
                self.seconds[category] = self.seconds.get(category, 0.0) + elapsed - nested
                if self._stack:
                    self._stack[-1] += elapsed

        return timed


@contextmanager
def patched(patches: list[tuple[object, str, object]]):
    """Set attributes for the duration of a block; restored even when it raises."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def compare_reference(rows: list[dict], reference: dict, tolerance: float = JF_TOLERANCE) -> dict:
    """Per reference sequence: J&F = (mean J + mean F) / 2 over its objects here, vs the reference's.

    rows: evaluate_davis rows (sequence, object, J-Mean, F-Mean); reference: {"sequences": {seq:
    {"J&F": x}}}. Sequences absent from `rows` are listed as missing; ok only if at least one was
    compared and all compared are within `tolerance`.
    """
    compared, missing = {}, []
    for seq, ref in reference.get("sequences", {}).items():
        mine = [r for r in rows if r["sequence"] == seq]
        if not mine:
            missing.append(seq)
            continue
        jf = (sum(r["J-Mean"] for r in mine) + sum(r["F-Mean"] for r in mine)) / (2 * len(mine))
        compared[seq] = {"J&F": jf, "reference": ref["J&F"], "abs_diff": abs(jf - ref["J&F"])}
    ok = bool(compared) and all(c["abs_diff"] <= tolerance for c in compared.values())
    return {"ok": ok, "tolerance": tolerance, "compared": compared, "missing": missing}


def one_sequence_root(root: Path, dest: Path) -> Path:
    """A DAVIS root at `dest` whose val set is the first sequence of `root`'s (links, no copies)."""
    seq = (root / "ImageSets" / "2017" / "val.txt").read_text().split()[0]
    (dest / "ImageSets" / "2017").mkdir(parents=True)
    (dest / "ImageSets" / "2017" / "val.txt").write_text(seq + "\n")
    for kind in ("JPEGImages", "Annotations"):
        (dest / kind / "480p").mkdir(parents=True)
        (dest / kind / "480p" / seq).symlink_to((root / kind / "480p" / seq).resolve())
    return dest


def run_evaluate(root: Path | None, device: torch.device, reference_path: Path, smoke: bool) -> dict:
    import stt.evaluate as evaluate
    from stt.config import Config
    from stt.data.layouts import DAVIS
    from stt.data.synthetic import ensure_dataset
    from stt.features import FeatureExtractor

    reference = json.loads(Path(reference_path).read_text())  # before the run: a bad path fails at once
    cfg = Config()
    scratch = tempfile.TemporaryDirectory()
    if smoke:  # one synthetic sequence, small frames, short context: the same calls in seconds
        root = one_sequence_root(ensure_dataset("davis"), Path(scratch.name) / "davis")
        cfg.eval.max_short_side = 64
        cfg.propagation.context = 3
    elif not (root / "ImageSets" / "2017" / "val.txt").is_file():
        raise FileNotFoundError(
            f"{root}: no ImageSets/2017/val.txt; run bench/stage_gpu.sh first (expected the staged val split)"
        )
    watch = Stopwatch(device)
    patches = [
        (DAVIS, "read_frames", watch.wrap("decode", DAVIS.read_frames)),
        (DAVIS, "read_masks", watch.wrap("decode", DAVIS.read_masks)),
        (FeatureExtractor, "__call__", watch.wrap("features", FeatureExtractor.__call__)),
        (evaluate, "propagate_video", watch.wrap("propagation", evaluate.propagate_video)),
        (evaluate, "evaluate_davis_sequence", watch.wrap("scoring", evaluate.evaluate_davis_sequence)),
        (evaluate, "summarize_davis", watch.wrap("scoring", evaluate.summarize_davis)),
    ]
    with scratch, patched(patches):
        started = time.perf_counter()
        # A fresh feature cache: the network runs on every frame, as in the CPU reference run.
        report = evaluate.evaluate_davis(
            root,
            reference.get("checkpoint", "random:0"),
            cfg,
            Path(scratch.name) / "out",
            device=device.type,
            feature_cache=Path(scratch.name) / "cache",
            progress=False,
        )
        wall = time.perf_counter() - started
        dataset = DAVIS(root)
        frames = sum(len(dataset.frame_paths(s)) for s in dataset.sequences)
    split = {k: watch.seconds.get(k, 0.0) for k in ("decode", "features", "propagation", "scoring")}
    split["other (PNG writing, cache)"] = wall - sum(split.values())
    return {
        "root": str(root),
        "frames": frames,
        "wall_s": wall,
        "split_s": split,
        "summary": report["summary"],
        "network_calls": report["network_calls"],
        "feature_device": device.type,
        "reference_check": compare_reference(report["rows"], reference),
    }


# ------------------------------------------------------------------------------------------ train
def run_train(size: dict, device: torch.device, data_root: Path | None, steps: int) -> dict:
    if importlib.util.find_spec("ray") is None:
        raise ModuleNotFoundError("ray is not installed; on the device carry .whl (../shared/tools/gpu-wheels.sh)")
    from bench.train_throughput import main as throughput

    argv = ["--batch", str(size["train_batch"]), "--size", str(size["train_size"]), "--steps", str(steps)]
    if device.type == "cuda":
        argv.append("--gpu")
    if data_root is not None:
        argv += ["--data", str(data_root)]
    return throughput(argv)


# ------------------------------------------------------------------------------------------- main
def run_part(name: str, fn) -> dict:
    started = time.perf_counter()
    try:
        result = {"ok": True, **fn()}
    except Exception as err:
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    result["part_s"] = time.perf_counter() - started
    print(f"[gpu_suite] {name}: {'ok' if result['ok'] else result['error']} ({result['part_s']:.1f} s)", flush=True)
    return result


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def print_table(report: dict) -> None:
    parts = report["parts"]
    print(
        f"\n== gpu_suite on {report['environment'].get('gpu', report['environment']['device'])}"
        f"{' (smoke)' if report['smoke'] else ''}"
    )
    if "propagation" in parts and parts["propagation"]["ok"]:
        p = parts["propagation"]
        print(
            f"propagation {p['grid'][0]}x{p['grid'][1]}, C {p['channels']}, 1+{p['context']} context, "
            f"radius {p['radius']:g}, top-{p['topk']}"
        )
        print(f"  {'impl':<10}{'dtype':<9}{'ms/frame':>10}{'peak MiB':>10}{'agree':>9}")
        for r in p["rows"]:
            if "error" in r:
                print(f"  {r['implementation']:<10}{r['dtype']:<9} FAILED {r['error']}")
            else:
                print(
                    f"  {r['implementation']:<10}{r['dtype']:<9}{r['ms_per_frame']:>10.2f}{r['peak_mib']:>10.0f}"
                    f"{r['argmax_agreement']:>9.4f}"
                )
    step_rows = [r for name in ("step", "compile") if parts.get(name, {}).get("ok") for r in parts[name]["rows"]]
    if step_rows:
        print(f"training step ({parts.get('step', parts.get('compile'))['precision']})")
        print(f"  {'arch':<10}{'mode':<9}{'what':<10}{'pairs/s':>9}{'peak GB':>9}{'x bare':>8}")
        for r in step_rows:
            mode = "compile" if r["compile"] else "eager"
            if "error" in r:
                print(f"  {r['arch']:<10}{mode:<9}{r['what']:<10} FAILED {r['error']}")
            else:
                print(
                    f"  {r['arch']:<10}{mode:<9}{r['what']:<10}{r['pairs_per_s']:>9.1f}{r['peak_gb']:>9.2f}"
                    f"{r.get('fraction_of_bare', float('nan')):>8.2f}"
                )
    if "evaluate" in parts and parts["evaluate"]["ok"]:
        e = parts["evaluate"]
        split = ", ".join(f"{k} {v:.1f}" for k, v in e["split_s"].items())
        check = e["reference_check"]
        print(
            f"evaluate davis: {e['frames']} frames, {e['wall_s']:.1f} s ({split}); J&F {e['summary']['J&F-Mean']:.4f}; "
            f"CPU reference {'OK' if check['ok'] else 'MISMATCH or none compared'} "
            + ", ".join(f"{s} {c['J&F']:.4f} vs {c['reference']:.4f}" for s, c in check["compared"].items())
        )
    if "train" in parts and parts["train"]["ok"]:
        t = parts["train"]
        print(
            f"train (Ray, 1 worker): {t['pairs_per_s']:.1f} pairs/s, data wait {t['data_wait_fraction']:.1%}, "
            f"batch {t['batch']}, {t['steps']} steps, {t['wall_s']:.0f} s"
        )
    for name, part in parts.items():
        if not part["ok"]:
            print(f"{name}: FAILED {part['error']}")


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    size = SIZES["smoke" if args.smoke else "full"]
    device = resolve_device(args.device or ("cpu" if args.smoke else "auto"))
    davis_root = None if args.smoke else Path(args.davis_root)
    ytvos_root = None if args.smoke else Path(args.ytvos_root)
    runners = {
        "propagation": lambda: run_propagation(size, device),
        "step": lambda: run_step(size, device, compiled=False, save_partial=partial("step")),
        "compile": lambda: run_step(size, device, compiled=True, save_partial=partial("compile")),
        "evaluate": lambda: run_evaluate(davis_root, device, Path(args.reference), args.smoke),
        "train": lambda: run_train(size, device, ytvos_root, args.train_steps or size["train_steps"]),
    }

    def partial(name: str):
        def save(rows: list[dict]) -> None:
            report["parts"][name] = {"ok": False, "error": "cut off before the part ended", "rows": rows}
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))

        return save

    parts = args.parts or [p for p in PARTS if p != "train" and not (args.smoke and p == "compile")]
    started = time.perf_counter()
    report = {"smoke": args.smoke, "environment": environment(device), "command": " ".join(sys.argv), "parts": {}}
    for name in PARTS:
        if name in parts:
            report["parts"][name] = run_part(name, runners[name])
            report["total_s"] = time.perf_counter() - started
            # After every part: a run killed at the device's time limit still leaves what it measured.
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    print(f"total {report['total_s']:.0f} s; JSON: {args.out}")
    return report


if __name__ == "__main__":
    main()
