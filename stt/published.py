"""Published checkpoints of other projects, mapped onto stt's encoder (stt.models.Encoder).

`--checkpoint` (stt.evaluate, the sweep) and training's `--init` accept, besides stt's own checkpoints,
the files people download from the releases below. `load_published` recognises the file, renames its
trunk weights to our encoder's key names (torchvision's; MAST's own for MAST) and says which encoder settings
(ModelConfig fields `arch`, `stride`, `input_space`) reproduce the trunk and input its authors evaluated with.

    format (detect_format)  file                                trunk keys -> ours                 arch    stride  input
    ----------------------  ----------------------------------  ---------------------------------  ------  ------  -----
    stt-authors             Spa-then-Temp release (Google       state_dict / backbone.* (mmcv      18, 50  8 or 4  lab
                            Drive) res18_d8 / res18_d4 / ...    ConvModule names, see _mmcv_key)           (a)
    vfs                     VFS v0.1-rc1 release, e.g.          state_dict / torchvision names     18, 50  8-max-  rgb
                            r18_nc_sgd_cos_100e_r2_1xNx8_k400-  (convert_to_pretrained's output),          pool
                            db1a4c0d.pth                        or a training checkpoint's                 (b)
                                                                backbone.* (mmcv names)
    crw                     videowalk pretrained.pth            model / encoder.model.* (torch-    18      8-max-  rgb
                                                                vision names; legacy convN.1.*)            pool-
                                                                                                           reflect
                                                                                                           (b)
    mast                    MAST checkpoint (Google Drive)      state_dict / feature_extraction.*  mast-   4       lab
                                                                and post_convolution.* (MAST's     resnet  (c)
                                                                names, kept: models.MastEncoder)   18
    torchvision-imagenet    torchvision ResNet-18/50 ImageNet   bare torchvision names, fc.*       18, 50  kept    rgb
                            state dict (resnet18-f37072fd.pth)  dropped
    torchvision             a bare trunk state dict (no fc)     bare torchvision names             18, 50  kept    kept
    stt-checkpoint          stt.train's own {"model", "config"} model (already ours)               its config

    "kept": the caller's ModelConfig value stays. Every format also drops wrapper prefixes (module.,
    _orig_mod.) and fills a missing BatchNorm `num_batches_tracked` (old torch files lack it; it is
    unused in eval mode) with 0. `load_published` says in one line which format, arch, preset and input
    it chose.

(a) The stride is not in the weights: the authors' test configs choose it (configs/test/res18_d8.py:
    backbone strides (1, 2, 2, 1), pool_type='none' -> our preset 8; res18_d4.py: strides (1, 1, 1, 1),
    pool_type='mean' -> our preset 4, see stt/models.py). It is read from the training config that mmcv
    stores in `meta["config"]` (the student `backbone=dict(...)`: pool_type 'mean' with layer2 stride 1
    -> 4, 'none' with layer2 stride 2 -> 8), else from the file name (`_d4` / `_d8`, as in the authors'
    README `ckpt/res18_d8_temp.pth`), else the caller's model.stride stays (default 8; pass
    model.stride=4 for a stride-4 release).
(b) The trunk each project evaluates DAVIS with (stt/models.py says where in their code): torchvision's
    max-pool stem, layer2 downsampling, layer3 at stride 1, res4 = layer3 at 1/8; CRW's also pads by
    reflection. The released VFS files are the backbone alone under torchvision names: VFS's README tells
    users to run tools/convert_weights/convert_to_pretrained.py ({"state_dict": torchvision names,
    "meta": {}}) before testing, and its inference commands pass the release URL straight to tools/test.py,
    whose ResNet.init_weights reads it with `_load_torchvision_checkpoint` (torchvision names). Such a file
    says nothing about its project, so it is told by its release name (`*_k400*`, `*sgd_cos*`); renamed, it
    loads as a plain torchvision trunk and keeps the caller's stride and input. A training checkpoint (mmcv
    names, `img_head`, mmaction meta) is recognised by its contents.
(c) MAST's network exactly (stt/models.py MastEncoder): res4 is `post_convolution(feature_extraction(x))`,
    64 channels at 1/4. Input: functional/feeder/dataset/DavisLoaderLab.py reads BGR with OpenCV, scales to
    [0, 1], converts with cv2.COLOR_BGR2Lab (float: sRGB gamma, D65, L in [0, 100]) and normalises with
    mean (50, 0, 0), std (50, 127, 127): stt's `lab` input (stt.color, skimage's conversion; OpenCV's D65
    white differs in the fifth decimal).

Sources read for each format (public repositories, via the project's code search):
- stt-authors: qianduoduolr/Spa-then-Temp vcl/models/backbones/resnet.py (ConvModule stem `conv1`, blocks
  `conv1`/`conv2`(/`conv3`), shortcut `downsample` = ConvModule; `pool_type` none/mean/max),
  vcl/models/trackers/framework.py (training model: `backbone`, teacher `backbone_t`),
  vcl/models/trackers/vanilla_tracker.py (test model: `backbone`, buffer `iteration`), configs/test/
  res18_d4.py, res18_d8.py, res50_d4.py, res50_d8.py, base_data.py (Lab input, mean (50, 0, 0), std
  (50, 127, 127), = stt.color.normalize_lab), configs/train/train.py, tools/train.py (meta config=cfg.text),
  vcl/core/runner/epoch_based_runner.py (mmcv save_checkpoint: {"meta", "state_dict", "optimizer"});
  open-mmlab/mmcv mmcv/cnn/bricks/conv_module.py and norm.py (ConvModule children `conv` and `bn`, the
  abbreviation of every _BatchNorm, SyncBN included).
- vfs: xvjiarui/VFS mmaction/models/backbones/resnet.py (same ConvModule layout; `_load_torchvision_checkpoint`
  spells out the renaming used here), mmaction/models/trackers/sim_siam_base_tracker.py, trackers/base.py
  (`backbone`, `img_head`, buffer `iteration`), mmaction/models/heads/sim_siam_head.py (`projection_fcs`,
  `predictor_fcs`), configs/r18_nc_sgd_cos_100e_r2_1xNx8_k400.py and r50_nc_sgd_cos_100e_r5_1xNx2_k400.py
  (RGB, mean (123.675, 116.28, 103.53), std (58.395, 57.12, 57.375): ImageNet's; test strides (1, 2, 1, 1),
  out_indices (2,)), tools/train.py (meta mmaction_version, config), tools/publish_model.py (drops the
  optimizer), tools/convert_weights/convert_to_pretrained.py (backbone.* -> torchvision names), tools/test.py
  (test strides and out_indices; backbone.pretrained = the checkpoint), README.md (release file names,
  "convert the pretrained checkpoint" before inference, inference commands).
- crw: ajabri/videowalk code/model.py (CRW: `encoder` = utils.From3D(resnet) -> `encoder.model.*`, head
  `selfsim_fc`), code/resnet.py (torchvision ResNet subclass; fc/avgpool removed), code/utils/__init__.py
  (make_encoder, From3D), code/train.py (checkpoint {"model", "optimizer", "lr_scheduler", "epoch",
  "args": argparse.Namespace}), code/test.py (legacy `conv1.1.weight` / `conv2.1.weight` renaming),
  code/data/vos.py (RGB, ImageNet mean/std at test time); the `encoder.model.` prefix inside ckpt["model"]
  is confirmed by a third-party loader of the same file (Zhongdao/UniTrack model/model.py, model_type 'crw').
- mast: zlai0/MAST models/mast.py (`feature_extraction` = submodule.ResNet18(3), `post_convolution`; the
  Colorizer has no weights), models/submodule.py (ResNet18, ResidualBlock `left` / `shortcut`), main.py
  (checkpoint {"epoch", "state_dict": model.module.state_dict(), "optimizer"}), benchmark.py (loads
  checkpoint["state_dict"] strictly into an unwrapped MAST), functional/feeder/dataset/DavisLoaderLab.py (Lab).
- torchvision: torchvision.models.resnet18/resnet50 state_dict(); stt/models.py load_encoder_weights.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stt.checkpoint import check_finite, is_stt_checkpoint
from stt.checkpoint import read as read_checkpoint
from stt.models import CRW_STRIDE, MAST_ARCH, MAST_STRIDE, VFS_STRIDE, Encoder, MastEncoder

SHOWN_KEYS = 5  # keys named in an error message
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Per format: where the trunk lives, and the prefixes of the other weights a release carries (heads,
# a teacher) that are dropped on purpose. Any other key is reported as unexpected.
_MMCV_TRUNK = "backbone."
_MMCV_DROPPED = ("backbone_t.", "img_head.", "iteration")  # STT teacher; VFS SimSiam head; trackers' step buffer
_CRW_TRUNK = "encoder.model."
_CRW_DROPPED = ("selfsim_fc.",)  # CRW's node-embedding head (code/model.py make_head)
_MAST_PREFIXES = ("feature_extraction.", "post_convolution.")  # MAST models/mast.py: every weight it has
# (stem pool_type, layer2 stride) of the authors' student backbone -> our preset: d4 (configs/test/res18_d4.py:
# mean pool, strides (1, 1, 1, 1)) and d8 (res18_d8.py and configs/train/train.py: no pool, strides (1, 2, 2, *)).
_STRIDE_FROM_LAYOUT = {("mean", 1): 4, ("none", 2): 8}


# ------------------------------------------------------------------------------------------- detection
def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _tensor_dict(value: Any) -> dict[str, Tensor] | None:
    """`value` as {key without wrapper prefixes: tensor} if it is a non-empty mapping of tensors, else None."""
    if not isinstance(value, Mapping) or not value:
        return None
    if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in value.items()):
        return None
    return {_strip_wrappers(k): v for k, v in value.items()}


def _config_text(state: Any) -> str:
    """The training config mmcv/mmaction keep in `meta["config"]` ('' when absent)."""
    meta = state.get("meta") if isinstance(state, Mapping) else None
    text = meta.get("config") if isinstance(meta, Mapping) else None
    return text if isinstance(text, str) else ""


def _weights(state: Any) -> dict[str, Tensor] | None:
    """The model weights of any known container: mmcv {"state_dict"}, CRW {"model"}, or a bare state dict."""
    if not isinstance(state, Mapping):
        return None
    for container in ("state_dict", "model"):
        inner = _tensor_dict(state.get(container))
        if inner is not None:
            return inner
    return _tensor_dict(state)


def detect_format(state: Any, name: str | None = None) -> str:
    """The format of a loaded checkpoint (see the module table); `name` (the file name) breaks ties.

    Returns one of "stt-checkpoint", "stt-authors", "vfs", "crw", "mast", "torchvision-imagenet",
    "torchvision", "mmcv-resnet" (an mmcv `backbone.` ResNet whose project cannot be told: neither its
    heads nor its stored config nor its file name say STT or VFS) or "unknown".
    """
    if isinstance(state, Mapping) and "model" in state and "config" in state:
        return "stt-checkpoint"
    weights = _weights(state)
    if weights is None:
        return "unknown"
    keys = weights.keys()
    if any(k.startswith(_MAST_PREFIXES[0]) for k in keys):
        return "mast"
    if any(k.startswith(_CRW_TRUNK) for k in keys):
        return "crw"
    if any(k.startswith(_MMCV_TRUNK) for k in keys):
        return _mmcv_project(state, keys, name)
    if "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        if _is_vfs_release_name(name):  # the release itself: convert_to_pretrained's torchvision names (note b)
            return "vfs"
        fc = weights.get("fc.weight")
        return "torchvision-imagenet" if fc is not None and fc.shape[0] == 1000 else "torchvision"
    return "unknown"


def _mmcv_project(state: Any, keys, name: str | None) -> str:
    """STT authors' or VFS's release: heads first, then the stored training config, then the file name."""
    if any(k.startswith("img_head.") for k in keys):
        return "vfs"  # SimSiamHead (VFS configs: img_head=dict(type='SimSiamHead', ...))
    if any(k.startswith("backbone_t.") for k in keys):
        return "stt-authors"  # Framework's frozen teacher (Spa-then-Temp framework.py)
    config = _config_text(state)
    meta = state.get("meta") if isinstance(state, Mapping) else None
    if "SimSiam" in config or (isinstance(meta, Mapping) and "mmaction_version" in meta):
        return "vfs"
    if "backbone_t" in config or "img_norm_cfg_lab" in config or "RGB2LAB" in config:
        return "stt-authors"
    if name and re.search(r"res(18|50)_d[48]", Path(name).name.lower()):
        return "stt-authors"
    if _is_vfs_release_name(name):
        return "vfs"
    return "mmcv-resnet"


def _is_vfs_release_name(name: str | None) -> bool:
    """VFS's release names (README: r18_nc_sgd_cos_100e_r2_1xNx8_k400-db1a4c0d.pth, r50_..._k400-d7ce3ad0.pth)."""
    base = Path(name).name.lower() if name else ""
    return "k400" in base or "sgd_cos" in base


