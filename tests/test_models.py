"""The encoder: pyramid shapes and strides per preset, the teacher, weights across layouts."""
import math
import re

import pytest
import torch
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor

from stt.config import ModelConfig
from stt.models import Encoder, build_encoder, build_teacher, encoder_state_dict, load_encoder_weights

CHANNELS = {"resnet18": (128, 256, 512), "resnet50": (512, 1024, 2048)}


def meta_shapes(arch: str, res4_stride: int, height: int, width: int) -> dict[str, tuple[int, ...]]:
    """Output shapes without computing anything: the conv arithmetic alone, on the meta device."""
    with torch.device("meta"):
        encoder = Encoder(arch, res4_stride)
        return {name: tuple(f.shape) for name, f in encoder(torch.empty(1, 3, height, width)).items()}


def conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("stride", [4, 8])
def test_pyramid_shapes_at_256(arch, stride):
    c3, c4, c5 = CHANNELS[arch]
    shapes = meta_shapes(arch, stride, 256, 256)
    assert shapes == {
        "res3": (1, c3, 64, 64),
        "res4": (1, c4, 256 // stride, 256 // stride),
        "res5": (1, c5, 8, 8),
    }
    encoder = Encoder(arch, stride)
    assert encoder.out_channels == {"res3": c3, "res4": c4, "res5": c5}
    assert encoder.strides == {"res3": 4, "res4": stride, "res5": 32}


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
        stem = torch.nn.functional.avg_pool2d(encoder.relu(encoder.bn1(encoder.conv1(x))), 3, 2, 1, count_include_pad=True)
        res3 = encoder.layer2(encoder.layer1(stem))
        out = encoder(x, layers=("res3", "res4"))
    assert stem.shape[-2:] == (10, 13)  # ceil(37 / 4), ceil(50 / 4)
    assert torch.allclose(out["res3"], res3) and torch.allclose(out["res4"], encoder.layer3(res3))
    assert out["res4"].shape[-2:] == (10, 13)


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
    with pytest.raises(ValueError, match=r"missing keys \['layer2.0.bn1.bias'\].*unexpected keys \['head.weight'\]"):
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
