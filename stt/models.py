"""ResNet-18/50 encoders returning the feature pyramid {res3, res4, res5} at a chosen stride, and MAST's encoder.

The trunk is torchvision's own ResNet (random init); presets change conv strides, the stem pool and the padding,
so every layout has the same parameters and key names as torchvision and one state dict loads into all of them
(ImageNet weights, the spatial-stage teacher, the temporal student, VFS's and CRW's releases).

Output strides (input H x W gives a map of ceil(H / stride) x ceil(W / stride)):

    model.stride preset         stem pool     layer strides  padding  res3  res4  res5
    8   (temporal student)      none          1, 2, 2, 2*    zeros     4     8     32
    4   (temporal student)      3x3 s2 mean   1, 1, 1, 2*    zeros     4     4     32
    8-maxpool (VFS)             3x3 s2 max    1, 2, 1, 2*    zeros     8     8     32
    8-maxpool-reflect (CRW)     3x3 s2 max    1, 2, 1, 2*    reflect   8     8     32
    16  (torchvision / teacher) 3x3 s2 max    1, 2, 2, 2     zeros     8     16    32

Both student layouts are the STT authors' (configs/test/res18_d8.py: strides (1, 2, 2, 1), no pool;
res18_d4.py: strides (1, 1, 1, 1), `pool_type='mean'`, nn.AvgPool2d(3, 2, 1) counting the padding):
at stride 4 every layer runs at 1/4 of the input, so layer1 costs a quarter of what it costs in
the stride-8 layout and layer2 never downsamples.

The two max-pool layouts are the trunks VFS and CRW evaluate DAVIS with; res4 (layer3's output, the level both
propagate from) is at 1/8 like preset 8's, but it is reached through torchvision's stem and an undownsampled
layer3, so preset 8 computes other features from the same weights:
* VFS (xvjiarui/VFS): tools/test.py lines 129-132 build the test model with `backbone.strides = test_cfg.strides`
  and `out_indices = test_cfg.out_indices`; configs/r18_nc_sgd_cos_100e_r2_1xNx8_k400.py lines 31-32 (and the
  r50 config) set strides (1, 2, 1, 1), out_indices (2,); mmaction/models/backbones/resnet.py line 435 keeps
  the stem nn.MaxPool2d(3, 2, 1), and `make_res_layer` puts a layer's stride on its first block's 3x3 conv
  (conv2 in a Bottleneck) and its shortcut, as torchvision does. mmcv's ConvModule pads with zeros.
* CRW (ajabri/videowalk): code/resnet.py `modify` (lines 20-37) sets every conv of layer3 and layer4 to stride 1
  and, for code/utils/__init__.py `make_encoder`'s default model type 'scratch' (line 291,
  `net.modify(padding='reflect')`), pads every conv with padding > 0 by reflection; code/utils/arguments.py
  test_args (lines 45, 49) evaluate that model type with layer4 removed, so the features are layer3's; the
  stem max-pool is torchvision's.
Neither uses layer4 when it propagates; here it keeps the rule below so res5 stays at stride 32 in every layout.

* res5 must sit at stride 32 in every layout, so that the student's res5 grid matches the frozen
  teacher's for global correlation distillation (DESIGN.md: 8x8 at 256x256). The student therefore
  average-pools res4 down to stride 16 before layer4, whose own first block keeps its standard
  stride 2. Why this rather than the authors' stride-4 first block in layer4: a 3x3 conv with
  stride 4 never reads a quarter of its input rows and columns (and stride 8, needed by the
  stride-4 layout, reads fewer than half), while the pool averages every position; layer4 then
  sees features at the stride its ImageNet/spatial-stage weights were trained at, and costs
  exactly what it costs in the standard ResNet. The pool uses ceil_mode so that its output size is
  ceil(h / k), like every strided conv here: student and teacher res5 agree at every input size.

MAST (model.arch=mast-resnet18, zlai0/MAST) is not a torchvision ResNet: models/submodule.py `ResNet18`
(lines 33-63; its blocks, `ResidualBlock`, lines 9-30) has no stem pool, layer3 and layer4 at stride 1 with
256 channels each, and a 1x1 shortcut only where a block changes stride or width; models/mast.py (lines 19-20,
32-33) propagates from `post_convolution(feature_extraction(x))`, a 3x3 conv (256 -> 64, with bias) on layer4's
output. `MastEncoder` is that network under MAST's own module names (so a release loads key for key): res3 is
layer2's output (128 channels) and res4 the post-convolution's (64 channels), both at stride 4. It has no res5,
no teacher layout and no spatial stage: it evaluates MAST releases (or a random MAST trunk) and does not train.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import get_args

import torch
import torchvision
from torch import Tensor, nn

from stt.config import Arch, Level, ModelConfig, Stride

LEVELS = get_args(Level)
# model.stride presets (stt.config.Stride): a student's res4 stride, or a published trunk by name: VFS's DAVIS
# trunk (module doc) and CRW's (VFS's, padded by reflection)
STRIDES = get_args(Stride)
VFS_STRIDE, CRW_STRIDE = STRIDES[2:]
TEACHER_RES4_STRIDE = 16  # the torchvision-standard trunk

TORCHVISION_ARCHS = {"resnet18": torchvision.models.resnet18, "resnet50": torchvision.models.resnet50}
ARCHS = get_args(Arch)  # model.arch choices: the torchvision trunks, then MAST's encoder
MAST_ARCH = ARCHS[-1]
MAST_STRIDE = 4  # MAST never downsamples past 1/4
_RES3_CHANNELS = {"resnet18": 128, "resnet50": 512}
# DistributedDataParallel and torch.compile wrap a model and prefix its keys; a saved wrapped
# model still holds plain encoder weights.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_CLASSIFIER_PREFIX = "fc."


@dataclass(frozen=True)
class Layout:
    """How a preset runs torchvision's trunk: the stem pool, which of layer2/layer3 keep their stride 2, padding."""

    stem_pool: str  # none | mean | max
    layer2_downsamples: bool
    layer3_downsamples: bool
    padding_mode: str = "zeros"

    @property
    def res3_stride(self) -> int:
        return 2 * (1 if self.stem_pool == "none" else 2) * (2 if self.layer2_downsamples else 1)

    @property
    def res4_stride(self) -> int:
        return self.res3_stride * (2 if self.layer3_downsamples else 1)

    @property
    def strides(self) -> dict[str, int]:
        """{level: output stride}; res5 is at 1/32 in every layout (the pool before layer4 sees to it)."""
        return {"res3": self.res3_stride, "res4": self.res4_stride, "res5": 32}


