"""J&F of the classic label-propagation baselines on a DAVIS-layout set, as a Markdown table.

    python bench/baselines.py --preset default                         # embedded synthetic set
    python bench/baselines.py --davis-root ../shared/data/davis-real   # the eight real sequences

Baselines: copy-first-mask (no propagation at all), Lab pixels average-pooled to stride 4 and 8,
and a random-init ResNet-18 (seed 0, stride-8 preset, res4), all with the default propagation
settings of DESIGN.md unless overridden (`propagation.topk=5` ...).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from stt.config import load_config
from stt.data.synthetic import generate
from stt.evaluate import copy_first_mask, evaluate_davis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", help="synthetic preset to generate (tiny | default | hard)")
    parser.add_argument("--davis-root", help="a DAVIS-2017 root instead of a synthetic preset")
    parser.add_argument("--set", default="val")
    parser.add_argument("--sources", default="copy,lab:4,lab:8,random", help="comma-separated baselines")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. propagation.topk=5")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        root = (
            Path(args.davis_root)
            if args.davis_root
            else generate(scratch / "data", preset=args.preset, kinds=("davis",))["davis"]
        )
        name = str(args.davis_root) if args.davis_root else f"synthetic '{args.preset}'"
        print(
            f"# {name}, split {args.set}; {date.today()}; {platform.processor() or platform.machine()}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print("| baseline | J&F | J | F | seconds |")
        print("|---|---|---|---|---|")
        for source in args.sources.split(","):
            started = time.perf_counter()
            if source == "copy":
                summary = copy_first_mask(root, args.set)
            else:
                report = evaluate_davis(
                    root,
                    source,
                    cfg,
                    None,
                    split=args.set,
                    device=args.device,
                    feature_cache=scratch / "features",
                    progress=False,
                )
                summary = report["summary"]
            seconds = time.perf_counter() - started
            print(
                f"| {source} | {summary['J&F-Mean']:.3f} | {summary['J-Mean']:.3f} | {summary['F-Mean']:.3f} "
                f"| {seconds:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
