"""The command line: `python -m stt.data.synthetic --out DIR [--preset P] [--seed S] [--kinds K,...]`."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from stt.data.synthetic.cache import generate
from stt.data.synthetic.presets import PRESETS
from stt.data.synthetic.writers import KINDS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stt.data.synthetic",
        description="Write deterministic synthetic videos in the DAVIS-2017, YouTube-VOS, JHMDB and VIP layouts.",
    )
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS), help="sizes and difficulty")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--out", required=True, type=Path, help="output folder; one sub-folder per kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    args = parser.parse_args(argv)
    kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip())
    started = time.perf_counter()
    try:
        roots = generate(args.out, args.preset, args.seed, kinds)
    except ValueError as error:
        parser.error(str(error))
    for kind, root in roots.items():
        print(f"{kind}: {root}")
    print(f"generated in {time.perf_counter() - started:.1f} s")