LAYOUTS = {
    8: Layout("none", True, True),
    4: Layout("mean", False, False),
    VFS_STRIDE: Layout("max", True, False),
    CRW_STRIDE: Layout("max", True, False, "reflect"),
    TEACHER_RES4_STRIDE: Layout("max", True, True),
}


class Encoder(nn.Module):
    """A torchvision ResNet trunk with res3/res4/res5 at the strides of one layout (see module doc).

    forward(x: B x 3 x H x W, layers) -> {name: B x C x ceil(H/s) x ceil(W/s)} for the names in
    `layers`; only the trunk up to the deepest requested level runs.
    """

    def __init__(self, arch: str = "resnet18", stride: int | str = 8, frozen: bool = False):
        super().__init__()
        if arch == MAST_ARCH:
            raise ValueError(
                f"model.arch={MAST_ARCH}: MAST's trunk has no torchvision layout (no stride-16 teacher, "
                "no spatial or VFS stage); it evaluates MAST releases only (stt.models.MastEncoder)"
            )
        if arch not in TORCHVISION_ARCHS:
            raise ValueError(f"model.arch: expected one of {sorted(ARCHS)}, got {arch!r}")
        if stride not in LAYOUTS:
            raise ValueError(f"model.stride: expected one of {list(LAYOUTS)}, got {stride!r}")
        layout = LAYOUTS[stride]
        trunk = TORCHVISION_ARCHS[arch](weights=None)
        self.arch = arch
        self.frozen = frozen
        self.conv1, self.bn1, self.relu = trunk.conv1, trunk.bn1, trunk.relu
        self.layer1, self.layer2, self.layer3, self.layer4 = trunk.layer1, trunk.layer2, trunk.layer3, trunk.layer4
        self.maxpool = {
            "max": trunk.maxpool,
            "none": nn.Identity(),
            # the authors' res18_d4: nn.AvgPool2d(3, 2, 1), padding counted
            "mean": nn.AvgPool2d(kernel_size=3, stride=2, padding=1),
        }[layout.stem_pool]
        if not layout.layer2_downsamples:
            _remove_downsampling(self.layer2)
        if not layout.layer3_downsamples:
            _remove_downsampling(self.layer3)
        if layout.padding_mode != "zeros":
            for module in self.modules():
                if isinstance(module, nn.Conv2d) and any(module.padding):  # CRW's `modify`: sum(m.padding) > 0
                    module.padding_mode = layout.padding_mode
        res4_to_16 = TEACHER_RES4_STRIDE // layout.res4_stride
        self.res5_pool = nn.AvgPool2d(res4_to_16, ceil_mode=True) if res4_to_16 > 1 else nn.Identity()

        res3_channels = _RES3_CHANNELS[arch]
        self.out_channels = {"res3": res3_channels, "res4": 2 * res3_channels, "res5": 4 * res3_channels}
        self.strides = layout.strides

    def forward(self, x: Tensor, layers: Sequence[str] = LEVELS) -> dict[str, Tensor]:
        deepest = _deepest(layers, LEVELS, self.arch)
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


