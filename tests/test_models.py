"""The encoder: pyramid shapes and strides per preset, the teacher, weights across layouts."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from stt.config import ModelConfig, load_config
from stt.models import (
    CRW_STRIDE,
    MAST_ARCH,
    VFS_STRIDE,
    Encoder,
    MastEncoder,
    build_encoder,
    build_teacher,
    encoder_state_dict,
    load_encoder_weights,
)

CHANNELS = {"resnet18": (128, 256, 512), "resnet50": (512, 1024, 2048)}


def meta_shapes(arch: str, stride: int | str, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Output shapes without computing anything: the conv arithmetic alone, on the meta device."""
    with torch.device("meta"):
        encoder = Encoder(arch, stride)
        return {name: tuple(f.shape) for name, f in encoder(torch.empty(1, 3, height, width)).items()}


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("preset,res3,res4", [(4, 4, 4), (8, 4, 8), (VFS_STRIDE, 8, 8), (CRW_STRIDE, 8, 8)])
def test_pyramid_shapes_at_256(arch, preset, res3, res4):
    c3, c4, c5 = CHANNELS[arch]
    shapes = meta_shapes(arch, preset, 256, 256)
    assert shapes == {
        "res3": (1, c3, 256 // res3, 256 // res3),
        "res4": (1, c4, 256 // res4, 256 // res4),
        "res5": (1, c5, 8, 8),
    }
    encoder = Encoder(arch, preset)
    assert encoder.out_channels == {"res3": c3, "res4": c4, "res5": c5}
    assert encoder.strides == {"res3": res3, "res4": res4, "res5": 32}


def test_odd_davis_size_follows_the_conv_arithmetic():
    # 480x854 in the stride-8 preset: stem conv (k7 s2 p3), then layer2, layer3 (3x3 s2 p1).
    h, w = 480, 854
    h, w = conv_out(h, 7, 2, 3), conv_out(w, 7, 2, 3)  # 240 x 427 (no max-pool, layer1 stride 1)
    h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)  # res3: 120 x 214
    res3 = (h, w)
    h, w = conv_out(h, 3, 2, 1), conv_out(w, 3, 2, 1)  # res4: 60 x 107
    assert (h, w) == (60, 107)
    # res5: 2x2 ceil-mode average pool (30 x 54), then layer4's stride-2 conv (15 x 27)
    res5 = (conv_out(math.ceil(h / 2), 3, 2, 1), conv_out(math.ceil(w / 2), 3, 2, 1))
    for arch in ("resnet18", "resnet50"):
        shapes = meta_shapes(arch, 8, 480, 854)
        assert shapes["res3"][2:] == res3
        assert shapes["res4"][2:] == (60, 107)
        assert shapes["res5"][2:] == res5 == (15, 27)
        assert meta_shapes(arch, 4, 480, 854)["res4"][2:] == res3


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_stride4_is_the_authors_res18_d4_trunk(arch):
    """res18_d4.py: conv1 at stride 2, a 3x3 stride-2 mean pool (padding counted), then layer1-3
    with no downsampling at all: every conv of layer1-3 at stride 1, every feature at 1/4."""
    torch.manual_seed(0)
    encoder = Encoder(arch, 4).eval()
    strides = {name: m.stride for name, m in encoder.named_modules() if isinstance(m, torch.nn.Conv2d)}
    assert strides["conv1"] == (2, 2)
    assert all(stride == (1, 1) for name, stride in strides.items() if re.match(r"layer[123]\.", name))
    x = torch.randn(1, 3, 37, 50)
    with torch.no_grad():
        stem = torch.nn.functional.avg_pool2d(
            encoder.relu(encoder.bn1(encoder.conv1(x))), 3, 2, 1, count_include_pad=True
        )
        res3 = encoder.layer2(encoder.layer1(stem))
        out = encoder(x, layers=("res3", "res4"))
    assert stem.shape[-2:] == (10, 13)  # ceil(37 / 4), ceil(50 / 4)
    assert torch.allclose(out["res3"], res3) and torch.allclose(out["res4"], encoder.layer3(res3))
    assert out["res4"].shape[-2:] == (10, 13)


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The module's state dict with random weights and BatchNorm statistics (variances positive)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in module.state_dict().items():
        if not value.is_floating_point():
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = torch.rand(value.shape, generator=generator) + 0.5
        else:
            state[key] = torch.randn(value.shape, generator=generator) * (0.1 if value.dim() == 4 else 1.0)
    return state


def torchvision_layer3(net: torchvision.models.ResNet, x: torch.Tensor) -> torch.Tensor:
    """torchvision's forward up to layer3 (the level VFS and CRW propagate from)."""
    return net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))


