"""Published checkpoints (stt.published): each release format, synthesised with its real key names and shapes.

Every file is built from the real architecture (a torchvision ResNet state dict renamed the way each project
names it, plus the heads, buffers and containers those checkpoints carry; see stt/published.py for the source
files read), saved with torch.save and read back the way `--checkpoint` and `--init` read it.
"""

from __future__ import annotations

import argparse
import pickle
import re

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from stt.config import EvalConfig, ModelConfig
from stt.features import FeatureExtractor
from stt.models import CRW_STRIDE, MAST_ARCH, VFS_STRIDE
from stt.published import detect_format, load_published, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomised(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's state dict with every tensor random, so a wrong mapping can never compare equal."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if value.is_floating_point():
            state[key] = torch.randn(value.shape, generator=generator)
        else:
            state[key] = torch.randint(1, 1000, value.shape, generator=generator, dtype=value.dtype)
    return state


def torchvision_trunk(arch: str = "resnet18", seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision ResNet weights (random values) without the classifier: the trunk every release holds."""
    state = randomised(getattr(torchvision.models, arch)(weights=None), seed)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def mmcv_names(trunk: dict[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """torchvision names -> mmcv ConvModule names (Spa-then-Temp / VFS backbones/resnet.py: the stem and every
    block conv is a ConvModule with children `conv` and `bn`; the shortcut `downsample` is one ConvModule)."""
    renamed = {}
    for key, value in trunk.items():
        key = re.sub(r"^conv1\.", "conv1.conv.", key)
        key = re.sub(r"^bn1\.", "conv1.bn.", key)
        key = re.sub(r"\.conv(\d)\.weight$", r".conv\1.conv.weight", key)
        key = re.sub(r"\.bn(\d)\.", r".conv\1.bn.", key)
        key = key.replace(".downsample.0.", ".downsample.conv.").replace(".downsample.1.", ".downsample.bn.")
        renamed[prefix + key] = value
    return renamed


def frames(t: int = 2, h: int = 64, w: int = 96) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def extract(path, layer: str = "res4", **model) -> FeatureExtractor:
    return FeatureExtractor(str(path), ModelConfig(**model), EvalConfig(layer=layer, max_short_side=480))


def assert_same_trunk(mapped: dict, trunk: dict) -> None:
    assert mapped.keys() == trunk.keys()
    for key in trunk:
        assert torch.equal(mapped[key], trunk[key]), key


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------------------- the STT authors'
AUTHORS_TRAIN_CONFIG = """exp_name = 'train'
model = dict(
    type='Framework',
    backbone=dict(type='ResNet',depth=18, strides={strides}, out_indices=(1, 2, 3), pool_type='{pool}', pretrained='/path/to/pretrain'),
    backbone_t=dict(type='ResNet',depth=18, strides=(1, 2, 2, 2), out_indices=(3,),pretrained='/path/to/pretrain'),
    loss=dict(type='MSELoss',reduction='mean'),
)
img_norm_cfg_lab = dict(mean=[50, 0, 0], std=[50, 127, 127], to_bgr=False)
"""  # noqa: E501 (the authors' config lines, verbatim)


def authors_release(trunk, *, pool: str | None = "mean", teacher: bool = True) -> dict:
    """An mmcv save_checkpoint file of the authors' Framework: meta (config text, versions), state_dict with the
    student `backbone.` and the frozen teacher `backbone_t.`, and the optimizer."""
    state_dict = mmcv_names(trunk)
    if teacher:
        state_dict.update(mmcv_names(torchvision_trunk(seed=7), "backbone_t."))
    meta = {"epoch": 800, "iter": 120000, "mmcv_version": "1.3.18", "time": "Mon Mar  6 10:00:00 2023"}
    if pool is not None:
        strides = "(1, 1, 1, 4)" if pool == "mean" else "(1, 2, 2, 4)"  # d4 / d8 (configs/train/train.py: d8)
        meta["config"] = AUTHORS_TRAIN_CONFIG.format(pool=pool, strides=strides)
    return {
        "meta": meta,
        "state_dict": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-5, "params": [0]}]},
    }


def test_authors_stride4_release_maps_every_trunk_weight_and_runs_at_stride_4(tmp_path):
    trunk = torchvision_trunk()
    release = authors_release(trunk, pool="mean")
    for real in (
        "backbone.conv1.conv.weight",
        "backbone.conv1.bn.num_batches_tracked",
        "backbone.layer1.0.conv2.bn.weight",
        "backbone.layer2.0.downsample.conv.weight",
        "backbone.layer2.0.downsample.bn.running_var",
    ):
        assert real in release["state_dict"]
    path = tmp_path / "checkpoint.pth"
    torch.save(release, path)

    assert detect_format(read_checkpoint(path)) == "stt-authors"
    overrides, mapped = load_published(path)
    assert overrides == {"arch": "resnet18", "stride": 4, "input_space": "lab"}
    assert_same_trunk(mapped, trunk)

    extractor = extract(path)
    assert (extractor.model_cfg.stride, extractor.model_cfg.input_space, extractor.stride) == (4, "lab", 4)
    assert torch.equal(extractor.encoder.layer3[1].conv2.weight, trunk["layer3.1.conv2.weight"])
    assert extractor(frames()).shape == (2, 256, 16, 24)


def test_authors_stride8_from_the_stored_config_or_the_file_name(tmp_path):
    trunk = torchvision_trunk()
    overrides, _ = load_published(authors_release(trunk, pool="none"))
    assert overrides["stride"] == 8
    odd = authors_release(trunk, pool="none")  # no pool but layer2 at stride 1: no preset of ours, so none is chosen
    odd["meta"]["config"] = odd["meta"]["config"].replace("strides=(1, 2, 2, 4)", "strides=(1, 1, 2, 4)")
    assert "stride" not in load_published(odd, name="model.pth")[0]
    path = tmp_path / "res18_d8_temp.pth"  # the authors' README name; no teacher, no stored config
    torch.save(authors_release(trunk, pool=None, teacher=False), path)
    extractor = extract(path, stride=4)  # the file name wins over the configured preset
    assert (extractor.model_cfg.stride, extractor.input_space) == (8, "lab")
    assert extractor(frames()).shape == (2, 256, 8, 12)
    # a teacher alone says "the authors'", not the stride: the configured preset stays
    overrides, _ = load_published(authors_release(trunk, pool=None, teacher=True), name="weights.pth")
    assert "stride" not in overrides and overrides["input_space"] == "lab"


# ----------------------------------------------------------------------------------------- VFS
def simsiam_head(channels: int, mid: int, out: int, pred_mid: int) -> nn.Module:
    """VFS heads/sim_siam_head.py with 3 projection fcs (Linear, BN, ReLU, ..., Linear, BN) and 2 predictor fcs."""
    head = nn.Module()
    head.projection_fcs = nn.Sequential(
        nn.Linear(channels, mid),
        nn.BatchNorm1d(mid),
        nn.ReLU(),
        nn.Linear(mid, mid),
        nn.BatchNorm1d(mid),
        nn.ReLU(),
        nn.Linear(mid, out),
        nn.BatchNorm1d(out),
    )
    head.predictor_fcs = nn.Sequential(
        nn.Linear(out, pred_mid), nn.BatchNorm1d(pred_mid), nn.ReLU(), nn.Linear(pred_mid, out)
    )
    return head


def vfs_training_checkpoint(trunk, channels: int, mid: int, pred_mid: int) -> dict:
    """publish_model.py output of a SimSiamBaseTracker: meta, state_dict (backbone., img_head., iteration),
    no optimizer."""
    state_dict = mmcv_names(trunk)
    state_dict.update(
        {f"img_head.{k}": v for k, v in randomised(simsiam_head(channels, mid, mid, pred_mid), 3).items()}
    )
    state_dict["iteration"] = torch.tensor(0.0)
    meta = {
        "mmaction_version": "0.12.0",
        "config": "model = dict(type='SimSiamBaseTracker', backbone=dict(type='ResNet'))",
        "exp_name": "r18_nc_sgd_cos_100e_r2_1xNx8_k400.py",
        "seed": None,
        "epoch": 100,
        "iter": 50000,
    }
    return {"meta": meta, "state_dict": state_dict}


def convert_to_pretrained(checkpoint: dict) -> dict:
    """VFS tools/convert_weights/convert_to_pretrained.py, which its README runs before testing: backbone.* only,
    ConvModule names back to torchvision's (conv1.conv -> conv1, conv1.bn -> bn1, layerL.B.convN.conv -> convN,
    convN.bn -> bnN, downsample.conv/.bn -> downsample.0/.1), saved as {"state_dict": ..., "meta": {}}."""
    state_dict = {}
    for key, value in checkpoint["state_dict"].items():
        if not key.startswith("backbone."):
            continue
        parts = key[len("backbone.") :].split(".")
        if parts[0] == "conv1":
            name = f"{'conv1' if parts[1] == 'conv' else 'bn1'}.{parts[-1]}"
        elif parts[2] == "downsample":
            name = f"{parts[0]}.{parts[1]}.downsample.{0 if parts[3] == 'conv' else 1}.{parts[-1]}"
        else:
            name = f"{parts[0]}.{parts[1]}.{parts[3]}{parts[2][-1]}.{parts[-1]}"
        state_dict[name] = value
    return {"state_dict": state_dict, "meta": {}}


def test_vfs_resnet18_release_runs_on_vfs_trunk(tmp_path, capsys):
    trunk = torchvision_trunk()
    path = tmp_path / "r18_nc_sgd_cos_100e_r2_1xNx8_k400-db1a4c0d.pth"
    release = convert_to_pretrained(vfs_training_checkpoint(trunk, 512, 512, 128))
    assert "layer2.0.downsample.1.num_batches_tracked" in release["state_dict"] and release["meta"] == {}
    torch.save(release, path)
    assert detect_format(read_checkpoint(path), str(path)) == "vfs"
    overrides, mapped = load_published(path)
    assert overrides == {"arch": "resnet18", "stride": VFS_STRIDE, "input_space": "rgb"}
    assert_same_trunk(mapped, trunk)
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and f"{path}: vfs weights -> model.arch=resnet18 model.stride=8-maxpool" in said
    extractor = extract(path, input_space="lab")
    assert (extractor.input_space, extractor.stride, extractor.model_cfg.stride) == ("rgb", 8, VFS_STRIDE)
    assert extractor(frames()).shape == (2, 256, 8, 12)
    renamed = tmp_path / "weights.pth"  # nothing in the file says VFS: a plain trunk, the caller's stride and input
    torch.save(release, renamed)
    assert load_published(renamed)[0] == {"arch": "resnet18"}


def test_vfs_training_checkpoints_of_both_archs():
    trunk = torchvision_trunk()
    checkpoint = vfs_training_checkpoint(trunk, 512, 512, 128)
    assert "img_head.projection_fcs.7.running_mean" in checkpoint["state_dict"]
    overrides, mapped = load_published(checkpoint, name="epoch_100.pth")  # told by its head, not its name
    assert overrides == {"arch": "resnet18", "stride": VFS_STRIDE, "input_space": "rgb"}
    assert_same_trunk(mapped, trunk)
    trunk50 = torchvision_trunk("resnet50")
    name = "r50_nc_sgd_cos_100e_r5_1xNx2_k400-d7ce3ad0.pth"
    for file in (
        vfs_training_checkpoint(trunk50, 2048, 2048, 512),
        convert_to_pretrained(vfs_training_checkpoint(trunk50, 2048, 2048, 512)),
    ):
        overrides, mapped = load_published(file, name=name)
        assert overrides == {"arch": "resnet50", "stride": VFS_STRIDE, "input_space": "rgb"}
        assert_same_trunk(mapped, trunk50)


# ----------------------------------------------------------------------------------------- CRW
def crw_checkpoint(trunk, legacy: bool = False) -> dict:
    """code/train.py's checkpoint: CRW.state_dict() (encoder = From3D(resnet) -> encoder.model.*, head selfsim_fc),
    optimizer, lr_scheduler, epoch and the argparse Namespace."""
    model = {}
    for key, value in trunk.items():
        if legacy:  # the older layout CRW's test.py still renames: block convs as (padding, conv)
            key = re.sub(r"(layer\d\.\d\.conv[12])\.weight$", r"\1.1.weight", key)
        model[f"encoder.model.{key}"] = value
    model["selfsim_fc.0.weight"] = torch.randn(128, 512)
    model["selfsim_fc.0.bias"] = torch.randn(128)
    args = argparse.Namespace(
        model_type="scratch", remove_layers=[], head_depth=0, temp=0.05, dropout=0.1, device="cuda"
    )
    return {
        "model": model,
        "optimizer": {"state": {}, "param_groups": []},
        "lr_scheduler": {"last_epoch": 3},
        "epoch": 3,
        "args": args,
    }


def test_crw_pretrained_pth(tmp_path):
    trunk = torchvision_trunk()
    path = tmp_path / "pretrained.pth"
    torch.save(crw_checkpoint(trunk), path)
    with pytest.raises(
        pickle.UnpicklingError
    ):  # the Namespace: a plain weights-only load refuses it, ours allows that one class
        torch.load(path, weights_only=True)
    assert detect_format(read_checkpoint(path)) == "crw"
    overrides, mapped = load_published(path)
    assert overrides == {"arch": "resnet18", "stride": CRW_STRIDE, "input_space": "rgb"}
    assert_same_trunk(mapped, trunk)
    extractor = extract(path, layer="res3")
    assert extractor.encoder.conv1.padding_mode == "reflect"
    assert extractor(frames()).shape == (2, 128, 8, 12)  # res3 at 1/8 behind the stem max-pool
    _, legacy = load_published(crw_checkpoint(trunk, legacy=True))
    assert_same_trunk(legacy, trunk)


# ----------------------------------------------------------------------------------------- torchvision
def test_torchvision_imagenet_and_old_files_without_num_batches_tracked(tmp_path):
    full = randomised(torchvision.models.resnet18(weights=None), 0)
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save({k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}, path)  # as torch<0.4.1 files
    overrides, mapped = load_published(path)
    assert overrides == {"arch": "resnet18", "input_space": "rgb"}
    assert all(torch.equal(mapped[k], v) for k, v in full.items() if not k.startswith("fc.") and "num_batches" not in k)
    extractor = extract(path, stride=4, input_space="lab")
    assert (extractor.input_space, extractor.stride) == ("rgb", 4)
    trunk_only = {k: v for k, v in full.items() if not k.startswith("fc.")}
    assert load_published(trunk_only)[0] == {"arch": "resnet18"}  # no classifier: nothing says ImageNet's input


# ----------------------------------------------------------------------------------------- MAST
def mast_checkpoint(seed: int = 5) -> dict:
    """MAST main.py's checkpoint ({"epoch", "state_dict": model.module.state_dict(), "optimizer"}) of models/mast.py:
    feature_extraction = submodule.ResNet18(3) (conv1 Sequential, ResidualBlock left/shortcut Sequentials, layer3/
    layer4 at 256 channels, stride 1), post_convolution (256 -> 64, bias); the Colorizer has no weights."""

    def block(cin, cout, stride):
        module = nn.Module()
        module.left = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        module.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            module.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return module

    net = nn.Module()
    net.conv1 = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU())
    channels = 64
    for name, out, stride in (("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 1), ("layer4", 256, 1)):
        setattr(net, name, nn.Sequential(block(channels, out, stride), block(out, out, 1)))
        channels = out
    mast = nn.Module()
    mast.feature_extraction = net
    mast.post_convolution = nn.Conv2d(256, 64, 3, 1, 1)
    return {"epoch": 10, "state_dict": randomised(mast, seed), "optimizer": {"state": {}, "param_groups": []}}


def test_mast_release_loads_key_for_key_onto_mast_encoder(tmp_path, capsys):
    path = tmp_path / "checkpoint_epoch_10.pt"  # main.py's name for what it saves
    release = mast_checkpoint()
    weights = release["state_dict"]
    assert "feature_extraction.layer3.0.shortcut.0.weight" in weights and "post_convolution.bias" in weights
    torch.save(release, path)
    assert detect_format(read_checkpoint(path)) == "mast"
    overrides, mapped = load_published(path)
    assert overrides == {"arch": MAST_ARCH, "stride": 4, "input_space": "lab"}
    assert_same_trunk(mapped, weights)  # every key of the release, none renamed, none left out
    assert "mast weights -> model.arch=mast-resnet18 model.stride=4 model.input_space=lab" in capsys.readouterr().out
    extractor = extract(path, input_space="rgb")
    assert (extractor.input_space, extractor.stride, extractor.model_cfg.arch) == ("lab", 4, MAST_ARCH)
    assert torch.equal(extractor.encoder.post_convolution.weight, weights["post_convolution.weight"])
    assert extractor(frames()).shape == (2, 64, 16, 24)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in weights.items()}}  # saved around nn.DataParallel
    assert_same_trunk(load_published(wrapped, name="mast.pt")[1], weights)


def test_mast_keys_that_do_not_fit_are_named_on_one_line(tmp_path):
    release = mast_checkpoint()
    del release["state_dict"]["post_convolution.bias"]
    release["state_dict"]["colorizer.memory.weight"] = torch.zeros(1)
    path = tmp_path / "mast.pt"
    torch.save(release, path)
    with pytest.raises(ValueError) as excinfo:
        extract(path)
    assert one_line_error(excinfo) == (
        f"{path}: cannot load as mast weights: mast-resnet18 trunk: missing keys "
        "[post_convolution.bias]; unexpected keys [colorizer.memory.weight]"
    )


# ----------------------------------------------------------------------------------------- refusals
def test_missing_unexpected_and_mismatched_keys_are_named_on_one_line(tmp_path):
    trunk = torchvision_trunk()
    release = authors_release(trunk)
    del release["state_dict"]["backbone.layer3.1.conv2.conv.weight"]
    release["state_dict"]["backbone.layer2.0.conv9.conv.weight"] = torch.zeros(1)  # a ConvModule name our trunk lacks
    release["state_dict"]["neck.fc.weight"] = torch.zeros(1)  # outside the trunk, not a head the release carries
    path = tmp_path / "res18_d4.pth"
    torch.save(release, path)
    with pytest.raises(ValueError) as excinfo:
        load_published(path)
    assert one_line_error(excinfo) == (
        f"{path}: cannot load as stt-authors weights: resnet18 trunk: missing keys [layer3.1.conv2.weight]; "
        "unexpected keys [layer2.0.conv9.weight, neck.fc.weight]"
    )

    bad_shape = authors_release(trunk)
    bad_shape["state_dict"]["backbone.layer1.0.conv1.conv.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(
        ValueError, match=r"shape mismatches \(file vs resnet18\) \[layer1.0.conv1.weight \(64, 64, 1, 1\)"
    ):
        load_published(bad_shape, name="x.pth")

    resnet34 = mmcv_names(torchvision_trunk("resnet34"))
    with pytest.raises(ValueError, match="neither a ResNet-18 nor a ResNet-50"):
        load_published(
            {
                "state_dict": resnet34,
                "meta": {"config": AUTHORS_TRAIN_CONFIG.format(pool="none", strides="(1, 2, 2, 4)")},
            },
            name="r34.pth",
        )


def test_unknown_and_ambiguous_files_are_refused(tmp_path):
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": {"module.encoder_q.conv1.weight": torch.zeros(1)}, "epoch": 200}, path)
    with pytest.raises(ValueError) as excinfo:
        extract(path)
    message = one_line_error(excinfo)
    assert (
        message.startswith(f"{path}: cannot load as unknown weights") and "epoch" in message and "state_dict" in message
    )

    ambiguous = authors_release(torchvision_trunk(), pool=None, teacher=False)
    with pytest.raises(ValueError, match="weights.pth: cannot load as mmcv-resnet weights"):
        load_published(ambiguous, name="weights.pth")


def test_training_init_accepts_a_release_for_the_same_arch(tmp_path):
    from stt import checkpoint, published

    trunk = torchvision_trunk()
    path = tmp_path / "pretrained.pth"
    torch.save(crw_checkpoint(trunk), path)
    payload = published.load_init(path.read_bytes(), str(path), "resnet18")
    assert payload.keys() == {"model"}
    assert_same_trunk(payload["model"], trunk)
    with pytest.raises(ValueError, match="crw weights of a resnet18, but model.arch=resnet50; set model.arch=resnet18"):
        published.load_init(path.read_bytes(), str(path), "resnet50")
    mast = tmp_path / "mast.pt"
    torch.save(mast_checkpoint(), mast)
    with pytest.raises(ValueError, match="a MAST release initialises no stt stage"):
        published.load_init(mast.read_bytes(), str(mast), MAST_ARCH)
    bare = tmp_path / "resnet18.pth"
    torch.save(trunk, bare)
    with pytest.raises(ValueError, match="not an stt.train checkpoint"):  # resuming still takes stt's own files only
        checkpoint.load(bare, str(bare))
