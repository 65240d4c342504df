"""Tests for online_kd.models: the CIFAR model zoo, the registry and named taps."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from online_kd.models import (
    TappedModel,
    available_taps,
    build_model,
    is_known_model,
    model_names,
)

ZOO = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflenetv1", "shufflenetv2",
    "preact_resnet18", "resnet8_zeropad", "resnet26_zeropad", "vgg16_5pool",
]
SMALL = ["mlp", "convnet", "convnet_small"]
RESNETS = [n for n in ZOO if n.startswith("resnet")]
N_STAGES = {**{n: 3 for n in ZOO}, **{n: 4 for n in ZOO if n.startswith("vgg")}, "preact_resnet18": 4,
            "mobilenetv2": 5, "shufflenetv2": 4, "mlp": 2, "convnet": 3, "convnet_small": 2}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def last_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def test_registry():
    names = model_names()
    assert set(ZOO + SMALL) <= set(names)
    assert names == sorted(names)
    assert all(is_known_model(n) for n in names)
    assert is_known_model("torchvision:resnet18")
    assert not is_known_model("torchvision:fasterrcnn_resnet50_fpn")  # detection, not classification
    assert not is_known_model("torchvision:nope") and not is_known_model("nope")
    with pytest.raises(KeyError, match="nope"):
        build_model("nope", 3, 10)
    with pytest.raises(KeyError):
        build_model("torchvision:nope", 3, 10)


@pytest.mark.parametrize("name", ZOO + SMALL)
def test_build_forward_all_taps_32(name):
    """Every model: (3, 100) on 32x32; every named tap is produced with a sensible shape."""
    model = build_model(name, 3, 100)
    taps = available_taps(model)
    k = N_STAGES[name]
    expected = {f"stage{i}" for i in range(1, k + 1)} | {f"stage{i}_pre" for i in range(1, k + 1)}
    assert expected | {"pool", "logits"} <= set(taps)
    assert f"stage{k + 1}" not in taps
    out = TappedModel(model, taps)(torch.randn(2, 3, 32, 32))
    assert list(out) == ["logits", *[t for t in taps if t != "logits"]]
    assert out["logits"].shape == (2, 100)
    assert out["pool"].shape == (2, last_linear(model).in_features)
    for i in range(1, k + 1):
        assert out[f"stage{i}"].shape == out[f"stage{i}_pre"].shape
        assert out[f"stage{i}"].dim() in (2, 4)


@pytest.mark.parametrize("name", ZOO + SMALL)
def test_forward_digits_8x8(name):
    """Every model also runs on 1x8x8 digits with 10 classes (adaptive pooling everywhere)."""
    model = build_model(name, 1, 10)
    out = TappedModel(model, ["pool"])(torch.randn(2, 1, 8, 8))
    assert out["logits"].shape == (2, 10)
    assert out["pool"].shape == (2, last_linear(model).in_features)


# Published sizes: He et al. 2016 (CIFAR-10 heads) and the RepDistiller / CRD tables (CIFAR-100 heads);
# "measured" is this implementation.
PARAMS = [
    ("resnet20", 10, 0.27e6),       # measured 272,474 (100 classes: 278,324)
    ("resnet56", 10, 0.85e6),       # measured 855,770 (100 classes: 861,620 = CRD's 0.86M)
    ("resnet56", 100, 0.86e6),
    ("resnet110", 10, 1.7e6),       # measured 1,730,714
    ("resnet110", 100, 1.73e6),     # measured 1,736,564
    ("resnet8x4", 100, 1.23e6),     # measured 1,233,540
    ("resnet32x4", 100, 7.43e6),    # measured 7,433,860
    ("wrn_40_2", 100, 2.26e6),      # measured 2,255,156
    ("wrn_16_2", 100, 0.70e6),      # measured 703,284
    ("vgg13", 100, 9.46e6),         # measured 9,462,180
    ("vgg8", 100, 3.96e6),          # measured 3,965,028
    ("mobilenetv2", 100, 0.81e6),   # measured 812,836
    ("shufflenetv1", 100, 0.95e6),  # measured 949,252
    ("shufflenetv2", 100, 1.36e6),  # measured 1,355,528
    ("preact_resnet18", 100, 11.2e6),  # CS-KD's ResNet-18; measured 11,217,444
    ("resnet26_zeropad", 10, 0.37e6),   # BSS's ResNet-26; measured 366,938
]


@pytest.mark.parametrize("name,num_classes,expected", PARAMS)
def test_param_counts_match_literature(name, num_classes, expected):
    assert n_params(build_model(name, 3, num_classes)) == pytest.approx(expected, rel=0.02)


def test_resnet20_taps():
    model = build_model("resnet20", 3, 100)
    tapped = TappedModel(model, ["stage1", "stage2", "stage3", "stage3_pre", "pool", "stem"])
    x = torch.randn(4, 3, 32, 32)
    out = tapped(x)
    assert out["stem"].shape == (4, 16, 32, 32)
    assert out["stage1"].shape == (4, 16, 32, 32)
    assert out["stage2"].shape == (4, 32, 16, 16)
    assert out["stage3"].shape == (4, 64, 8, 8)
    assert out["pool"].shape == (4, 64)
    assert (out["stage3_pre"] < 0).any()
    assert (out["stage3"] >= 0).all()
    torch.testing.assert_close(F.relu(out["stage3_pre"]), out["stage3"], rtol=0, atol=0)


@pytest.mark.parametrize("name", RESNETS[:1] + ["resnet8x4", "shufflenetv1", "convnet"])
def test_pool_is_avg_pooled_last_stage(name):
    model = build_model(name, 3, 10)
    k = N_STAGES[name]
    out = TappedModel(model, [f"stage{k}", "pool"])(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out["pool"], F.adaptive_avg_pool2d(out[f"stage{k}"], 1).flatten(1))


@pytest.mark.parametrize("name", ["resnet8", "vgg8", "shufflenetv1", "shufflenetv2", "mobilenetv2",
                                  "mlp", "convnet"])
def test_stage_is_relu_of_pre(name):
    """Post-activation nets: stageK == relu(stageK_pre); MobileNetV2's linear bottlenecks: equal."""
    model = build_model(name, 3, 10)
    taps = [t for t in available_taps(model) if t.startswith("stage")]
    out = TappedModel(model, taps)(torch.randn(2, 3, 32, 32))
    for t in taps:
        if t.endswith("_pre"):
            stage = out[t[: -len("_pre")]]
            if name == "mobilenetv2" and t != "stage5_pre":
                assert out[t] is stage
            else:
                assert (out[t] < 0).any(), t
                torch.testing.assert_close(F.relu(out[t]), stage, rtol=0, atol=0)


