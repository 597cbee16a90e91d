"""Learning without Forgetting (Li & Hoiem, ECCV 2016 / TPAMI 2017) after the spatial stage: the
"+ LwF" row of paper 000's Table 5(b), `train.recipe=spatial-then-temporal-lwf`.

LwF keeps an old task while learning a new one by knowledge distillation on the OLD TASK'S OUTPUTS:
the original network's responses y_o to the new task's images are recorded and the updated network
is trained to keep producing them, L_old = -sum_i y'_o(i) log yhat'_o(i) with both distributions
softened by a temperature T = 2 (y'(i) = y(i)^(1/T) / sum_j y(j)^(1/T), i.e. softmax(logits / T)),
added to the new task's loss with weight lambda_o (1 in LwF).

Here the old task is stage 1's MoCo v2 instance discrimination and the new data are the temporal
stage's frames. Choices, and why:
- Responses: the old task's output layer, i.e. what MoCo's InfoNCE classifies with. A frame's
  MoCo output is its l2-normalised projection q = g(pool(res5(x))) (g: MoCo's 2-layer global head)
  scored against the keys of MoCo's queue, logits = q . U^T / tau_c (K = spatial.queue_size keys,
  tau_c = spatial.temperature; Eq. 1's negative logits). The K queue keys are the "classes" of the
  old task, frozen as stage 1 left them (the queue is in its checkpoint), as LwF keeps the old
  classes. Not the res5 features themselves: LwF distils outputs, not features (its Sec. 3
  contrasts itself with feature-matching), and distilling res5 directly is close to what L_gc does.
  Not similarities within the batch: with 8-16 pairs per worker they would be a distribution over
  ~30 "classes" that change every step.
- Distance: KL(y'_o || yhat'_o) of the temperature-T softmaxes, averaged over frames. It has the
  gradient of LwF's cross-entropy (they differ by the targets' entropy, a constant) and is 0 when
  nothing is forgotten, so the logged term reads directly. T = `train.lwf_temperature` (LwF: 2),
  lambda_o = `train.lwf_weight` (LwF: 1).
- Old network: the frozen stage-1 trunk (standard strides) on the ImageNet-normalised RGB of the
  temporal stage's target and reference frames, its MoCo head and queue; the student is the temporal
  stage's stride-8 trunk on its Lab input, whose res5 (stride 32, the same grid as in L_gc) goes
  through the SAME head and queue. One deviation from LwF: LwF fine-tunes the old head theta_o
  too; here it stays frozen, because the head is thrown away after training (only the trunk is
  evaluated) and a trainable head could absorb the drift the term exists to prevent; it also keeps
  the checkpoint format (the student's head would otherwise need saving).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stt.config import Config
from stt.models import build_teacher
from stt.spatial import projection_head

HEAD_PREFIX = "query_net.global_head."  # MoCo's global head in a spatial checkpoint's "moco" entry
QUEUE = "global_queue"


def lwf_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)), summed over the K classes, averaged over the N rows.

    student_logits, teacher_logits: N x K old-task logits of the same N images (the teacher's
    detached); temperature: LwF's T. Returns a float32 scalar >= 0.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"logits: expected two N x K tensors of one shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    return (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1).mean()


class LwF(nn.Module):
    """The frozen old network and its outputs: forward(rgb, student_res5) -> `lwf_loss`.

    rgb: N x 3 x H x W ImageNet-normalised frames (what stage 1 was trained on); student_res5:
    N x C x h x w, the student's res5 of the same frames. `weight` is lambda_o (train.lwf_weight).
    """

    def __init__(self, cfg: Config, init: dict[str, Any] | None, init_name: str = ""):
        super().__init__()
        moco = (init or {}).get("moco") or {}
        if not moco or QUEUE not in moco or not any(k.startswith(HEAD_PREFIX) for k in moco):
            raise ValueError(
                f"train.recipe={cfg.train.recipe} distils the spatial stage's MoCo outputs (LwF), which needs its "
                f"checkpoint with MoCo's head and queue; {init_name or 'no --init'} has none (run --stage all, or "
                "pass the spatial stage's checkpoint to --init)"
            )
        self.teacher = build_teacher(cfg.model, init["model"])
        head_state = {k[len(HEAD_PREFIX) :]: v for k, v in moco.items() if k.startswith(HEAD_PREFIX)}
        width, feature_dim = head_state["0.weight"].shape[1], head_state["2.weight"].shape[0]
        self.head = projection_head(width, feature_dim)
        self.head.load_state_dict(head_state)
        self.head.requires_grad_(False)
        self.register_buffer("queue", moco[QUEUE].float().clone())  # K x D, l2-normalised keys
        self.tau = cfg.spatial.temperature
        self.temperature, self.weight = cfg.train.lwf_temperature, cfg.train.lwf_weight

    def logits(self, res5: Tensor) -> Tensor:
        """N x K old-task logits of N res5 maps: normalise(head(mean-pooled res5)) . queue^T / tau."""
        q = F.normalize(self.head(res5.mean(dim=(2, 3))), dim=1)
        return q @ self.queue.to(q.dtype).T / self.tau

    def forward(self, rgb: Tensor, student_res5: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits = self.logits(self.teacher(rgb, layers=("res5",))["res5"])
        return lwf_loss(self.logits(student_res5), teacher_logits, self.temperature)