# ------------------------------------------------------------------------------------------- key mapping
_MMCV_MODULE = re.compile(r"((?:layer\d+\.\d+\.)?)(conv\d|downsample)\.(conv|bn)\.(\w+)")


def _mmcv_key(key: str) -> str | None:
    """An mmcv ResNet key (ConvModule names) -> torchvision's, as the backbones' `_load_torchvision_checkpoint`:

    conv1.conv.weight -> conv1.weight; conv1.bn.X -> bn1.X; layerL.B.convN.conv.weight -> layerL.B.convN.weight;
    layerL.B.convN.bn.X -> layerL.B.bnN.X; layerL.B.downsample.conv.weight -> layerL.B.downsample.0.weight;
    layerL.B.downsample.bn.X -> layerL.B.downsample.1.X. None for a key outside that scheme.
    """
    match = _MMCV_MODULE.fullmatch(key)
    if match is None:
        return None
    block, module, part, leaf = match.groups()
    if module == "downsample":
        return f"{block}downsample.{0 if part == 'conv' else 1}.{leaf}"
    return f"{block}{'conv' if part == 'conv' else 'bn'}{module[4:]}.{leaf}"


def _crw_key(key: str) -> str:
    """CRW keys are torchvision's; an older CRW wrapped block convs as (padding, conv): convN.1.weight."""
    return re.sub(r"(conv[12])\.1\.weight$", r"\1.weight", key)


