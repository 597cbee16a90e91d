"""Batches for a training worker, from Ray Data shards or from a stream decoded in the worker.

Every iterator here is endless: a stage draws exactly `train.max_steps` batches (plus the Fisher's),
epoch after epoch, so no epoch ever runs short of a step.
"""

from __future__ import annotations

import threading
from queue import Queue
from typing import Any

import numpy as np
import torch


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


def stage_batches(shards: dict[str, Any], batch_size: int, device: torch.device):
    """{stream name: batch} for every step, one batch of each of the stage's streams (`endless_batches`)."""
    streams = {name: endless_batches(shard, batch_size, device) for name, shard in shards.items()}
    while True:
        yield {name: next(stream) for name, stream in streams.items()}
