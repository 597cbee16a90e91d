"""Dense per-frame features for label propagation, extracted once and cached on disk in fp16.

A sweep re-runs propagation hundreds of times with other settings; the network runs once per
(feature source, layer, input size, frames). Feature sources:

- a checkpoint file written by `stt.train` (stt.checkpoint; a local path or an s3:// URI), a plain
  torchvision ResNet state dict (ImageNet weights from a local file), or a published release
  (STT authors', VFS, CRW: stt.published, which also sets arch, stride preset and input space);
- `random` / `random:SEED`: a randomly initialised encoder (a baseline, seeded);
- `lab:STRIDE`: Lab pixels average-pooled to a stride-STRIDE grid (the classic colour baseline).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from stt import checkpoint
from stt.cache import current_umask
from stt.color import imagenet_normalize, normalize_lab, rgb_to_lab
from stt.config import EvalConfig, ModelConfig
from stt.errors import UsageError
from stt.models import build_encoder, load_encoder_weights
from stt.published import load_published


def resolve_device(name: str | torch.device) -> torch.device:
    """`auto`: the GPU when there is one, else the CPU; anything else as torch names it (cpu, cuda, cuda:1)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def frames_to_input(frames: np.ndarray, input_space: str, device: torch.device) -> torch.Tensor:
    """uint8 frames `T x H x W x 3` (RGB) -> the network's input `T x 3 x H x W` (float32)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0
    if input_space == "rgb":
        return imagenet_normalize(x)
    if input_space == "lab":
        return normalize_lab(rgb_to_lab(x))
    raise ValueError(f"model.input_space: expected 'rgb' or 'lab', got {input_space!r}")


def resize_short_side(x: torch.Tensor, max_short_side: int) -> torch.Tensor:
    """Downscale `T x 3 x H x W` so min(H, W) <= max_short_side, keeping the aspect ratio; never upscale."""
    h, w = x.shape[-2:]
    if max_short_side <= 0 or min(h, w) <= max_short_side:
        return x
    scale = max_short_side / min(h, w)
    size = (round(h * scale), round(w * scale))
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)


def parse_baseline(source: str) -> tuple[str, int] | None:
    """("lab", stride) for `lab[:STRIDE]`, ("random", seed) for `random[:SEED]`, None for a file path
    (also one whose name merely starts with "lab" or "random")."""
    match = re.fullmatch(r"(lab|random)(?::(.*))?", source)
    if match is None:
        return None
    kind, value = match.groups()
    if value is None:
        return (kind, 8) if kind == "lab" else (kind, 0)
    if not value.isdigit() or (kind == "lab" and int(value) == 0):
        expected = (
            "lab:STRIDE with a positive integer stride, e.g. lab:8"
            if kind == "lab"
            else "random:SEED with an integer seed >= 0"
        )
        raise UsageError(f"--checkpoint {source}: expected {expected}")
    return kind, int(value)


def stored_model_note(source: str, stored: ModelConfig, given: ModelConfig) -> str | None:
    """One line when a checkpoint's stored trunk (model.arch, model.stride) differs from the given config's:
    the stored one wins, because the weights were trained on it. (model.input_space is left out: it is the
    stage's, decided by stt.recipes.stage_spec, not a choice the config makes for a trained encoder.)"""
    differing = [
        f"model.{name}={getattr(stored, name)} (the config says {getattr(given, name)})"
        for name in ("arch", "stride")
        if getattr(stored, name) != getattr(given, name)
    ]
    if not differing:
        return None
    return f"stt: {source}: its stored model config wins, as its weights were trained with it: {', '.join(differing)}"


class FeatureExtractor:
    """Turns uint8 frames `T x H x W x 3` into features `T x C x h x w` (float32, on `device`).

    `cache_key` identifies everything that determines the output except the frames themselves.
    `network_calls` counts forward passes, so a caller can prove a cached run never touched the network.
    """

    def __init__(self, source: str, model_cfg: ModelConfig, eval_cfg: EvalConfig, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.eval_cfg = eval_cfg
        self.network_calls = 0
        self.encoder = None
        self.model_cfg = model_cfg
        baseline = parse_baseline(source)
        if baseline is not None and baseline[0] == "lab":
            self.stride = baseline[1]
            self.input_space = "lab"
            identity = f"lab-pixels-stride{self.stride}"
        elif baseline is not None:
            seed = baseline[1]
            with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
                torch.manual_seed(seed)
                self.encoder = build_encoder(model_cfg)
            self.input_space = model_cfg.input_space
            identity = f"random-seed{seed}"
        else:  # a file: local, or on an object store (s3://...); or a Ray Train checkpoint folder holding one
            try:
                data = checkpoint.read_bytes(checkpoint.checkpoint_file(source, "--checkpoint"))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"--checkpoint {source}: no such file (expected a checkpoint file, a Ray Train checkpoint "
                    "folder, 'random[:SEED]' or 'lab[:STRIDE]')"
                ) from None
            state = checkpoint.read(data, source)
            if checkpoint.is_stt_checkpoint(state):
                stored = checkpoint.config_of(state, source).model
                if note := stored_model_note(source, stored, model_cfg):
                    print(note)
                self.model_cfg = model_cfg = stored
                weights = state["model"]
            else:  # a published release or a bare torchvision state dict (stt.published maps and configures it)
                overrides, weights = load_published(state, name=source)
                self.model_cfg = model_cfg = dataclasses.replace(model_cfg, **overrides)
            checkpoint.check_finite(weights, source)
            self.encoder = build_encoder(model_cfg)
            load_encoder_weights(self.encoder, weights, source)
            self.input_space = model_cfg.input_space
            identity = f"checkpoint-{hashlib.sha256(data).hexdigest()}"
        if self.encoder is not None:
            self.encoder.eval().to(self.device)
            self.stride = self.encoder.strides[eval_cfg.layer]
            identity += f"-{model_cfg.arch}-stride{model_cfg.stride}-{self.input_space}-{eval_cfg.layer}"
        self.cache_key = f"{identity}-short{eval_cfg.max_short_side}"

    @torch.no_grad()
    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        chunks = []
        for start in range(0, len(frames), self.eval_cfg.batch_size):
            x = frames_to_input(frames[start : start + self.eval_cfg.batch_size], self.input_space, self.device)
            x = resize_short_side(x, self.eval_cfg.max_short_side)
            if self.encoder is None:
                chunks.append(F.avg_pool2d(x, self.stride, ceil_mode=True))
                continue
            self.network_calls += 1
            # fp32, as the authors' evaluator: bf16 autocast changed 0.31 % of the labels over 11 frames (issue 17);
            # the fp16 cache alone changes 0.02 %, and evaluation is not the expensive part.
            chunks.append(self.encoder(x, layers=(self.eval_cfg.layer,))[self.eval_cfg.layer].float())
        return torch.cat(chunks)


class FeatureCache:
    """fp16 features on disk, one `.npy` per (extractor key, frame list)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path_for(self, extractor_key: str, frame_paths: list[Path], variant: str = "") -> Path:
        # Frames are fingerprinted by path, size and mtime: a changed file yields a new entry.
        frames = [(str(Path(p).resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in frame_paths]
        digest = hashlib.sha256(json.dumps([extractor_key, variant, frames]).encode()).hexdigest()
        return self.root / digest[:2] / f"{digest}.npy"

    def load_or_compute(
        self, extractor: FeatureExtractor, frame_paths: list[Path], read_frames, variant: str = ""
    ) -> torch.Tensor:
        """Features `T x C x h x w` (float32, on the extractor's device); `read_frames()` is called only on a miss.

        `variant` names any preprocessing `read_frames` applies (e.g. a fixed resize), so it keys the cache too.
        """
        path = self.path_for(extractor.cache_key, frame_paths, variant)
        if path.is_file():
            try:
                return torch.from_numpy(np.load(path)).to(extractor.device).float()
            except (ValueError, OSError, EOFError) as error:  # damaged on disk: the entry is only a cache
                print(
                    f"stt: feature cache entry {path} is unreadable ({' '.join(str(error).split())[:120]}); "
                    "recomputing it"
                )
        features = extractor(read_frames()).to(torch.float16)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
            np.save(tmp, features.cpu().numpy())
        os.chmod(tmp.name, 0o666 & ~current_umask())  # tempfile makes 0600: a team's shared cache must stay readable
        os.replace(tmp.name, path)  # atomic: a killed run never leaves a half-written entry
        # Rounded through fp16 either way, and laid out as np.load gives them (the network's output may be
        # channels-last, which changes a matmul's summation order), so a cached rerun reproduces the first run exactly.
        return features.float().contiguous()
