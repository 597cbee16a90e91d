"""What a propagation trial of tune/sweep.py costs with cached features vs re-extracting them.

    python bench/sweep_costs.py                                   # random-init ResNet-18, embedded DAVIS train split
    python bench/sweep_costs.py --checkpoint runs/stt/temporal-final.pt eval.max_short_side=128 propagation.context=7

Times `stt.evaluate.evaluate_davis` on the tuning split three ways: cold (features extracted and
written to an empty cache), warm (every feature read from the cache, as each sweep trial does;
asserted to run no network), and the split of the cold run into extraction and propagation.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from stt.config import load_config
from stt.data.synthetic import ensure_dataset
from stt.evaluate import evaluate_davis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="random", help="checkpoint file or random[:SEED]")
    parser.add_argument("--davis-root", help="DAVIS-2017 root (default: the embedded synthetic set)")
    parser.add_argument("--set", default="train", help="the tuning split")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="warm runs to average")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = parser.parse_args()
    cfg = load_config(None, args.overrides)
    root = Path(args.davis_root) if args.davis_root else ensure_dataset("davis")

    with tempfile.TemporaryDirectory() as cache:
        run = lambda: evaluate_davis(root, args.checkpoint, cfg, None, split=args.set, device=args.device,
                                     feature_cache=Path(cache), progress=False)
        started = time.perf_counter()
        cold = run()
        cold_s = time.perf_counter() - started
        warm_s = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            warm = run()
            warm_s.append(time.perf_counter() - started)
            assert warm["network_calls"] == 0, "a warm run ran the network"
            assert warm["summary"] == cold["summary"], "cached features changed the result"
    warm_mean = sum(warm_s) / len(warm_s)
    print(f"# {args.checkpoint} on {root} ({args.set}); torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"overrides: {' '.join(args.overrides) or 'none'}")
    print("| run | seconds | network forward passes |")
    print("|---|---|---|")
    print(f"| cold: extract + cache + propagate | {cold_s:.1f} | {cold['network_calls']} |")
    print(f"| warm: cached features + propagate (one sweep trial) | {warm_mean:.1f} | 0 |")
    print(f"| extraction alone (cold - warm) | {cold_s - warm_mean:.1f} | |")
    print(f"\ncached trial is {cold_s / warm_mean:.1f}x cheaper than re-extracting; J&F {cold['summary']['J&F-Mean']:.4f} both ways")


if __name__ == "__main__":
    main()
