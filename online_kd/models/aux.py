"""HSAKD auxiliary classifiers (Yang et al., IJCAI 2021) as ``winycg/HSAKD`` builds them: models ``<name>_aux``.

Branch i reads the backbone's stage-i output and runs it through fresh copies of the stages after
it (the last stage's branch: one more stage-like block group with stride 1), then (pre-activation
nets, i.e. WRN: BN-ReLU) global average pooling and a Linear to ``aux_factor``·C outputs: the joint
classes 4·class + k of the four rotations (``data.expand: rotation4``). The branches are deep (copies
of later stages), not small heads; their parameters are the peer's (optimised and checkpointed with it).

Module names follow the reference (``backbone.*``, ``auxiliary_classifier.block_extractor{i}``,
``.bn{i}``, ``.fc{i}``), so its ``*_aux`` checkpoints load.

Taps: the backbone's own (``stem``, ``stage1..N``, ``_pre``, ``pool``, ``logits``) plus ``aux1..auxK``
(branch i's outputs ``[rows, aux_factor·C]``) and ``aux`` (all of them stacked, ``[rows, K, aux_factor·C]``).
The branches run only while a tap reads them (:class:`TappedModel` says which taps are requested) or
when the model runs outside a TappedModel; plain evaluation of the logits does not need them.

``model_args``: ``aux_detach`` detaches the stage features before the branches — the reference's
``forward(x, grad=False)``, used only by its frozen-backbone teacher regime (``--freezed``); its joint
teacher training, student training and online training all use ``grad=True``, hence the default false.
``aux_factor`` (4) is the number of transforms per sample in the joint label.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from .common import init_weights
from .registry import get_factory, register_model
from .resnet import BasicBlock, CifarResNet
from .small import ConvNet
from .taps import MODULE_PREFIX, TapPoint
from .taps import tap_points as model_tap_points
from .wrn import NetworkBlock, WideResNet

__all__ = ["AuxiliaryClassifier", "AuxNet", "AuxSpec", "aux_family", "with_aux_heads", "AUX_FAMILIES"]

HEADS = "auxiliary_classifier"


@dataclass
class AuxSpec:
    """A backbone's auxiliary branches: the stage outputs they read, their extractors, output width."""

    stages: list[str]            # module paths of the stage outputs, in order
    extractors: list[nn.Module]  # one per stage: fresh copies of the stages after it
    width: int                   # channels each extractor ends with
    final_bn: bool = False       # BN-ReLU before pooling (pre-activation backbones)


#: backbone class → builder of its AuxSpec
AUX_FAMILIES: dict[type, Callable[[nn.Module], AuxSpec]] = {}


def aux_family(cls: type, names: Iterable[str]):
    """Decorator: ``builder(net) -> AuxSpec`` for backbones of class ``cls``; registers ``<name>_aux`` for ``names``."""

    def deco(builder: Callable[[nn.Module], AuxSpec]) -> Callable[[nn.Module], AuxSpec]:
        AUX_FAMILIES[cls] = builder
        for name in names:
            register_model(f"{name}_aux")(_aux_factory(name))
        return builder

    return deco


def _branches(num_stages: int, copy_stage: Callable[[int], nn.Module],
              extra_stage: Callable[[], nn.Module]) -> list[nn.Module]:
    """Branch i (0-indexed) = copies of stages i+1.. ; the last stage's branch = one extra stage."""
    return [nn.Sequential(*[copy_stage(k) for k in range(i + 1, num_stages)]) if i < num_stages - 1
            else nn.Sequential(extra_stage()) for i in range(num_stages)]