def vfs_test_trunk(arch: str, state: dict) -> torchvision.models.ResNet:
    """VFS's DAVIS model rebuilt from its code: tools/test.py sets backbone.strides = test_cfg.strides = (1, 2, 1, 1);
    ResNet.switch_strides sets that stride on each block with a shortcut: its downsample conv and conv1 (ResNet-18)
    or conv2 (ResNet-50, 'pytorch' style). The stem max-pool stays."""
    net = getattr(torchvision.models, arch)(weights=None)
    net.load_state_dict(state)
    for layer, stride in zip((net.layer1, net.layer2, net.layer3, net.layer4), (1, 2, 1, 1)):
        for block in layer:
            if block.downsample is not None:
                block.downsample[0].stride = (stride, stride)
                (block.conv1 if arch == "resnet18" else block.conv2).stride = (stride, stride)
    return net.eval()


def crw_test_trunk(state: dict) -> torchvision.models.ResNet:
    """CRW's DAVIS model rebuilt from its code: code/resnet.py `modify` sets every conv of layer3 and layer4 to
    stride 1 and, with padding='reflect' (model type 'scratch'), reflect-pads every conv whose padding is > 0."""
    net = torchvision.models.resnet18(weights=None)
    net.load_state_dict(state)
    for layer in (net.layer3, net.layer4):
        for module in layer.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.stride = (1, 1)
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d) and sum(module.padding) > 0:
            module.padding_mode = "reflect"
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_vfs_preset_is_the_trunk_vfs_evaluates_with(arch):
    state = random_state(getattr(torchvision.models, arch)(weights=None), 1)
    encoder = Encoder(arch, VFS_STRIDE).eval()
    load_encoder_weights(encoder, state)
    x = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        ours = encoder(x, layers=("res3", "res4"))
        theirs = torchvision_layer3(vfs_test_trunk(arch, state), x)
        stride8 = Encoder(arch, 8).eval()
        load_encoder_weights(stride8, state)
        preset8 = stride8(x, layers=("res4",))["res4"]
    assert theirs.shape[-2:] == (9, 13) == ours["res3"].shape[-2:]  # ceil(70 / 8), ceil(101 / 8)
    torch.testing.assert_close(ours["res4"], theirs, rtol=1e-4, atol=1e-4)
    assert preset8.shape == theirs.shape and not torch.allclose(preset8, theirs, atol=1e-2)  # same grid, other trunk
    assert encoder.strides == {"res3": 8, "res4": 8, "res5": 32}


