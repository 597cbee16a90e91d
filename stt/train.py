"""python -m stt.train: the spatial and temporal stages on Ray Train.

    python -m stt.train --workers N --stage spatial|temporal|spatiotemporal|all [--cpu] [--max-steps N]
                        [--storage DIR|s3://...] [--name NAME] [--table1-row ROW] [--config FILE.yaml]
                        [section.key=value ...]

Stage `spatial` trains MoCo v2 on still images (RGB input); stage `temporal` trains the stride-8
student on frame pairs (normalised Lab input) with the frozen spatial encoder as the teacher and
the initialisation; stage `spatiotemporal` trains L_nce + gamma L_t jointly on one trunk. `all`
runs the stages of `train.recipe` (stt.objectives.RECIPES, paper 001 Table 2) in order, each
initialised from the one before; spatial-then-temporal by default. In an EWC recipe the earlier
stage also stores the diagonal Fisher of its objective in its last checkpoint, and the later stage
adds the EWC penalty toward the earlier stage's weights. Each stage is one Ray Train run stored at
`<storage>/<name>/<stage>/`, checkpointed every `train.checkpoint_every` steps; its last checkpoint
is also exported as `<storage>/<name>/<stage>-final.pt`, the file `stt.evaluate --checkpoint`
takes. Re-running with the same storage and name resumes each stage from its latest checkpoint,
and a crashed worker group restarts from it (`--max-failures`); either way the data stream goes on
from the first unit of videos the checkpointed steps had not wholly consumed.

A checkpoint is one file that `torch.load(path, weights_only=True)` opens:
`{"model": encoder state dict (torchvision key names), "config", "stage", "step", "optimizer",
"moco" (spatial and spatiotemporal stages: heads, momentum encoder, queues), "fisher" (last
checkpoint of a stage an EWC stage follows: parameter name -> diagonal Fisher)}`.

Learning rate: `train.batch_size` is per worker, so the global batch is batch_size x workers. Each
optimiser's rate is given for a reference global batch (`spatial.lr` for `spatial.lr_batch` images
with MoCo's SGD, used by the spatial and the joint stage; `train.lr` for `train.lr_batch` pairs with
Adam, the temporal stage) and scaled linearly to the actual global batch, so the defaults give the
paper's rates at the paper's batches (0.03 at 256 images; 1e-4 at 128 pairs) with no hand
arithmetic. The effective rate is printed at the start of each stage; it is warmed up linearly
over `train.warmup_steps` and decayed to zero by a cosine at `train.max_steps`.

Metrics (loss terms, lr, pairs/s, the fraction of wall time spent waiting for data, DAVIS J&F
every `train.eval_every` steps) go to `ray.train.report`, to TensorBoard under
`<storage>/<name>/tensorboard` (local storage; `--tensorboard DIR` otherwise) and, as Ray metrics
named `stt_train_*`, to the Ray dashboard.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import math
import os
import re
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from queue import Queue
from typing import Any

import numpy as np
import pyarrow.fs
import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn

from stt import cli
from stt.config import Config, from_dict, load_config, to_dict
from stt.data.pipeline import SkippedFrames, check_cpu_budget, resolve_source
from stt.ewc import ewc_penalty, fisher_diagonal
from stt.models import Encoder, build_encoder, build_teacher, encoder_state_dict, load_encoder_weights
from stt.objectives import (
    TABLE1_ROWS,
    SpatiotemporalModel,
    add_penalty,
    feeds_ewc,
    recipe_of,
    table1_config,
    temporal_config,
    temporal_step,
)
from stt.published import init_payload, is_stt_checkpoint, read_checkpoint
from stt.spatial import MoCo

STAGES = ("spatial", "temporal", "spatiotemporal")
STAGE_STREAMS = {"spatial": ("spatial",), "temporal": ("temporal",), "spatiotemporal": ("spatial", "temporal")}
BATCH_COLUMNS = {"spatial": ["view_q", "view_k"], "temporal": ["target", "reference"]}  # the tensors a step reads
CHECKPOINT_FILE = "checkpoint.pt"
# What each stage's encoder is fed; the evaluator feeds the same. The joint stage's trunk sees both;
# it is evaluated on Lab, the input of the objective that learns correspondence.
INPUT_SPACE = {"spatial": "rgb", "temporal": "lab", "spatiotemporal": "lab"}


# ----------------------------------------------------------------------------------------- schedule
def lr_setting(cfg: Config, stage: str) -> tuple[str, float, int]:
    """(config section, rate, its reference global batch) of the optimiser that trains `stage`."""
    if stage == "temporal":  # Adam
        return "train", cfg.train.lr, cfg.train.lr_batch
    return "spatial", cfg.spatial.lr, cfg.spatial.lr_batch  # MoCo's SGD: the spatial and the joint stage


def effective_lr(cfg: Config, stage: str, num_workers: int) -> float:
    """The peak learning rate of `stage`: its optimiser's rate for the reference batch, scaled linearly
    (MoCo v2's rule) to the global batch `train.batch_size x num_workers`."""
    _, rate, reference = lr_setting(cfg, stage)
    return rate * cfg.train.batch_size * num_workers / reference


def describe_lr(cfg: Config, stage: str, num_workers: int) -> str:
    """One line for the start of a stage: the rate it will really use, and where it comes from."""
    section, rate, reference = lr_setting(cfg, stage)
    batch = cfg.train.batch_size * num_workers
    return (f"stt.train: {stage} stage: global batch {batch} ({cfg.train.batch_size} x {num_workers} workers), effective lr "
            f"{effective_lr(cfg, stage, num_workers):.3g} ({section}.lr {rate:g} x {batch} / {section}.lr_batch {reference})")


def learning_rate(step: int, peak_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The lr of optimisation step `step` (0-based): linear warm-up to `peak_lr`, then cosine to 0.

    Warm-up: peak_lr * (step + 1) / warmup_steps for step < warmup_steps. Then
    0.5 * peak_lr * (1 + cos(pi * (step - warmup_steps) / (max_steps - warmup_steps))).
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * peak_lr * (1.0 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------- storage
def is_uri(path: str) -> bool:
    return "://" in path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _filesystem(path: str) -> tuple[pyarrow.fs.FileSystem, str]:
    """pyarrow's filesystem and path for a local path or an object-store URI (s3://, gs://)."""
    if is_uri(path):
        return pyarrow.fs.FileSystem.from_uri(path)
    return pyarrow.fs.LocalFileSystem(), os.path.abspath(path)


def read_bytes(path: str) -> bytes:
    fs, fs_path = _filesystem(path)
    try:
        with fs.open_input_stream(fs_path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint file at {path}") from None


def write_bytes_atomic(path: str, data: bytes) -> None:
    """Write then rename, so a reader never sees half a file (object stores put atomically anyway)."""
    fs, fs_path = _filesystem(path)
    fs.create_dir(os.path.dirname(fs_path), recursive=True)
    partial = fs_path + ".tmp"
    with fs.open_output_stream(partial) as f:
        f.write(data)
    fs.move(partial, fs_path)


def exists(path: str) -> bool:
    fs, fs_path = _filesystem(path)
    return fs.get_file_info(fs_path).type != pyarrow.fs.FileType.NotFound


# ----------------------------------------------------------------------------------------- checkpoints
def checkpoint_payload(encoder: nn.Module, cfg: Config, stage: str, step: int, optimizer: torch.optim.Optimizer,
                       moco: MoCo | None = None, fisher: dict[str, Tensor] | None = None) -> dict[str, Any]:
    """The one-file checkpoint: plain tensors, numbers, strings, lists and dicts only."""
    payload = {
        "model": {k: v.detach().cpu() for k, v in encoder_state_dict(encoder).items()},
        "config": to_dict(cfg),
        "stage": stage,
        "step": step,
        "optimizer": optimizer.state_dict(),
    }
    if moco is not None:
        payload["moco"] = {k: v.detach().cpu() for k, v in _unwrap(moco).state_dict().items()}
    if fisher is not None:
        payload["fisher"] = {k: v.cpu() for k, v in fisher.items()}
    return payload


def load_payload(data: bytes | str | os.PathLike, what: str, published_arch: str | None = None) -> dict[str, Any]:
    """A checkpoint from bytes or a local path, checked to hold what `checkpoint_payload` writes; with
    `published_arch` (--init) a published release is accepted too, as {"model": weights} (stt.published)."""
    payload = read_checkpoint(data, what)  # a text, empty or truncated file: one line naming `what`
    if published_arch and not is_stt_checkpoint(payload):
        return init_payload(payload, what, published_arch)
    missing = [k for k in ("model", "config", "stage", "step") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise ValueError(f"{what}: not an stt.train checkpoint (missing {missing})")
    return payload


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------- models
def stage_config(cfg: Config, stage: str) -> Config:
    """A copy of `cfg` whose model input space is the stage's, so the evaluator feeds what training fed."""
    staged = from_dict(to_dict(cfg))
    staged.model.input_space = INPUT_SPACE[stage]
    return staged


def build_spatial(cfg: Config, init: dict[str, Tensor] | None = None) -> tuple[MoCo, torch.optim.Optimizer]:
    """MoCo v2 (its query and momentum encoders initialised from the encoder weights `init` if
    given) and its optimiser (SGD, momentum 0.9, as MoCo v2); lr is set every step."""
    moco = MoCo(cfg.spatial, cfg.model)
    if init is not None:
        load_encoder_weights(moco.encoder, init)
        moco.key_net["encoder"].load_state_dict(moco.encoder.state_dict())
    params = [p for p in moco.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.spatial.lr, momentum=0.9, weight_decay=cfg.spatial.weight_decay)
    return moco, optimizer


def build_temporal(cfg: Config, init: dict[str, Tensor] | None) -> tuple[nn.Module, nn.Module | None, torch.optim.Optimizer]:
    """Student (initialised from the spatial encoder `init` if given), frozen teacher, Adam.

    The teacher is needed only for global correlation distillation (beta > 0 in the recipe); it is the
    spatial encoder itself, or `model.weights` when no spatial checkpoint is given.
    """
    student = build_encoder(cfg.model)
    if init is not None:
        load_encoder_weights(student, init)
    teacher = None
    beta = temporal_config(cfg).beta  # the recipe may drop global distillation
    if beta > 0:
        if init is None and cfg.model.weights == "random":
            raise ValueError(
                f"temporal.beta={beta} (train.recipe={cfg.train.recipe}) needs a frozen teacher: pass --init SPATIAL_CHECKPOINT, "
                "run --stage all, set model.weights to a local state dict, or set temporal.beta=0"
            )
        teacher = build_teacher(cfg.model, init if init is not None else student.state_dict())
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg.train.lr)
    return student, teacher, optimizer


# ----------------------------------------------------------------------------------------- one step
def train_one_step(compute_losses, optimizer: torch.optim.Optimizer, lr: float, device: torch.device) -> dict[str, Tensor]:
    """Set the lr, run `compute_losses()` (bf16 autocast on GPU), back-propagate "loss", step.

    Returns the detached losses; reading them (`.item()`) is left to the caller, so a GPU step
    never waits on the host.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        losses = compute_losses()
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return {name: value.detach() for name, value in losses.items()}


class WindowMeter:
    """Averages losses, and measures throughput and data waiting, over the steps between reports."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.data_wait_s = 0.0
        self.started = time.perf_counter()

    def add(self, losses: dict[str, Tensor]) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.float()
        self.steps += 1

    def summary(self, pairs_per_step: int) -> dict[str, float]:
        """Mean losses; pairs/s (all workers) and the fraction of wall time spent waiting for a batch."""
        averages = {name: float(total) / self.steps for name, total in self.sums.items()}  # syncs the GPU once
        wall = time.perf_counter() - self.started
        averages["pairs_per_s"] = pairs_per_step * self.steps / wall
        averages["data_wait_fraction"] = self.data_wait_s / wall
        return averages


def endless_batches(shard, batch_size: int, device: torch.device):
    """Batches of `shard` (a Ray Data iterator) epoch after epoch, moved to `device`.

    Every worker's shard holds the same number of rows (Ray Train splits with equal=True), so all
    workers see the same number of batches per epoch and step in lockstep.
    """
    epoch = 0
    while True:
        empty = True
        for batch in shard.iter_torch_batches(batch_size=batch_size, drop_last=True, device=device):
            empty = False
            yield batch
        if empty:
            raise ValueError(
                f"the training data yields no full batch of train.batch_size={batch_size} per worker "
                f"(epoch {epoch}): use more data, fewer workers or a smaller batch"
            )
        epoch += 1


def local_batches(rows, batch_size: int, columns: list[str], device: torch.device):
    """Batches of exactly `batch_size` rows of `columns`, as tensors on `device`, from the chunks of
    `stt.data.pipeline.local_stream` (endless, so no epoch ever runs short)."""
    pending: dict[str, list[np.ndarray]] = {column: [] for column in columns}
    held = 0
    for chunk in rows:
        for column in columns:
            pending[column].append(chunk[column])
        held += len(chunk[columns[0]])
        while held >= batch_size:
            joined = {column: np.concatenate(parts) for column, parts in pending.items()}
            yield {column: torch.from_numpy(values[:batch_size]).to(device) for column, values in joined.items()}
            pending = {column: [values[batch_size:]] for column, values in joined.items()}
            held -= batch_size


def prefetched(batches, depth: int = 2):
    """`batches` drawn up to `depth` ahead on a background thread: decoding overlaps the steps, and the
    first batch is under way while the model is built."""
    queue: Queue = Queue(maxsize=depth)

    def fill() -> None:
        try:
            for batch in batches:
                queue.put(batch)
        except BaseException as error:  # re-raised in the training loop, where it is reported
            queue.put(error)

    threading.Thread(target=fill, name="stt-decode", daemon=True).start()
    while True:
        item = queue.get()
        if isinstance(item, BaseException):
            raise item
        yield item


def worker_batches(cfg: Config, stage: str, start_step: int, skipped, device: torch.device):
    """{stream name: batch} for every step: from the Ray Data shards Ray Train hands this worker, or with
    `data.decode_in_worker` from the same streams decoded here (`prefetched`, so decoding overlaps the steps)."""
    if not cfg.data.decode_in_worker:
        return stage_batches({name: ray.train.get_dataset_shard(name) for name in STAGE_STREAMS[stage]},  # Ray Data
                             cfg.train.batch_size, device)
    from stt.data.pipeline import local_stream, report_corrupt

    streams = {name: local_batches(local_stream(name, cfg.data, cfg.spatial, seed=cfg.train.seed,
                                                skip_rows=start_step * cfg.train.batch_size,
                                                report=lambda corrupt: report_corrupt(skipped, corrupt)),
                                   cfg.train.batch_size, BATCH_COLUMNS[name], device)
               for name in STAGE_STREAMS[stage]}
    return prefetched({name: next(stream) for name, stream in streams.items()} for _ in itertools.count())


def stage_batches(shards: dict[str, Any], batch_size: int, device: torch.device):
    """{stream name: batch} for every step, one batch of each of the stage's streams (`endless_batches`)."""
    streams = {name: endless_batches(shard, batch_size, device) for name, shard in shards.items()}
    while True:
        yield {name: next(stream) for name, stream in streams.items()}


def spatial_losses(moco: nn.Module, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """MoCo's InfoNCE on the two augmented views of each image (DetCo adds its local terms)."""
    outputs = moco(batch["view_q"], batch["view_k"])
    return {name: value for name, value in outputs.items() if name != "logits"}


def ewc_regulariser(encoder: Encoder, init: dict[str, Any] | None, cfg: Config, init_path: str):
    """The EWC penalty toward the earlier stage's weights (`init`, a checkpoint payload that holds its
    Fisher), as a closure over `encoder`'s parameters (stt.ewc.ewc_penalty)."""
    if init is None or "fisher" not in init:
        raise ValueError(
            f"train.recipe={cfg.train.recipe} regularises this stage with EWC, which needs the earlier stage's checkpoint "
            f"with its Fisher information; {init_path or 'no --init'} has none (run --stage all, or the earlier stage "
            "with this recipe)"
        )
    device = next(encoder.parameters()).device
    fisher = {name: value.to(device) for name, value in init["fisher"].items()}
    anchor = {name: init["model"][name].to(device) for name in fisher}
    parameters = dict(encoder.named_parameters())
    return lambda: ewc_penalty(parameters, anchor, fisher, cfg.train.ewc_weight)


def objective_fisher(model: nn.Module, stage: str, teacher: nn.Module | None, cfg: Config, batches, num_batches: int
                     ) -> dict[str, Tensor]:
    """Diagonal Fisher of the stage's objective over the encoder's parameters, averaged over
    `num_batches` batches of its stream on every worker. It runs on a copy of the (unwrapped)
    model, so MoCo's queue and momentum encoder and BatchNorm statistics stay as trained."""
    copy_of = copy.deepcopy(_unwrap(model))
    if stage == "spatial":
        encoder, loss_of = copy_of.encoder, lambda batch: copy_of(batch["spatial"]["view_q"], batch["spatial"]["view_k"])["loss"]
    elif stage == "temporal":
        encoder, loss_of = copy_of, lambda batch: temporal_step(copy_of, teacher, batch["temporal"], cfg)["loss"]
    else:
        raise ValueError(f"no EWC recipe is anchored to the {stage} stage")
    fisher = fisher_diagonal(dict(encoder.named_parameters()), loss_of, (next(batches) for _ in range(num_batches)))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for value in fisher.values():
            torch.distributed.all_reduce(value)
            value /= torch.distributed.get_world_size()
    return fisher


# ----------------------------------------------------------------------------------------- evaluation
def davis_jf(checkpoint: Path, cfg: Config, device: torch.device) -> float:
    """J&F-Mean of label propagation with the checkpoint's encoder on the small held-out DAVIS set."""
    from stt.data.synthetic import ensure_dataset
    from stt.evaluate import evaluate_davis

    root = Path(cfg.train.eval_davis_root) if cfg.train.eval_davis_root else ensure_dataset("davis")
    with tempfile.TemporaryDirectory() as features:  # a fresh checkpoint's features are never reused
        report = evaluate_davis(root, str(checkpoint), cfg, out=None, split=cfg.train.eval_davis_set, device=str(device),
                                feature_cache=Path(features), progress=False)
    return float(report["summary"]["J&F-Mean"])


# ----------------------------------------------------------------------------------------- the worker
def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker. `config`: {"config": to_dict(Config), "stage", "init": the earlier stage's
    checkpoint path/URI or "", "fisher_batches": batches for the Fisher stored at the last step (0:
    none), "skipped_frames": the stream's corrupt-frame counter (an actor)}."""
    cfg, stage = from_dict(config["config"]), config["stage"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed + rank)

    resume = None
    latest = ray.train.get_checkpoint()
    if latest is not None:
        with latest.as_directory() as folder:
            resume = load_payload(Path(folder) / CHECKPOINT_FILE, f"{latest.path}/{CHECKPOINT_FILE}")
    start_step = resume["step"] if resume else 0
    init = load_payload(read_bytes(config["init"]), config["init"], published_arch=cfg.model.arch) if config["init"] else None

    teacher = moco = None
    if stage == "temporal":
        model, teacher, optimizer = build_temporal(cfg, init["model"] if init else None)
        encoder, peak_lr = model, effective_lr(cfg, stage, world)
        if resume:
            load_encoder_weights(model, resume["model"])
        if teacher is not None:
            teacher.to(device)
    else:  # spatial, and the joint stage: MoCo, the latter with a student sharing its trunk
        moco, optimizer = build_spatial(cfg, init["model"] if init else None)
        model = moco if stage == "spatial" else SpatiotemporalModel(moco, cfg)
        encoder, peak_lr = moco.encoder, effective_lr(cfg, stage, world)
        if resume:
            moco.load_state_dict(resume["moco"])
    model.to(device)  # in place: the optimiser keeps the same parameter objects
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])  # after the move: its state lands on the parameters' device
    penalty = ewc_regulariser(encoder, init, cfg, config["init"]) if recipe_of(cfg).ewc_stage == stage else None
    if device.type == "cuda" and world > 1 and stage == "temporal":
        # MoCo keeps per-worker BatchNorm on purpose: shuffle-BN relies on it (see stt.spatial).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False, parallel_strategy_kwargs=ddp_options(cfg, stage))

    step_losses = {
        "spatial": lambda batch: add_penalty(spatial_losses(ddp_model, batch["spatial"]), penalty),
        "temporal": lambda batch: temporal_step(ddp_model, teacher, batch["temporal"], cfg, penalty=penalty),
        "spatiotemporal": lambda batch: ddp_model(batch["spatial"], batch["temporal"]),
    }[stage]
    batches = worker_batches(cfg, stage, start_step, config["skipped_frames"], device)
    pairs_per_step = cfg.train.batch_size * world
    meter = WindowMeter()
    step = start_step
    while step < cfg.train.max_steps:
        waited = time.perf_counter()
        batch = next(batches)
        meter.data_wait_s += time.perf_counter() - waited
        lr = learning_rate(step, peak_lr, cfg.train.warmup_steps, cfg.train.max_steps)
        meter.add(train_one_step(lambda: step_losses(batch), optimizer, lr, device))
        step += 1

        checkpoint_due = step % cfg.train.checkpoint_every == 0 or step == cfg.train.max_steps
        if not (checkpoint_due or step % cfg.train.log_every == 0):
            continue
        metrics = {**meter.summary(pairs_per_step), "step": step, "lr": lr, "start_step": start_step}
        if rank == 0:
            metrics["skipped_frames"] = ray.get(config["skipped_frames"].total.remote())
        if not checkpoint_due:
            ray.train.report(metrics)
        else:
            fisher = None
            if step == cfg.train.max_steps and config["fisher_batches"]:  # every worker: its batches join the mean
                fisher = objective_fisher(model, stage, teacher, cfg, batches, config["fisher_batches"])
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if rank == 0:  # one writer: every worker holds the same weights under DDP
                    path = Path(folder) / CHECKPOINT_FILE
                    torch.save(checkpoint_payload(encoder, cfg, stage, step, optimizer, moco, fisher), path)
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0:
                        metrics["J&F"] = davis_jf(path, cfg, device)
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"{stage}-step{step:07d}")
        if rank == 0:
            print(f"stt.train {stage} step {step}/{cfg.train.max_steps}  " + "  ".join(
                f"{name} {value:.4g}" for name, value in metrics.items() if name not in ("step", "start_step")), flush=True)
        meter.reset()


def ddp_options(cfg: Config, stage: str) -> dict[str, Any]:
    """DistributedDataParallel must be told when some parameters get no gradient in a step:
    without global distillation the temporal objective never reaches res5 (layer4)."""
    return {"find_unused_parameters": stage == "temporal" and temporal_config(cfg).beta == 0}


# ----------------------------------------------------------------------------------------- orchestration
class MetricsLogger(ray.train.UserCallback):
    """A Ray Train callback (it runs in the controller, on the driver's node) that copies rank 0's
    reported numbers to TensorBoard and to Ray metrics `stt_train_<name>` for the dashboard."""

    def __init__(self, logdir: str | None, run: str, stage: str, trial: str = ""):
        self.logdir, self.run, self.stage, self.trial = logdir, run, stage, trial
        self.writer = None
        self.gauges: dict[str, Any] = {}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        from ray.util.metrics import Gauge

        values = {k: float(v) for k, v in metrics[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = int(values["step"])
        if self.logdir and self.writer is None:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(self.logdir)
        for name, value in values.items():
            if self.writer is not None and name != "step":
                self.writer.add_scalar(f"{self.stage}/{name}", value, step)
            if name not in self.gauges:
                self.gauges[name] = Gauge(f"stt_train_{re.sub(r'[^a-zA-Z0-9_]', '_', name)}",
                                          description=f"stt.train: {name}", tag_keys=("run", "stage", "trial"))
            # trial "": not a sweep trial; a sweep's trials share run and stage and differ only here
            self.gauges[name].set(value, tags={"run": self.run, "stage": self.stage, "trial": self.trial})
        if self.writer is not None:
            self.writer.flush()


def export_final(checkpoint: ray.train.Checkpoint, destination: str) -> None:
    """Copy a Ray checkpoint's one file to `destination` (local path or URI)."""
    with checkpoint.as_directory() as folder:
        write_bytes_atomic(destination, (Path(folder) / CHECKPOINT_FILE).read_bytes())


def training_dataset(cfg: Config, stage: str, stream: str, num_workers: int, stage_dir: str, extra_steps: int, skipped):
    """One of the stage's Ray Data streams (stt.data.pipeline), from where the run's latest checkpoint
    left off to `train.max_steps` plus `extra_steps` (the Fisher's batches).

    stream "spatial": two augmented views of each image; "temporal": uint8 RGB frame pairs (the Lab
    input is computed on the worker's device, the teacher takes the RGB). As many epochs as the
    steps need, each in its own order drawn from (seed, epoch). The joint stage reads both, each
    with half of `data.data_cpus`. `skipped`: the run's corrupt-frame counter (a SkippedFrames actor).
    """
    from stt.data import pipeline

    data = dataclasses.replace(cfg.data, data_cpus=cfg.data.data_cpus / len(STAGE_STREAMS[stage]))
    start_step = resumed_step(stage_dir)
    rows_per_step = cfg.train.batch_size * num_workers
    span = {"rows": max(1, (cfg.train.max_steps - start_step + extra_steps) * rows_per_step),
            "skip_rows": start_step * rows_per_step, "skipped": skipped, "seed": cfg.train.seed}
    if stream == "spatial":
        built = pipeline.spatial_view_dataset(data, cfg.spatial, **span)
    else:
        built = pipeline.temporal_pair_dataset(data, **span)
    return built.dataset.select_columns(BATCH_COLUMNS[stream])


def resumed_step(stage_dir: str) -> int:
    """The step of the checkpoint Ray Train resumes the run stored at `stage_dir` from (0: a new run)."""
    if not exists(join(stage_dir, "checkpoint_manager_snapshot.json")):
        return 0
    result = ray.train.Result.from_path(stage_dir)
    return int(result.metrics["step"]) if result.checkpoint is not None else 0


def build_stage_trainer(stage: str, cfg: Config, run_dir: str, init: str, *, use_gpu: bool, workers: int,
                        cpus_per_worker: float, callbacks: tuple = (), max_failures: int = 3, keep_checkpoints: int = 3,
                        tensorboard: str | None = None, run_name: str = "stt", trial: str = "") -> ray.train.torch.TorchTrainer:
    """The TorchTrainer of one stage, stored as the Ray Train run `<run_dir>/<stage>`.

    Everything Ray needs (scaling, storage, failure policy) is declared here; `stt.train` and the
    sweep (which adds a Tune callback) both build their trainers through this function.
    """
    cfg = stage_config(cfg, stage)
    if cfg.data.decode_in_worker and workers != 1:
        raise ValueError(f"data.decode_in_worker=true decodes in the one Train worker: expected --workers 1, got {workers}")
    check_cpu_budget(workers, cpus_per_worker, 0.0 if cfg.data.decode_in_worker else cfg.data.data_cpus)
    # Workers print their own progress lines; Ray Data's per-operator bars would flood the terminal.
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Train builds the streams in its controller; a wrong data path is reported here, plainly.
    resolve_source(cfg.data.root)
    if cfg.data.images and "spatial" in STAGE_STREAMS[stage]:
        resolve_source(cfg.data.images, images=True)
    fisher_batches = cfg.train.ewc_fisher_batches if feeds_ewc(cfg, stage) else 0
    skipped = SkippedFrames.remote()

    def dataset_factory(stream: str):
        # Ray Train calls it at every start of the worker group, so a group restarted after a crash
        # streams on from its checkpoint too, not from the first row.
        return lambda: training_dataset(cfg, stage, stream, workers, join(run_dir, stage), fisher_batches, skipped)

    tensorboard = tensorboard or (None if is_uri(run_dir) else join(run_dir, "tensorboard"))
    return ray.train.torch.TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": to_dict(cfg), "stage": stage, "init": init, "fisher_batches": fisher_batches,
                           "skipped_frames": skipped},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=stage,  # same storage and name: Ray Train finds the run's checkpoints and resumes
            storage_path=run_dir,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=keep_checkpoints or None),  # 0: keep all
            callbacks=[MetricsLogger(tensorboard, run_name, stage, trial), *callbacks],
        ),
        datasets={} if cfg.data.decode_in_worker else {stream: dataset_factory(stream) for stream in STAGE_STREAMS[stage]},
    )


# Keys that never change the weights a stage learns: a resumed run may change them freely.
RESUMABLE_CHANGES = ("train.log_every", "train.checkpoint_every", "train.eval_every", "train.eval_davis_root",
                     "train.eval_davis_set", "data.data_cpus", "data.decode_in_worker", "eval.", "propagation.")


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_resume_config(stage: str, cfg: Config, run_dir: str) -> None:
    """Refuse to resume (or skip as finished) a stage stored under another configuration: re-running a
    finished run with a new lr silently kept the old model. Names every differing key."""
    final, stage_dir = join(run_dir, f"{stage}-final.pt"), join(run_dir, stage)
    if exists(final):
        source, stored = final, load_payload(read_bytes(final), final)["config"]
    elif resumed_step(stage_dir):
        checkpoint = ray.train.Result.from_path(stage_dir).checkpoint
        with checkpoint.as_directory() as folder:
            source, stored = checkpoint.path, load_payload(Path(folder) / CHECKPOINT_FILE, checkpoint.path)["config"]
    else:
        return
    was = flatten(to_dict(from_dict(stored, source=source)))  # through from_dict: keys added since get their defaults
    now = flatten(to_dict(stage_config(cfg, stage)))
    differing = [k for k in now if now[k] != was.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if differing:
        changes = ", ".join(f"{k}: {was.get(k)!r} -> {now[k]!r}" for k in differing[:6])
        raise ValueError(f"{run_dir}: the {stage} stage stored there was trained with other settings ({changes}); "
                         "resume it with the same configuration, or train under a new --name (train.max_steps "
                         "too: the cosine schedule ends there, so a longer run is a new run)")


def run_stage(stage: str, cfg: Config, args: argparse.Namespace, run_dir: str, init: str, use_gpu: bool) -> str:
    """Train one stage as the Ray Train run `<run_dir>/<stage>`; returns the exported final checkpoint."""
    final = join(run_dir, f"{stage}-final.pt")
    check_resume_config(stage, cfg, run_dir)
    if exists(final):
        done = load_payload(read_bytes(final), final)
        if done["stage"] == stage and done["step"] >= cfg.train.max_steps:
            if feeds_ewc(cfg, stage) and "fisher" not in done:
                raise ValueError(f"{final}: the finished {stage} stage has no Fisher information, which "
                                 f"train.recipe={cfg.train.recipe} needs; train it again under a new --name")
            print(f"stt.train: {stage} stage already finished at step {done['step']} ({final}); skipping it")
            return final
    print(describe_lr(cfg, stage, args.workers))
    trainer = build_stage_trainer(
        stage, cfg, run_dir, init, use_gpu=use_gpu, workers=args.workers,
        cpus_per_worker=args.cpus_per_worker or default_cpus_per_worker(
            args.workers, use_gpu, 0.0 if cfg.data.decode_in_worker else cfg.data.data_cpus),
        max_failures=args.max_failures, keep_checkpoints=args.keep_checkpoints, tensorboard=args.tensorboard, run_name=args.name,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"the {stage} stage reported no checkpoint (train.max_steps={cfg.train.max_steps})")
    export_final(result.checkpoint, final)
    print(f"stt.train: {stage} stage finished; final checkpoint {final}")
    return final


def start_ray(**init_kwargs) -> None:
    """`ray.init` for stt's command lines: join the cluster in RAY_ADDRESS, else start a local one.

    A local cluster gets a dashboard port chosen here, and every task and actor of the job is told it
    (RAY_API_SERVER_ADDRESS): Ray Train's placement-group cleaner asks the State API whether a stopped
    run's controller is gone, and with another Ray instance on the same machine (a second sweep, a
    test session) its auto-detection refuses to guess, so the placement groups of ASHA-stopped trials
    leaked and later trials waited forever for their workers.
    """
    # Ray's Train state API (the dashboard's Train runs) records nothing without this flag; the driver
    # reads it for `ray.init`, and the runtime_env below hands it to the Train controller actor.
    os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**init_kwargs)
        return
    with socket.socket() as probe:  # a free port now; Ray retries the next ones if it is taken meanwhile
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env_vars = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
                "RAY_TRAIN_ENABLE_STATE_TRACKING": os.environ["RAY_TRAIN_ENABLE_STATE_TRACKING"]}
    ray.init(dashboard_host="127.0.0.1", dashboard_port=port, runtime_env={"env_vars": env_vars}, **init_kwargs)