class AuxiliaryClassifier(nn.Module):
    """Branches on the stage features; ``forward(feats)`` → stacked head outputs ``[rows, K, num_outputs]``."""

    def __init__(self, extractors: list[nn.Module], width: int, num_outputs: int, final_bn: bool) -> None:
        super().__init__()
        self.num_heads, self.final_bn = len(extractors), final_bn
        for i, extractor in enumerate(extractors, 1):
            setattr(self, f"block_extractor{i}", extractor)
        if final_bn:
            for i in range(1, self.num_heads + 1):
                setattr(self, f"bn{i}", nn.BatchNorm2d(width))
        self.relu = nn.ReLU()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        for i in range(1, self.num_heads + 1):
            setattr(self, f"fc{i}", nn.Linear(width, num_outputs))
        init_weights(self)  # as the reference: He-normal (fan_out) convs, BN (1, 0), Linear bias 0

    def forward(self, feats: list[Tensor]) -> Tensor:
        heads = []
        for i, f in enumerate(feats, 1):
            h = getattr(self, f"block_extractor{i}")(f)
            if self.final_bn:
                h = self.relu(getattr(self, f"bn{i}")(h))
            heads.append(getattr(self, f"fc{i}")(self.avg_pool(h).flatten(1)))
        return torch.stack(heads, 1)


class _KeepOutput:
    """Forward hook keeping a stage's output for the branches (picklable, deep-copyable)."""

    def __init__(self, store: dict, key: str) -> None:
        self.store, self.key = store, key

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        self.store[self.key] = output


class AuxNet(nn.Module):
    """A backbone with HSAKD auxiliary classifiers; ``forward`` returns the backbone's logits."""

    def __init__(self, backbone: nn.Module, spec: AuxSpec, num_classes: int, factor: int = 4,
                 detach: bool = False) -> None:
        super().__init__()
        self.backbone = backbone
        self.auxiliary_classifier = AuxiliaryClassifier(spec.extractors, spec.width, factor * num_classes,
                                                        spec.final_bn)
        self.aux_factor, self.aux_detach = factor, detach
        self.stage_paths = tuple(spec.stages)
        self.aux_active = True  # outside a TappedModel the branches always run
        self._feats: dict[str, Tensor] = {}
        for path in self.stage_paths:
            backbone.get_submodule(path).register_forward_hook(_KeepOutput(self._feats, path))

    def _heads(self) -> Tensor:
        feats = [self._feats[p] for p in self.stage_paths]
        if self.aux_detach:
            feats = [f.detach() for f in feats]
        return self.auxiliary_classifier(feats)

    def forward(self, x: Tensor) -> Tensor:
        """The logits; the branches run too while a tap reads them (their outputs reach it by hooks)."""
        try:
            logits = self.backbone(x)
            if self.aux_active:
                self._heads()
        finally:
            self._feats.clear()
        return logits

    def forward_aux(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, head outputs ``[rows, K, factor·C]``) whatever the taps: the reference's ``net(x, grad=…)``."""
        try:
            logits = self.backbone(x)
            return logits, self._heads()
        finally:
            self._feats.clear()

    def tap_points(self) -> dict[str, TapPoint]:
        """The backbone's taps (under ``backbone.``), ``aux1..auxK`` and ``aux``."""
        points = {name: TapPoint(f"backbone.{p.module}" if p.module else "backbone", p.where, p.flatten)
                  for name, p in model_tap_points(self.backbone).items()}
        for i in range(1, self.auxiliary_classifier.num_heads + 1):
            points[f"aux{i}"] = TapPoint(f"{HEADS}.fc{i}")
        points["aux"] = TapPoint(HEADS)
        return points

    def pre_relu_bns(self) -> dict[str, str]:
        """The backbone's (OFD's margin source), under ``backbone.``."""
        declared = getattr(self.backbone, "pre_relu_bns", None)
        return {tap: f"backbone.{path}" for tap, path in (declared() if callable(declared) else {}).items()}

    def set_active_taps(self, names: Iterable[str]) -> None:
        """Run the branches only while a requested tap lives inside them."""
        points = self.tap_points()

        def path(name: str) -> str:
            if name in points:
                return points[name].module
            return name[len(MODULE_PREFIX):] if name.startswith(MODULE_PREFIX) else ""

        self.aux_active = any(path(n) == HEADS or path(n).startswith(HEADS + ".") for n in names)


