"""ResNet-18/50 encoders returning the feature pyramid {res3, res4, res5} at a chosen stride.

The trunk is torchvision's own ResNet (random init); presets change conv strides and drop the
stem max-pool, so every layout has the same parameters and key names as torchvision and one state
dict loads into all of them (ImageNet weights, the spatial-stage teacher, the temporal student).

Output strides (input H x W gives a map of ceil(H / stride) x ceil(W / stride)):

    layout (res4 stride)      stem pool      layer strides  res3  res4  res5
    8   (temporal student)    none           1, 2, 2, 2*     4     8     32
    4   (temporal student)    3x3 s2 mean    1, 1, 1, 2*     4     4     32
    16  (torchvision / teacher) 3x3 s2 max   1, 2, 2, 2      8     16    32

Both student layouts are the authors' (configs/test/res18_d8.py: strides (1, 2, 2, 1), no pool;
res18_d4.py: strides (1, 1, 1, 1), `pool_type='mean'`, nn.AvgPool2d(3, 2, 1) counting the padding):
at stride 4 every layer runs at 1/4 of the input, so layer1 costs a quarter of what it costs in
the stride-8 layout and layer2 never downsamples.

* res5 must sit at stride 32 in every layout, so that the student's res5 grid matches the frozen
  teacher's for global correlation distillation (DESIGN.md: 8x8 at 256x256). The student therefore
  average-pools res4 down to stride 16 before layer4, whose own first block keeps its standard
  stride 2. Why this rather than the authors' stride-4 first block in layer4: a 3x3 conv with
  stride 4 never reads a quarter of its input rows and columns (and stride 8, needed by the
  stride-4 layout, reads fewer than half), while the pool averages every position; layer4 then
  sees features at the stride its ImageNet/spatial-stage weights were trained at, and costs
  exactly what it costs in the standard ResNet. The pool uses ceil_mode so that its output size is
  ceil(h / k), like every strided conv here: student and teacher res5 agree at every input size.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torchvision
from torch import Tensor, nn

from stt.config import ModelConfig

LEVELS = ("res3", "res4", "res5")
STRIDES = (8, 4)  # model.stride presets: the res4 output stride of a student
TEACHER_RES4_STRIDE = 16  # the torchvision-standard trunk

ARCHS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
_RES3_CHANNELS = {"resnet18": 128, "resnet50": 512}
# DistributedDataParallel and torch.compile wrap a model and prefix its keys; a saved wrapped
# model still holds plain encoder weights.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CLASSIFIER_PREFIX = "fc."


class Encoder(nn.Module):
    """A torchvision ResNet trunk with res3/res4/res5 at the strides of one layout (see module doc).

    forward(x: B x 3 x H x W, layers) -> {name: B x C x ceil(H/s) x ceil(W/s)} for the names in
    `layers`; only the trunk up to the deepest requested level runs.
    """

    def __init__(self, arch: str = "resnet18", res4_stride: int = 8, frozen: bool = False):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"model.arch: expected one of {sorted(ARCHS)}, got {arch!r}")
        if res4_stride not in (4, 8, TEACHER_RES4_STRIDE):
            raise ValueError(f"res4 stride: expected 4, 8 or {TEACHER_RES4_STRIDE}, got {res4_stride!r}")
        trunk = ARCHS[arch](weights=None)
        standard = res4_stride == TEACHER_RES4_STRIDE
        self.arch = arch
        self.frozen = frozen
        self.conv1, self.bn1, self.relu = trunk.conv1, trunk.bn1, trunk.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        if standard:
            self.maxpool = trunk.maxpool
        elif res4_stride == 4:  # the authors' res18_d4: a mean-pool stem, then every layer at stride 1
            self.maxpool = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
            _remove_downsampling(self.layer2)
            _remove_downsampling(self.layer3)
        else:
            self.maxpool = nn.Identity()
        res4_to_16 = TEACHER_RES4_STRIDE // res4_stride
        self.res5_pool = nn.AvgPool2d(res4_to_16, ceil_mode=True) if res4_to_16 > 1 else nn.Identity()

        res3_channels = _RES3_CHANNELS[arch]
        self.out_channels = {"res3": res3_channels, "res4": 2 * res3_channels, "res5": 4 * res3_channels}
        res3_stride = 8 if standard else 4
        self.strides = {"res3": res3_stride, "res4": res4_stride, "res5": 32}

    def forward(self, x: Tensor, layers: Sequence[str] = LEVELS) -> dict[str, Tensor]:
        unknown = [name for name in layers if name not in LEVELS]
        if unknown or not layers:
            raise ValueError(f"layers: expected a non-empty subset of {LEVELS}, got {tuple(layers)!r}")
        deepest = max(LEVELS.index(name) for name in layers)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        res3 = self.layer2(self.layer1(x))
        features = {"res3": res3}
        if deepest >= 1:
            features["res4"] = self.layer3(res3)
        if deepest >= 2:
            features["res5"] = self.layer4(self.res5_pool(features["res4"]))
        return {name: features[name] for name in layers}

    def train(self, mode: bool = True) -> Encoder:
        # A frozen teacher stays in eval mode even when a parent module calls .train(),
        # so its BatchNorm running statistics never move.
        return super().train(mode and not self.frozen)


def _remove_downsampling(layer: nn.Sequential) -> None:
    """Set every stride-2 conv of the layer's first block (main path and shortcut) to stride 1."""
    for module in layer[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)