def test_wrn_taps_are_repdistiller_features():
    """WRN (pre-activation): stageK = raw block output, stageK_pre = next BN applied to it."""
    model = build_model("wrn_16_2", 3, 10).eval()
    out = TappedModel(model, ["stage1", "stage1_pre", "stage3", "stage3_pre"])(torch.randn(2, 3, 32, 32))
    assert (out["stage3"] < 0).any()  # no ReLU at the end of a pre-activation stage
    with torch.no_grad():
        torch.testing.assert_close(out["stage1_pre"], model.block2.layer[0].bn1(out["stage1"]))
        torch.testing.assert_close(out["stage3_pre"], model.bn1(out["stage3"]))


def test_logits_equal_plain_forward_and_state_dict():
    model = build_model("resnet8", 3, 10).eval()
    tapped = TappedModel(model, ["stage2", "pool"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tapped(x)["logits"], model(x), rtol=0, atol=0)
    assert tapped.model is model
    assert list(tapped.model.state_dict()) == list(build_model("resnet8", 3, 10).state_dict())
    # RepDistiller parameter names, so its checkpoints load
    assert {"conv1.weight", "layer1.0.bn2.running_mean", "layer2.0.downsample.0.weight", "fc.bias"} \
        <= set(model.state_dict())


def test_unknown_tap_lists_available():
    model = build_model("resnet8", 3, 10)
    with pytest.raises(ValueError, match=r"no tap 'bogus' \(taps: stem, stage1, .*pool, logits"):
        TappedModel(model, ["bogus"])
    with pytest.raises(ValueError, match="no tap 'module:nope'"):
        TappedModel(model, ["module:nope"])
    tapped = TappedModel(model, ["stage1"])
    with pytest.raises(ValueError):
        tapped.set_taps(["stage1", "bogus"])
    assert tapped.taps == ("stage1",)  # a failed set_taps leaves the old taps in place
    assert "stage1" in tapped(torch.randn(2, 3, 8, 8))


def test_module_tap_and_set_taps():
    model = build_model("resnet8", 3, 10)
    tapped = TappedModel(model, ["module:layer1", "stage1", "module:layer2.0.conv1"])
    out = tapped(torch.randn(2, 3, 16, 16))
    assert out["module:layer1"] is out["stage1"]
    assert out["module:layer2.0.conv1"].shape == (2, 32, 8, 8)

    def n_hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    assert n_hooks() == 3
    tapped.set_taps(["pool", "logits", "pool"])
    assert tapped.taps == ("pool", "logits") and n_hooks() == 1
    assert set(tapped(torch.randn(2, 3, 16, 16))) == {"logits", "pool"}
    tapped.set_taps([])
    assert n_hooks() == 0 and set(tapped(torch.randn(2, 3, 16, 16))) == {"logits"}


def test_torchvision_resnet18_one_channel():
    model = build_model("torchvision:resnet18", 1, 10)
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    taps = available_taps(model)
    assert {"stage1", "stage2", "stage3", "stage4", "pool", "logits"} <= set(taps)
    out = TappedModel(model, ["stage1", "stage4", "pool", "module:layer3"])(torch.randn(2, 1, 32, 32))
    assert out["logits"].shape == (2, 10)
    assert out["stage1"].shape == (2, 64, 8, 8)
    assert out["stage4"].shape == (2, 512, 1, 1)
    assert out["pool"].shape == (2, 512)
    assert out["module:layer3"].shape == (2, 256, 2, 2)


def test_gradients_flow_from_tap():
    model = build_model("resnet8", 3, 10)
    out = TappedModel(model, ["stage2"])(torch.randn(2, 3, 16, 16))
    assert out["stage2"].requires_grad
    out["stage2"].pow(2).mean().backward()
    assert model.layer1[0].conv1.weight.grad is not None
    assert model.layer1[0].conv1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # not on the path to stage2


def test_deepcopy_and_pickle_keep_taps_independent():
    tapped = TappedModel(build_model("resnet8", 3, 10), ["pool"])
    clone = copy.deepcopy(tapped)
    buf = io.BytesIO()
    torch.save(tapped, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    for m in (clone, loaded):
        assert m(x)["pool"].shape == (2, 64)
        assert not tapped._captured and not m._captured  # nothing kept between steps


def test_zeropad_resnet_counts_and_option_a_shortcut():
    """BSS's ZeroPadBlock: parameter-free shortcut = every 2nd pixel of the input, new channels zero."""
    # stem 3·16·9 + BN; three stages of one block (two 3x3 convs + two BNs); fc 64·10 + 10
    convs = 3 * 16 * 9 + 16 * 16 * 9 * 2 + (16 * 32 + 32 * 32) * 9 + (32 * 64 + 64 * 64) * 9
    bns = 2 * (16 + 16 * 2 + 32 * 2 + 64 * 2)
    model = build_model("resnet8_zeropad", 3, 10).eval()
    assert n_params(model) == convs + bns + 64 * 10 + 10 == 75_290
    assert n_params(build_model("resnet8", 3, 10)) - n_params(model) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    block = model.layer2[0]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        shortcut = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 16, 4, 4)], 1)
        torch.testing.assert_close(block(x), F.relu(branch + shortcut))
    out = TappedModel(model, ["stage3", "stage3_pre", "pool"])(torch.randn(2, 3, 32, 32))
    assert out["stage3"].shape == (2, 64, 8, 8)
    torch.testing.assert_close(F.relu(out["stage3_pre"]), out["stage3"], rtol=0, atol=0)


