"""Where a command writes, kept apart from what it reads.

`python -m stt.evaluate davis --davis-root D --out D/Annotations/480p` once overwrote DAVIS's ground truth
with its predictions and exited 0; the next evaluation of D scored 1.000. Every command that writes
checks its outputs with `check_apart` before any work: an output may neither be an input folder, nor lie
inside one, nor hold one (writing there could replace the input's files).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

from stt.errors import UsageError


def location(path: str | os.PathLike) -> tuple[str, ...]:
    """A path as comparable parts: a local path (or file:// URI) resolved, symbolic links followed, so that
    `out -> DAVIS/Annotations` is seen for what it is; an object-store URI as (scheme, bucket, *keys)."""
    text = str(path)
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme != "file":
            return (f"{parts.scheme}://", parts.netloc, *[p for p in parts.path.split("/") if p])
        text = parts.path
    return ("", *Path(text).expanduser().resolve().parts)


def check_apart(output_option: str, output: str | os.PathLike, inputs: dict[str, str | os.PathLike | None]) -> None:
    """UsageError naming both options when the output `output` (given as `output_option`) is one of `inputs`
    ({option: path}; empty ones are skipped), lies inside one, or holds one."""
    out = location(output)
    for option, source in inputs.items():
        if not source:
            continue
        src = location(source)
        if out[: len(src)] == src:
            where = "is" if len(out) == len(src) else "lies inside"
            raise UsageError(
                f"{output_option} {output}: {where} the input {option} {source}; writing there would change "
                "the input (its files could be overwritten): expected a folder outside it"
            )
        if src[: len(out)] == out:
            raise UsageError(
                f"{output_option} {output}: holds the input {option} {source}; writing there could overwrite "
                "the input's files: expected a folder that does not contain it"
            )