def build_encoder(cfg: ModelConfig) -> Encoder:
    """The student encoder of `cfg` (stride preset 4 or 8), with weights from `cfg.weights`."""
    if cfg.stride not in (4, 8):
        raise ValueError(f"model.stride: expected 4 or 8, got {cfg.stride!r}")
    encoder = Encoder(cfg.arch, cfg.stride)
    if cfg.weights != "random":
        load_encoder_weights(encoder, load_state_dict_file(cfg.weights))
    return encoder


def build_teacher(cfg: ModelConfig, state_dict: Mapping[str, Tensor]) -> Encoder:
    """The frozen spatial-stage encoder for global distillation: standard strides, eval mode."""
    teacher = Encoder(cfg.arch, TEACHER_RES4_STRIDE, frozen=True)
    load_encoder_weights(teacher, state_dict)
    teacher.requires_grad_(False)
    return teacher.eval()


def load_state_dict_file(path: str) -> dict[str, Tensor]:
    """A state dict saved with torch.save at a local path (never downloaded)."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"model.weights: no file at {path!r} (expected 'random' or a local state dict)") from None
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}")
    return dict(state_dict)


def encoder_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The encoder's weights under torchvision key names, unwrapping DDP and torch.compile."""
    return _torchvision_keys(model.state_dict())


def load_encoder_weights(encoder: Encoder, state_dict: Mapping[str, Tensor]) -> None:
    """Load torchvision-named weights into any layout; the classifier (fc.*) is dropped.

    Strict otherwise: raises ValueError naming every missing or unexpected key and every shape
    mismatch, so an architecture mix-up (ResNet-18 weights into a ResNet-50) is reported plainly.
    """
    incoming = {k: v for k, v in _torchvision_keys(state_dict).items() if not k.startswith(_CLASSIFIER_PREFIX)}
    expected = encoder.state_dict()
    missing = sorted(expected.keys() - incoming.keys())
    unexpected = sorted(incoming.keys() - expected.keys())
    mismatched = [
        f"{k}: {tuple(incoming[k].shape)} vs {tuple(expected[k].shape)}"
        for k in sorted(expected.keys() & incoming.keys())
        if incoming[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"weights do not fit a {encoder.arch} encoder: missing keys {missing}, "
            f"unexpected keys {unexpected}, shape mismatches (given vs expected) {mismatched}"
        )
    encoder.load_state_dict(incoming, strict=True)


def _torchvision_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    renamed = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        renamed[key] = value
    return renamed