def test_crw_preset_is_the_trunk_crw_evaluates_with():
    state = random_state(torchvision.models.resnet18(weights=None), 2)
    encoder = Encoder("resnet18", CRW_STRIDE).eval()
    load_encoder_weights(encoder, state)
    zero_padded = Encoder("resnet18", VFS_STRIDE).eval()
    load_encoder_weights(zero_padded, state)
    x = torch.randn(1, 3, 70, 101)
    with torch.no_grad():
        theirs = torchvision_layer3(crw_test_trunk(state), x)
        torch.testing.assert_close(encoder(x, layers=("res4",))["res4"], theirs, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(zero_padded(x, layers=("res4",))["res4"], theirs, atol=1e-2)  # padding matters
    assert encoder.conv1.padding_mode == "reflect" and encoder.layer3[0].downsample[0].padding_mode == "zeros"
    assert encoder.maxpool.padding == 1  # a max-pool is no conv: CRW's keeps its (-inf) padding


def test_named_presets_are_config_choices():
    assert load_config(overrides=[f"model.stride={VFS_STRIDE}"]).model.stride == VFS_STRIDE
    assert load_config(overrides=[f"model.stride={CRW_STRIDE}"]).model.stride == CRW_STRIDE
    assert load_config(overrides=["model.stride=8"]).model.stride == 8  # still an integer
    built = build_encoder(ModelConfig(stride=VFS_STRIDE))
    assert isinstance(built.maxpool, torch.nn.MaxPool2d) and built.layer3[0].conv1.stride == (1, 1)


def mast_reference(state: dict, x: torch.Tensor) -> torch.Tensor:
    """MAST's features, post_convolution(feature_extraction(x)), written out with torch.nn.functional on its
    state dict: zlai0/MAST models/submodule.py ResNet18 (7x7 s2 stem conv-BN-ReLU, no pool; layers (64, 1),
    (128, 2), (256, 1), (256, 1) of two ResidualBlocks: relu(left(x) + shortcut(x))) and models/mast.py."""

    def bn(y, name):
        return F.batch_norm(
            y,
            state[f"{name}.running_mean"],
            state[f"{name}.running_var"],
            state[f"{name}.weight"],
            state[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    def block(y, name, stride):
        out = F.relu(bn(F.conv2d(y, state[f"{name}.left.0.weight"], stride=stride, padding=1), f"{name}.left.1"))
        out = bn(F.conv2d(out, state[f"{name}.left.3.weight"], padding=1), f"{name}.left.4")
        if f"{name}.shortcut.0.weight" in state:
            y = bn(F.conv2d(y, state[f"{name}.shortcut.0.weight"], stride=stride), f"{name}.shortcut.1")
        return F.relu(out + y)

    y = F.relu(
        bn(F.conv2d(x, state["feature_extraction.conv1.0.weight"], stride=2, padding=3), "feature_extraction.conv1.1")
    )
    for layer, stride in ((1, 1), (2, 2), (3, 1), (4, 1)):
        y = block(block(y, f"feature_extraction.layer{layer}.0", stride), f"feature_extraction.layer{layer}.1", 1)
    return F.conv2d(y, state["post_convolution.weight"], state["post_convolution.bias"], padding=1)


def test_mast_encoder_is_mast():
    encoder = MastEncoder().eval()
    state = random_state(encoder, 3)
    load_encoder_weights(encoder, state)
    shortcuts = sorted(k.split(".")[1] + "." + k.split(".")[2] for k in state if ".shortcut.0." in k)
    assert shortcuts == ["layer2.0", "layer3.0"]  # only where a block changes stride or width, as MAST's
    assert state["feature_extraction.layer4.1.left.3.weight"].shape == (256, 256, 3, 3)
    assert state["post_convolution.weight"].shape == (64, 256, 3, 3) and "post_convolution.bias" in state
    x = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        features = encoder(x, layers=("res3", "res4"))
        torch.testing.assert_close(features["res4"], mast_reference(state, x), rtol=1e-4, atol=1e-4)
    assert features["res3"].shape == (2, 128, 10, 13) and features["res4"].shape == (2, 64, 10, 13)  # ceil(37 / 4)
    assert encoder.strides == {"res3": 4, "res4": 4} and encoder.out_channels == {"res3": 128, "res4": 64}


def test_mast_arch_evaluates_only_at_stride_4():
    assert isinstance(build_encoder(ModelConfig(arch=MAST_ARCH, stride=4)), MastEncoder)
    assert load_config(overrides=[f"model.arch={MAST_ARCH}", "model.stride=4"]).model.arch == MAST_ARCH
    with pytest.raises(ValueError, match="runs at stride 4 only.*set model.stride=4"):
        build_encoder(ModelConfig(arch=MAST_ARCH, stride=8))
    with pytest.raises(ValueError, match="no torchvision layout"):
        build_teacher(ModelConfig(arch=MAST_ARCH, stride=4), {})
    with pytest.raises(ValueError, match="has no res5"):
        MastEncoder()(torch.randn(1, 3, 16, 16), layers=("res5",))


@pytest.mark.parametrize("height,width", [(256, 256), (480, 854), (33, 47), (97, 250)])
def test_teacher_strides_and_res5_grid_match_the_students(height, width):
    teacher = meta_shapes("resnet18", 16, height, width)
    assert teacher["res3"][2:] == (math.ceil(height / 8), math.ceil(width / 8))
    assert teacher["res4"][2:] == (math.ceil(height / 16), math.ceil(width / 16))
    assert teacher["res5"][2:] == (math.ceil(height / 32), math.ceil(width / 32))
    for stride in (4, 8):
        assert meta_shapes("resnet18", stride, height, width)["res5"] == teacher["res5"]


def test_teacher_is_the_torchvision_trunk():
    reference = torchvision.models.resnet18(weights=None).eval()
    teacher = build_teacher(ModelConfig(arch="resnet18"), reference.state_dict())
    assert teacher.strides == {"res3": 8, "res4": 16, "res5": 32}
    x = torch.randn(2, 3, 64, 96)
    expected = create_feature_extractor(reference, {"layer2": "res3", "layer3": "res4", "layer4": "res5"})(x)
    with torch.no_grad():
        features = teacher(x)
    for name in ("res3", "res4", "res5"):
        torch.testing.assert_close(features[name], expected[name])


def test_teacher_is_frozen_even_inside_a_training_parent():
    teacher = build_teacher(ModelConfig(), encoder_state_dict(Encoder()))
    parent = torch.nn.ModuleDict({"teacher": teacher, "student": Encoder()})
    parent.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert parent["student"].training
    assert not any(p.requires_grad for p in teacher.parameters())
    running_mean = teacher.bn1.running_mean.clone()
    teacher(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(teacher.bn1.running_mean, running_mean)


def test_forward_computes_only_up_to_the_deepest_requested_level():
    encoder = Encoder("resnet18", 8)
    ran = []
    for name in ("layer3", "layer4"):
        getattr(encoder, name).register_forward_hook(lambda *_, name=name: ran.append(name))
    features = encoder(torch.randn(1, 3, 32, 32), layers=("res3",))
    assert list(features) == ["res3"] and ran == []
    features = encoder(torch.randn(1, 3, 32, 32), layers=("res4",))
    assert list(features) == ["res4"] and ran == ["layer3"]
    with pytest.raises(ValueError, match="res6"):
        encoder(torch.randn(1, 3, 32, 32), layers=("res6",))


def test_one_state_dict_loads_into_every_layout():
    source = Encoder("resnet18", 8)
    state = encoder_state_dict(source)
    for target in (Encoder("resnet18", 4), build_teacher(ModelConfig(), state)):
        load_encoder_weights(target, state)
        loaded = encoder_state_dict(target)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
    # stride presets only change conv strides: same parameter count as torchvision minus fc
    reference = torchvision.models.resnet18(weights=None)
    fc = sum(p.numel() for p in reference.fc.parameters())
    assert sum(p.numel() for p in source.parameters()) == sum(p.numel() for p in reference.parameters()) - fc


def test_torchvision_state_dict_loads_and_wrapper_prefixes_are_stripped(tmp_path):
    reference = torchvision.models.resnet18(weights=None).state_dict()
    assert "fc.weight" in reference and "layer1.0.conv1.weight" in reference
    encoder = Encoder("resnet18", 8)
    load_encoder_weights(encoder, reference)
    assert torch.equal(encoder.layer1[0].conv1.weight, reference["layer1.0.conv1.weight"])

    path = tmp_path / "imagenet.pth"
    torch.save({f"module.{k}": v for k, v in reference.items()}, path)
    built = build_encoder(ModelConfig(arch="resnet18", stride=4, weights=str(path)))
    assert torch.equal(built.layer4[1].bn2.running_var, reference["layer4.1.bn2.running_var"])
    compiled_keys = encoder_state_dict(torch.compile(built))
    assert "layer1.0.conv1.weight" in compiled_keys


def test_bad_weights_are_named():
    encoder = Encoder("resnet18", 8)
    state = encoder_state_dict(encoder)
    del state["layer2.0.bn1.bias"]
    state["head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 missing keys \[layer2.0.bn1.bias\], 1 unexpected keys \[head.weight\]"):
        load_encoder_weights(encoder, state)
    with pytest.raises(ValueError, match=re.escape("layer1.0.conv1.weight: (64, 64, 3, 3) vs (64, 64, 1, 1)")):
        load_encoder_weights(Encoder("resnet50", 8), state)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_encoder(ModelConfig(weights="/nowhere.pth"))
    with pytest.raises(ValueError, match="model.stride"):
        build_encoder(ModelConfig(stride=16))
    with pytest.raises(ValueError, match="model.arch"):
        build_encoder(ModelConfig(arch="vgg16"))


def test_channels_last_and_bf16_autocast_on_cpu():
    encoder = Encoder("resnet18", 8).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = encoder(x)
        fast = encoder.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = encoder(x)
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-4, atol=1e-4)
        assert half[name].dtype == torch.bfloat16 and half[name].shape == reference[name].shape
        assert torch.isfinite(half[name]).all()


def test_forward_traces_as_one_graph():
    encoder = Encoder("resnet18", 8).eval()
    compiled = torch.compile(encoder, backend="eager", fullgraph=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x)["res4"], encoder(x)["res4"])


def test_resnet50_forward_at_a_small_size():
    encoder = Encoder("resnet50", 8)
    features = encoder(torch.randn(2, 3, 64, 64))
    assert {k: tuple(v.shape) for k, v in features.items()} == {
        "res3": (2, 512, 16, 16),
        "res4": (2, 1024, 8, 8),
        "res5": (2, 2048, 2, 2),
    }
    features["res5"].mean().backward()
    assert encoder.conv1.weight.grad is not None


@pytest.mark.parametrize(
    "arch, stride",
    [
        ("resnet18", 8),
        ("resnet18", 4),
        ("resnet18", "8-maxpool"),
        ("resnet50", "8-maxpool-reflect"),
        ("mast-resnet18", 4),
    ],
)
def test_feature_stride_is_the_built_encoders(arch, stride):
    from stt.models import feature_stride

    cfg = ModelConfig(arch=arch, stride=stride)
    encoder = build_encoder(cfg)
    for layer, value in encoder.strides.items():
        assert feature_stride(cfg, layer) == value
    if arch == "mast-resnet18":
        with pytest.raises(ValueError, match="has no res5"):
            feature_stride(cfg, "res5")