def _deepest(layers: Sequence[str], levels: tuple[str, ...], arch: str) -> int:
    """Index in `levels` of the deepest requested level; ValueError for an empty or unknown request."""
    unknown = [name for name in layers if name not in levels]
    if unknown or not layers:
        raise ValueError(f"layers: expected a non-empty subset of {levels} ({arch}), got {tuple(layers)!r}")
    return max(levels.index(name) for name in layers)


def _remove_downsampling(layer: nn.Sequential) -> None:
    """Set every stride-2 conv of the layer's first block (main path and shortcut) to stride 1."""
    for module in layer[0].modules():
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)


# ------------------------------------------------------------------------------------------- MAST
class MastBlock(nn.Module):
    """MAST's ResidualBlock: relu(left(x) + shortcut(x)), `left` = 3x3 conv (stride), BN, ReLU, 3x3 conv, BN;
    `shortcut` = 1x1 conv (stride) + BN where the block changes stride or width, else the identity (an empty
    nn.Sequential, as MAST's: no keys)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.left = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.left(x) + self.shortcut(x))


class MastTrunk(nn.Module):
    """MAST's ResNet18(in_ch=3): a 7x7 stride-2 stem (conv, BN, ReLU; no pool), then four layers of two blocks,
    (64, 1), (128, 2), (256, 1), (256, 1) as (width, first-block stride)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        widths = 64
        for index, (width, stride) in enumerate(((64, 1), (128, 2), (256, 1), (256, 1)), start=1):
            setattr(self, f"layer{index}", nn.Sequential(MastBlock(widths, width, stride), MastBlock(width, width, 1)))
            widths = width


class MastEncoder(nn.Module):
    """MAST's feature network (models/mast.py): res3 = layer2's output (128 channels), res4 =
    post_convolution(layer4(layer3(res3))) (64 channels, what MAST propagates from), both at stride 4.

    forward(x: B x 3 x H x W (normalised Lab), layers) -> {name: B x C x ceil(H/4) x ceil(W/4)}.
    """

    levels = ("res3", "res4")
    STRIDES = {"res3": MAST_STRIDE, "res4": MAST_STRIDE}

    def __init__(self):
        super().__init__()
        self.arch = MAST_ARCH
        self.feature_extraction = MastTrunk()
        self.post_convolution = nn.Conv2d(256, 64, 3, 1, 1)
        self.out_channels = {"res3": 128, "res4": 64}
        self.strides = dict(self.STRIDES)

    def forward(self, x: Tensor, layers: Sequence[str] = levels) -> dict[str, Tensor]:
        if "res5" in layers:
            raise ValueError(
                f"layers: {MAST_ARCH} has no res5 (MAST never downsamples past 1/4); use res4, "
                "the level MAST propagates from, or res3"
            )
        deepest = _deepest(layers, self.levels, self.arch)
        trunk = self.feature_extraction
        features = {"res3": trunk.layer2(trunk.layer1(trunk.conv1(x)))}
        if deepest >= 1:
            features["res4"] = self.post_convolution(trunk.layer4(trunk.layer3(features["res3"])))
        return {name: features[name] for name in layers}


