"""Elastic weight consolidation (Kirkpatrick et al. 2017), the continual-learning baseline of
paper 001 Table 2 and paper 000 Table 5: keep the stage-2 encoder near the stage-1 weights,
more firmly where the stage-1 objective is more sensitive.

    penalty = lambda / 2 * sum_i F_i (theta_i - theta*_i)^2

theta* are the stage-1 (spatial) weights, F the diagonal Fisher information of the stage-1
objective at theta*. Parameters are matched by name; encoder names are the same in every stride
preset (stt/models.py), so a Fisher estimated on the spatial encoder applies to the student.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor


def fisher_diagonal(
    parameters: Mapping[str, Tensor], loss_fn: Callable[[Any], Tensor], batches: Iterable[Any]
) -> dict[str, Tensor]:
    """Diagonal Fisher estimate: the mean over batches of the squared gradient of loss_fn(batch).

    This is the empirical Fisher with one gradient per mini-batch, not per sample: the
    contrastive objective couples the samples of a batch (BatchNorm, shared negatives), so
    per-sample gradients are not defined. `parameters` (name -> tensor requiring grad) are
    what the Fisher is taken over; a parameter the loss does not reach gets zeros. Gradients
    are taken with torch.autograd.grad, so no `.grad` field is touched.
    """
    names = list(parameters)
    tensors = [parameters[name] for name in names]
    fisher = [torch.zeros_like(t, dtype=torch.float32) for t in tensors]
    count = 0
    for batch in batches:
        grads = torch.autograd.grad(loss_fn(batch), tensors, allow_unused=True)
        for total, grad in zip(fisher, grads):
            if grad is not None:
                total.add_(grad.float().square())
        count += 1
    if count == 0:
        raise ValueError("fisher_diagonal: `batches` yielded no batch")
    return {name: total / count for name, total in zip(names, fisher)}


def ewc_penalty(
    parameters: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor], weight: float
) -> Tensor:
    """weight / 2 * sum_i F_i (theta_i - theta*_i)^2 over the parameters named in `fisher`.

    parameters: current theta by name; anchor: theta* (stage-1 weights) by name; each tensor of
    one name has one shape. Returns a scalar (float32) that is differentiable in `parameters`.
    """
    if not fisher:
        raise ValueError("ewc_penalty: the Fisher information is empty")
    missing = sorted((fisher.keys() - parameters.keys()) | (fisher.keys() - anchor.keys()))
    if missing:
        raise ValueError(f"ewc_penalty: parameters or anchor lack the Fisher's entries {missing}")
    terms = [
        (information * (parameters[name].float() - anchor[name].float()).square()).sum()
        for name, information in fisher.items()
    ]
    return weight / 2 * torch.stack(terms).sum()