def default_cpus_per_worker(num_workers: int, use_gpu: bool, data_cpus: float) -> float:
    """One CPU per worker, or on a CPU-only cluster an equal share of what Ray Data leaves (it hangs
    if training holds every CPU)."""
    if use_gpu:
        return 1.0
    return min(1.0, (ray.cluster_resources().get("CPU", 1.0) - data_cpus) / num_workers)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m stt.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (one GPU each on GPU); the global batch and the lr grow with them")
    parser.add_argument("--stage", choices=(*STAGES, "all"), default="all",
                        help="all: the stages of train.recipe in order (default recipe: spatial, then temporal initialised from it)")
    parser.add_argument("--cpu", action="store_true", help="train on CPUs even if the cluster has GPUs (default: GPUs when present)")
    parser.add_argument("--max-steps", type=int, help="optimisation steps per stage (overrides train.max_steps)")
    parser.add_argument("--storage", default="runs", help="local folder or s3:// URI for checkpoints and logs (default: ./runs)")
    parser.add_argument("--name", default="stt", help="run name: <storage>/<name>/<stage>/; re-running with it resumes")
    parser.add_argument("--init", default="", help="the earlier stage's checkpoint to start from (temporal stage: and to distil), or a published release (stt.published: STT authors', VFS, CRW, torchvision); with --stage all, each stage starts from the one before")
    parser.add_argument("--max-failures", type=int, default=3, help="restarts of a crashed worker group from its last checkpoint")
    parser.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept per stage (the latest ones; 0 keeps every one, e.g. for a learning curve)")
    parser.add_argument("--cpus-per-worker", type=float,
                        help="CPUs reserved per training worker (default: 1, or on CPUs a share of what data.data_cpus leaves)")
    parser.add_argument("--tensorboard", help="TensorBoard folder (default: <storage>/<name>/tensorboard for local storage)")
    parser.add_argument("--table1-row", choices=list(TABLE1_ROWS),
                        help="paper 001 Table 1: set the temporal objective of this row (over --config and overrides); "
                             "the paper trains these with train.recipe=temporal")
    parser.add_argument("--config", help="YAML file with config sections (train, data, model, spatial, temporal, ...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=32 temporal.beta=0")
    return parser