# ------------------------------------------------------------------------------------------- building, weights
def feature_stride(cfg: ModelConfig, layer: str) -> int:
    """The output stride of `layer` under `cfg`'s arch and preset, without building the network (the grid the
    evaluator propagates on, e.g. the Lab-pixel yardstick's pooling beside a trained model)."""
    if cfg.arch == MAST_ARCH:
        if layer not in MastEncoder.STRIDES:
            raise ValueError(f"eval.layer: {MAST_ARCH} has no {layer} (MAST never downsamples past 1/4)")
        return MastEncoder.STRIDES[layer]
    return LAYOUTS[cfg.stride].strides[layer]


def build_encoder(cfg: ModelConfig) -> Encoder | MastEncoder:
    """The encoder of `cfg` (a student stride preset, or MAST's at stride 4), with weights from `cfg.weights`."""
    if cfg.arch == MAST_ARCH:
        if cfg.stride != MAST_STRIDE:
            raise ValueError(
                f"model.stride: {MAST_ARCH} runs at stride {MAST_STRIDE} only (its res4 is at 1/4), "
                f"got {cfg.stride!r}; set model.stride={MAST_STRIDE}"
            )
        encoder = MastEncoder()
    else:
        if cfg.stride not in STRIDES:
            raise ValueError(f"model.stride: expected one of {list(STRIDES)}, got {cfg.stride!r}")
        encoder = Encoder(cfg.arch, cfg.stride)
    if cfg.weights != "random":
        load_encoder_weights(encoder, load_state_dict_file(cfg.weights), f"model.weights {cfg.weights}")
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
        raise FileNotFoundError(
            f"model.weights: no file at {path!r} (expected 'random' or a local state dict)"
        ) from None
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(
            f"{path}: expected a state dict (a mapping of names to tensors), got {type(state_dict).__name__}"
        )
    return dict(state_dict)


def encoder_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The encoder's weights under torchvision key names, unwrapping DDP and torch.compile."""
    return _torchvision_keys(model.state_dict())


def load_encoder_weights(encoder: Encoder | MastEncoder, state_dict: Mapping[str, Tensor], source: str = "") -> None:
    """Load the encoder's own key names (torchvision's, or MAST's) into any layout; a classifier (fc.*) is dropped.

    Strict otherwise: raises ValueError (naming `source`, the file the weights came from) with how many keys are
    missing or unexpected and how many shapes differ, and the first five of each, so an architecture mix-up
    (ResNet-18 weights into a ResNet-50) or a half-written file is reported plainly on one line.
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
        problems = [
            f"{len(found)} {what} {_first_five(found)}"
            for what, found in (
                ("missing keys", missing),
                ("unexpected keys", unexpected),
                ("shape mismatches (given vs expected)", mismatched),
            )
            if found
        ]
        raise ValueError(
            f"{source + ': ' if source else ''}weights do not fit a {encoder.arch} encoder "
            f"({len(expected)} tensors): {', '.join(problems)}"
        )
    encoder.load_state_dict(incoming, strict=True)


def _first_five(names: list[str]) -> str:
    """At most five names, and how many more: a half-empty checkpoint listed all 120 on one line."""
    more = f", ... {len(names) - 5} more" if len(names) > 5 else ""
    return "[" + ", ".join(names[:5]) + more + "]"


def _torchvision_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    renamed = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        renamed[key] = value
    return renamed
