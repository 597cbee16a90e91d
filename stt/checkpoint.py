"""The one-file checkpoint, and where it lives: a local path or an object-store URI (s3://, gs://).

A checkpoint is what `torch.load(path, weights_only=True)` opens:

    {"model": encoder state dict (torchvision key names), "config": stt.config.to_dict(Config),
     "stage": "spatial" | "temporal" | "spatiotemporal", "step": int, "optimizer": its state dict,
     "moco": MoCo heads, momentum encoder and queues (spatial and spatiotemporal stages),
     "fisher": parameter name -> diagonal Fisher (the last checkpoint of a stage an EWC stage follows)}

Every reader goes through `read` (weights only: a malicious pickle is refused; a text, empty or cut
file is one line naming it) and `load` (the keys above are there). Storage goes through pyarrow's
file systems (stt.storage), so the same calls serve a laptop folder and a cluster's bucket.
"""

from __future__ import annotations

import argparse
import io
import os
import pickle
from typing import Any

import pyarrow.fs
import torch
from torch import Tensor, nn

from stt.config import Config, from_dict, to_dict

# Where checkpoints live (stt.storage), under the names the callers of this module use.
from stt.storage import contact, exists, file_type, filesystem, is_uri, join, storage_error  # noqa: F401

CHECKPOINT_FILE = "checkpoint.pt"  # the one file inside each Ray Train checkpoint folder
REQUIRED = ("model", "config", "stage", "step")


# ----------------------------------------------------------------------------------------- storage
def read_bytes(path: str) -> bytes:
    fs, fs_path = filesystem(path)
    try:
        with contact(path, lambda: fs.open_input_stream(fs_path)) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint file at {path}") from None
    except OSError as error:
        raise storage_error(path, error) from None


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write then rename, so a reader never sees half a file (object stores put atomically anyway)."""
    fs, fs_path = filesystem(path)
    contact(path, lambda: fs.create_dir(os.path.dirname(fs_path), recursive=True))
    partial = fs_path + ".tmp"
    try:
        with fs.open_output_stream(partial) as f:
            f.write(data)
        fs.move(partial, fs_path)
    except OSError as error:
        raise storage_error(path, error) from None


def checkpoint_file(source: str, option: str) -> str:
    """The checkpoint file `source` (given as `option`) names: the file itself, or the checkpoint.pt inside a Ray
    Train checkpoint folder (`<storage>/<name>/<stage>/<stage>-stepNNNNNNN`); anything else is refused by name."""
    kind = file_type(source)
    if kind == pyarrow.fs.FileType.File:
        return source
    if kind == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{option} {source}: no such checkpoint file")
    inner = join(source, CHECKPOINT_FILE)
    if file_type(inner) == pyarrow.fs.FileType.File:
        return inner
    raise IsADirectoryError(
        f"{option} {source}: a folder without {CHECKPOINT_FILE}; expected a checkpoint file (e.g. "
        f"<storage>/<name>/<stage>-final.pt) or a Ray Train checkpoint folder holding {CHECKPOINT_FILE}"
    )


# ----------------------------------------------------------------------------------------- the format
def read(source: str | os.PathLike | bytes, what: str | None = None) -> Any:
    """torch.load(weights_only=True) of a local path, a URI or a file's bytes, on the CPU.

    argparse.Namespace is allowed as well: CRW stores its command line (`"args"`) in its release.
    Raises ValueError (one line, naming `what`) when the file is not a weights-only torch file.
    """
    what = what or (str(source) if not isinstance(source, bytes) else "checkpoint")
    if isinstance(source, str) and is_uri(source):
        source = read_bytes(source)
    handle = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(handle, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError) as error:
        # a text file fails inside the legacy unpickler as KeyError(<its first byte>): say what it means
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if isinstance(error, KeyError):
            reason = "not a torch.save file"
        elif isinstance(error, EOFError):
            reason = "empty or cut short"
        elif "zip archive" in reason:
            reason = "a damaged or cut-short zip archive"
        raise ValueError(f"{what}: not a weights-only torch checkpoint ({reason[:120]})") from None


def is_stt_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and all(key in payload for key in REQUIRED)


def load(source: str | os.PathLike | bytes, what: str | None = None) -> dict[str, Any]:
    """An stt.train checkpoint (from a path, a URI or bytes), checked to hold what `payload` writes."""
    what = what or str(source)
    checkpoint = read(source, what)
    if not is_stt_checkpoint(checkpoint):
        missing = [key for key in REQUIRED if not isinstance(checkpoint, dict) or key not in checkpoint]
        raise ValueError(f"{what}: not an stt.train checkpoint (missing {missing})")
    return checkpoint


def tensors(tree: Any, prefix: str = "") -> list[tuple[str, Tensor]]:
    """(dotted name, tensor) of every tensor in nested dicts and lists, e.g. ("optimizer.state.3.exp_avg", ...)."""
    if isinstance(tree, Tensor):
        return [(prefix, tree)]
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    return [found for key, value in items for found in tensors(value, f"{prefix}.{key}" if prefix else str(key))]


def check_finite(tree: Any, what: str) -> None:
    """ValueError naming `what`, the first non-finite tensor and how many there are, when any floating-point tensor
    in `tree` holds a NaN or an infinity: such weights give a number (J&F 0.000 once) that means nothing."""
    floats = [(name, t) for name, t in tensors(tree) if t.is_floating_point() or t.is_complex()]
    bad = [name for name, t in floats if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"{what}: {len(bad)} of {len(floats)} tensors hold NaN or infinite values (the first: {bad[0]}); "
            "expected finite weights (a training run that diverged leaves such values)"
        )


def config_of(checkpoint: dict[str, Any], what: str) -> Config:
    """The configuration a checkpoint was trained with; a key this version does not know names `what`."""
    return from_dict(checkpoint["config"], source=what)


def payload(
    encoder_weights: dict[str, Tensor],
    cfg: Config,
    stage: str,
    step: int,
    optimizer: torch.optim.Optimizer,
    moco: nn.Module | None = None,
    fisher: dict[str, Tensor] | None = None,
) -> dict[str, Any]:
    """The one-file checkpoint: plain tensors, numbers, strings, lists and dicts only."""
    checkpoint = {
        "model": {k: v.detach().cpu() for k, v in encoder_weights.items()},
        "config": to_dict(cfg),
        "stage": stage,
        "step": step,
        "optimizer": optimizer.state_dict(),
    }
    if moco is not None:
        checkpoint["moco"] = {k: v.detach().cpu() for k, v in moco.state_dict().items()}
    if fisher is not None:
        checkpoint["fisher"] = {k: v.cpu() for k, v in fisher.items()}
    return checkpoint


def export(folder: str | os.PathLike, destination: str) -> None:
    """Copy the checkpoint file of a checkpoint folder (e.g. Ray Train's) to `destination` (path or URI)."""
    with open(os.path.join(folder, CHECKPOINT_FILE), "rb") as f:
        write_bytes_atomic(destination, f.read())