def main(argv: list[str] | None = None) -> dict[str, str]:
    """Run the requested stages; returns {stage: final checkpoint path}."""
    args = get_args_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.table1_row:
        cfg.temporal = table1_config(args.table1_row, cfg.temporal)
    if args.max_steps is not None:
        cfg.train.max_steps = args.max_steps
    if args.workers < 1:
        raise ValueError(f"--workers: expected at least 1, got {args.workers}")
    if not cfg.data.root:
        from stt.data.synthetic import ensure_dataset

        cfg.data.root = str(ensure_dataset("ytvos"))
        print(f"stt.train: no data.root given: training on the embedded synthetic YouTube-VOS set {cfg.data.root}"
              + ("" if ray.is_initialized() or os.environ.get("RAY_ADDRESS") else " on a local Ray cluster"))
    if not ray.is_initialized():
        start_ray()  # joins the cluster in RAY_ADDRESS, else starts a local one
    use_gpu = not args.cpu and ray.cluster_resources().get("GPU", 0) >= 1
    run_dir = join(args.storage if is_uri(args.storage) else os.path.abspath(args.storage), args.name)

    finals: dict[str, str] = {}
    init = args.init
    for stage in recipe_of(cfg).stages if args.stage == "all" else (args.stage,):
        finals[stage] = init = run_stage(stage, cfg, args, run_dir, init, use_gpu)
    return finals


if __name__ == "__main__":
    sys.exit(cli.run(main, "stt.train"))