def _split(weights: Mapping[str, Tensor], trunk: str, dropped: tuple[str, ...]) -> tuple[dict, list[str]]:
    """(trunk weights without the `trunk` prefix, keys that are neither trunk nor dropped on purpose)."""
    inside, stray = {}, []
    for key, value in weights.items():
        if key.startswith(trunk):
            inside[key[len(trunk) :]] = value
        elif not key.startswith(dropped):
            stray.append(key)
    return inside, stray


# ------------------------------------------------------------------------------------------- checks
def _arch(trunk: Mapping[str, Tensor]) -> str | None:
    """resnet18 or resnet50 from the block structure (blocks per layer, bottleneck or not); None otherwise."""
    blocks = []
    for layer in range(1, 5):
        indices = {int(k.split(".")[1]) for k in trunk if k.startswith(f"layer{layer}.") and k.split(".")[1].isdigit()}
        blocks.append(max(indices) + 1 if indices else 0)
    bottleneck = any(k.endswith(".conv3.weight") for k in trunk)
    if blocks == [2, 2, 2, 2] and not bottleneck:
        return "resnet18"
    if blocks == [3, 4, 6, 3] and bottleneck:
        return "resnet50"
    return None


def _expected(arch: str) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        encoder = MastEncoder() if arch == MAST_ARCH else Encoder(arch, 16)
        return {k: v.shape for k, v in encoder.state_dict().items()}


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return f"[{shown}{f', ... +{len(keys) - SHOWN_KEYS} more' if len(keys) > SHOWN_KEYS else ''}]"