def with_aux_heads(backbone: nn.Module, num_classes: int, factor: int = 4, detach: bool = False) -> AuxNet:
    """``backbone`` with HSAKD auxiliary classifiers; ValueError if its family has none."""
    builder = AUX_FAMILIES.get(type(backbone))
    if builder is None:
        known = ", ".join(sorted(c.__name__ for c in AUX_FAMILIES))
        raise ValueError(f"no HSAKD auxiliary heads for {type(backbone).__name__} (families: {known})")
    return AuxNet(backbone, builder(backbone), num_classes, factor, detach)


def _aux_factory(name: str):
    def factory(in_channels: int = 3, num_classes: int = 100, aux_detach: bool = False, aux_factor: int = 4, **kw):
        if aux_factor < 1:
            raise ValueError(f"aux_factor must be >= 1, got {aux_factor}")
        backbone = get_factory(name)(in_channels=in_channels, num_classes=num_classes, **kw)
        return with_aux_heads(backbone, num_classes, aux_factor, aux_detach)

    factory.__doc__ = f"{name} with HSAKD auxiliary classifiers (taps aux1..auxK, aux)."
    return factory


# ---------------------------------------------------------------------------------------------- families
_RESNETS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
            "resnet32x4")


@aux_family(CifarResNet, _RESNETS)
def _resnet_branches(net: CifarResNet) -> AuxSpec:
    """layer2-like + layer3-like on stage 1, layer3-like on stage 2, one more layer3-like (stride 1) on stage 3."""
    layers = [net.layer1, net.layer2, net.layer3]
    n = len(layers[0])
    width = [net.conv1.out_channels] + [layer[0].conv1.out_channels for layer in layers]
    stride = [layer[0].conv1.stride[0] for layer in layers]

    def make(cin: int, cout: int, s: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(cin, cout, s), *[BasicBlock(cout, cout) for _ in range(n - 1)])

    extractors = _branches(3, lambda k: make(width[k], width[k + 1], stride[k]), lambda: make(width[3], width[3], 1))
    return AuxSpec(["layer1", "layer2", "layer3"], extractors, width[3])


@aux_family(WideResNet, ("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2"))
def _wrn_branches(net: WideResNet) -> AuxSpec:
    """As the ResNet branches with WRN block groups; BN-ReLU before pooling (the net is pre-activation)."""
    blocks = [net.block1, net.block2, net.block3]
    n = len(blocks[0].layer)
    width = [net.conv1.out_channels] + [b.layer[0].conv1.out_channels for b in blocks]
    stride = [b.layer[0].conv1.stride[0] for b in blocks]
    extractors = _branches(3, lambda k: NetworkBlock(n, width[k], width[k + 1], stride[k]),
                           lambda: NetworkBlock(n, width[3], width[3], 1))
    return AuxSpec(["block1", "block2", "block3"], extractors, width[3], final_bn=True)


@aux_family(ConvNet, ("convnet", "convnet_small"))
def _convnet_branches(net: ConvNet) -> AuxSpec:
    """The digits nets, in the same spirit: copies of the later conv-BN-ReLU stages; the last one's branch
    is one more stage of its width with stride 1."""
    convs = [stage.conv for stage in net.stages]
    width = [convs[0].in_channels] + [c.out_channels for c in convs]
    stride = [c.stride[0] for c in convs]

    def make(cin: int, cout: int, s: int) -> nn.Sequential:
        return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, 3, stride=s, padding=1, bias=False),
                                         bn=nn.BatchNorm2d(cout), relu=nn.ReLU()))

    last = len(convs)
    extractors = _branches(last, lambda k: make(width[k], width[k + 1], stride[k]),
                           lambda: make(width[last], width[last], 1))
    return AuxSpec([f"stages.{k}" for k in range(last)], extractors, width[last])
