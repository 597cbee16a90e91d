"""Where stt keeps what it can always rebuild: extracted features (stt.features.FeatureCache under
`features/`) and the generated synthetic datasets (stt.data.synthetic.ensure_dataset).

A module of its own, importing nothing heavy, so that the dataset generator and the evaluator both
read the default from here without pulling in each other's dependencies.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$STT_CACHE, or ~/.cache/stt when it is unset or empty (an empty value would mean the working folder)."""
    return Path(os.environ.get("STT_CACHE") or Path.home() / ".cache" / "stt")