def test_vgg16_5pool_is_active_mixups_vgg16():
    """Same layers as vgg16, but stage4 is pooled to 1x1 by a fifth max-pool before the classifier."""
    five, four = build_model("vgg16_5pool", 3, 10).eval(), build_model("vgg16", 3, 10)
    assert list(five.state_dict()) == list(four.state_dict())
    assert n_params(five) == n_params(four) == 14_728_266
    out = TappedModel(five, ["stage3", "stage4", "pool"])(torch.randn(2, 3, 32, 32))
    assert out["stage3"].shape == (2, 512, 4, 4) and out["stage4"].shape == (2, 512, 2, 2)
    torch.testing.assert_close(out["pool"], out["stage4"].amax((2, 3)))
    torch.testing.assert_close(out["logits"], five.classifier(out["stage4"].amax((2, 3))))


def test_preact_resnet18_is_cskd_cifar_resnet18():
    """CS-KD's CIFAR_ResNet18: its parameter names, 11.2M parameters, no ReLU after the last stage."""
    model = build_model("preact_resnet18", 3, 100).eval()
    keys = set(model.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.bn1.weight", "layer1.1.conv2.weight",
            "layer2.0.shortcut.0.weight", "layer4.1.bn2.bias", "linear.weight", "linear.bias"} <= keys
    assert not any("layer1.0.shortcut" in k or "layer2.1.shortcut" in k for k in keys)  # identity shortcuts
    out = TappedModel(model, ["stem", "stage4", "pool"])(torch.randn(2, 3, 32, 32))
    assert out["stem"].shape == (2, 64, 32, 32) and out["stage4"].shape == (2, 512, 4, 4)
    assert (out["stage4"] < 0).any()  # the raw residual sum
    torch.testing.assert_close(out["pool"], out["stage4"].mean((2, 3)))
    block, x = model.layer2[0], torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        act = F.relu(block.bn1(x))
        expected = block.conv2(F.relu(block.bn2(block.conv1(act)))) + block.shortcut[0](act)
        torch.testing.assert_close(block(x), expected)