def _fail(name: str, guess: str, problem: str) -> ValueError:
    return ValueError(f"{name}: cannot load as {guess} weights: {problem}".replace("\n", " "))


def _checked(trunk: dict[str, Tensor], stray: list[str], name: str, guess: str) -> tuple[str, dict[str, Tensor]]:
    """(arch, trunk) once every key and shape fits an stt Encoder (ResNet-18/50); else one-line ValueError."""
    trunk = {k: v for k, v in trunk.items() if not k.startswith("fc.")}  # a classifier is never part of the encoder
    arch = _arch(trunk)
    if arch is None:
        raise _fail(
            name,
            guess,
            "the trunk is neither a ResNet-18 nor a ResNet-50 (the encoder's archs); "
            f"its keys start {_listed(sorted(trunk))}",
        )
    return arch, _fitted(trunk, stray, arch, name, guess)


def _fitted(trunk: dict[str, Tensor], stray: list[str], arch: str, name: str, guess: str) -> dict[str, Tensor]:
    """`trunk` in the key order of `arch`'s encoder once every key and shape fits; else one-line ValueError
    naming up to SHOWN_KEYS missing, unexpected (`stray` included) and mismatched keys."""
    expected = _expected(arch)
    trunk = dict(trunk)
    for key in expected:  # files from old torch have no num_batches_tracked; eval mode never reads it
        if (
            key.endswith("num_batches_tracked")
            and key not in trunk
            and key.rsplit(".", 1)[0] + ".running_mean" in trunk
        ):
            trunk[key] = torch.tensor(0, dtype=torch.long)
    missing = sorted(expected.keys() - trunk.keys())
    unexpected = sorted(trunk.keys() - expected.keys()) + sorted(stray)
    mismatched = [
        f"{k} {tuple(trunk[k].shape)} vs {tuple(expected[k])}"
        for k in sorted(expected.keys() & trunk.keys())
        if trunk[k].shape != expected[k]
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys {_listed(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_listed(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches (file vs {arch}) {_listed(mismatched)}")
        raise _fail(name, guess, f"{arch} trunk: " + "; ".join(problems))
    return {k: trunk[k] for k in expected}


def _authors_stride(state: Any, name: str | None) -> int | None:
    """The STT authors' layout: the stored training config's student backbone, else the file name."""
    config = _config_text(state)
    start = config.find("backbone=dict(")
    if start >= 0:
        depth, end = 0, start + len("backbone=dict")
        for end in range(start + len("backbone=dict"), len(config)):  # the matching parenthesis of dict(
            depth += {"(": 1, ")": -1}.get(config[end], 0)
            if depth == 0:
                break
        backbone = config[start : end + 1]
        pool = re.search(r"pool_type\s*=\s*['\"](\w+)['\"]", backbone)
        strides = re.search(r"strides\s*=\s*\(\s*(\d+)\s*,\s*(\d+)", backbone)
        layer2_stride = int(strides.group(2)) if strides else None
        if pool and (pool.group(1), layer2_stride) in _STRIDE_FROM_LAYOUT:
            return _STRIDE_FROM_LAYOUT[pool.group(1), layer2_stride]
    match = re.search(r"(?:^|[^a-z0-9])d([48])(?:[^0-9]|$)", Path(name).name.lower()) if name else None
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------------- loading
def load_published(
    path_or_state: str | os.PathLike | Mapping, name: str | None = None
) -> tuple[dict, dict[str, Tensor]]:
    """(model_overrides, encoder_state_dict) of a published checkpoint (a path, or what torch.load returned).

    model_overrides: ModelConfig fields the file determines (`arch` always; `stride` and `input_space`
    where the format fixes them, see the module table); apply them over the caller's config.
    encoder_state_dict: the trunk under the encoder's key names (stt.models.Encoder's, or MastEncoder's for
    MAST), every key present, no classifier.
    `name` names the file in messages and breaks format ties (default: the path). A published release's
    choice is said in one line on stdout (`stt: FILE: FORMAT weights -> model.arch=... ...`).
    Raises ValueError, one line naming the file, the format guessed and up to 5 missing / unexpected keys,
    for an unknown or ambiguous format or weights that do not fit.
    """
    if isinstance(path_or_state, (str, os.PathLike)):
        name = name or str(path_or_state)
        state = read_checkpoint(path_or_state, name)
    else:
        state = path_or_state
    name = name or "checkpoint"
    guess = detect_format(state, name)
    overrides, trunk = _mapped(state, name, guess)
    if guess != "stt-checkpoint":
        print(f"stt: {name}: {describe(guess, overrides)}")
    return overrides, trunk


_WHY = {  # why a format sets the preset it sets (module table notes)
    "vfs": "VFS's DAVIS test trunk: max-pool stem, layer3 at stride 1 (configs/*_k400.py test_cfg)",
    "crw": "CRW's DAVIS test trunk: max-pool stem, layer3 at stride 1, reflect padding (code/resnet.py modify)",
    "mast": "MAST's own encoder, res4 = post_convolution at 1/4 (models/mast.py)",
}


def describe(guess: str, overrides: Mapping[str, Any]) -> str:
    """One line: the format and the ModelConfig values it sets, the others kept from the caller's config."""
    fields = " ".join(
        f"model.{k}={overrides[k]}" if k in overrides else f"model.{k} kept" for k in ("arch", "stride", "input_space")
    )
    return f"{guess} weights -> {fields}" + (f" ({_WHY[guess]})" if guess in _WHY else "")


def _mapped(state: Any, name: str, guess: str) -> tuple[dict, dict[str, Tensor]]:
    """load_published for a read checkpoint whose format is `guess`."""
    if guess == "stt-checkpoint":
        model = dict(state["config"].get("model", {})) if isinstance(state["config"], Mapping) else {}
        overrides = {k: model[k] for k in ("arch", "stride", "input_space") if k in model}
        arch, trunk = _checked(dict(_tensor_dict(state["model"]) or {}), [], name, guess)
        return {**overrides, "arch": arch}, trunk
    if guess == "unknown":
        keys = sorted(state.keys()) if isinstance(state, Mapping) else []
        what = f"top-level keys {_listed([str(k) for k in keys])}" if keys else f"a {type(state).__name__}"
        raise _fail(
            name,
            guess,
            f"not a format stt knows (stt, STT authors', VFS, CRW, MAST, torchvision ResNet); it holds {what}",
        )
    if guess == "mmcv-resnet":
        raise _fail(
            name,
            guess,
            "an mmcv backbone.* ResNet with no head, stored config or file name telling the STT "
            "authors' release (Lab input) from VFS's (RGB); keep the release's file name (res18_d8*, *_k400*)",
        )

    weights = _weights(state)
    if guess == "mast":  # MAST's own names are the encoder's (stt.models.MastEncoder)
        stray = sorted(k for k in weights if not k.startswith(_MAST_PREFIXES))
        trunk = _fitted(
            {k: v for k, v in weights.items() if k.startswith(_MAST_PREFIXES)}, stray, MAST_ARCH, name, guess
        )
        return {"arch": MAST_ARCH, "stride": MAST_STRIDE, "input_space": "lab"}, trunk
    if guess == "vfs" and not any(k.startswith(_MMCV_TRUNK) for k in weights):  # the release: torchvision names
        arch, trunk = _checked(dict(weights), [], name, guess)
        return {"arch": arch, "stride": VFS_STRIDE, "input_space": "rgb"}, trunk
    if guess in ("stt-authors", "vfs"):
        inside, stray = _split(weights, _MMCV_TRUNK, _MMCV_DROPPED)
        trunk = {}
        for key, value in inside.items():
            mapped = _mmcv_key(key)
            if mapped is None and not key.startswith("fc."):
                stray.append(_MMCV_TRUNK + key)
            elif mapped is not None:
                trunk[mapped] = value
        arch, trunk = _checked(trunk, stray, name, guess)
        if guess == "vfs":
            return {"arch": arch, "stride": VFS_STRIDE, "input_space": "rgb"}, trunk
        stride = _authors_stride(state, name)
        return {"arch": arch, "input_space": "lab", **({"stride": stride} if stride else {})}, trunk
    if guess == "crw":
        inside, stray = _split(weights, _CRW_TRUNK, _CRW_DROPPED)
        arch, trunk = _checked({_crw_key(k): v for k, v in inside.items()}, stray, name, guess)
        return {"arch": arch, "stride": CRW_STRIDE, "input_space": "rgb"}, trunk
    # torchvision / torchvision-imagenet: already our names
    arch, trunk = _checked(dict(weights), [], name, guess)
    return ({"arch": arch, "input_space": "rgb"} if guess == "torchvision-imagenet" else {"arch": arch}), trunk


def init_payload(state: Any, what: str, arch: str) -> dict[str, Any]:
    """Training's `--init` from a published release: {"model": encoder weights}, the part of an stt.train
    payload the stages read (no "fisher": an EWC stage needs stt's own checkpoint). The stage's input space
    and stride are the stage's own; the arch must be the run's and not MAST's (one-line ValueError otherwise)."""
    overrides, weights = load_published(state, name=what)
    if overrides["arch"] == MAST_ARCH:
        raise ValueError(
            f"{what}: a MAST release initialises no stt stage (MAST's encoder has no torchvision layout "
            "and does not train here); evaluate it with --checkpoint"
        )
    if overrides["arch"] != arch:
        raise ValueError(
            f"{what}: {detect_format(state, what)} weights of a {overrides['arch']}, but model.arch={arch}; "
            f"set model.arch={overrides['arch']}"
        )
    return {"model": weights}


def load_init(source: str | bytes, what: str, arch: str) -> dict[str, Any]:
    """Training's `--init`: an stt.train checkpoint, or a published release as {"model": weights}
    (this module maps a release's keys; the arch must be the run's)."""
    loaded = read_checkpoint(source, what)
    loaded = loaded if is_stt_checkpoint(loaded) else init_payload(loaded, what, arch)
    check_finite(loaded["model"], what)
    return loaded
