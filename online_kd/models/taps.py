"""Taps: named intermediate outputs of a model, captured with persistent forward hooks.

A zoo model declares where its taps live with ``tap_points() -> dict[str, TapPoint]``
(the input or output of a submodule, by dotted path).  :class:`TappedModel` registers
one hook per *requested* tap, once, so the model's own ``forward`` stays the plain
forward and a step with no taps costs nothing extra.

Tap names every zoo model exposes:

* ``stem``            output of the stem (before the first stage), where there is one;
* ``stage1..stageN``  output of each stage;
* ``stageK_pre``      the same point before the stage's final ReLU (RepDistiller ``preact``);
* ``pool``            flattened penultimate features ``[B, D]`` = input of the final Linear;
* ``logits``          the model output (always returned by :class:`TappedModel`);
* ``probs``           its softmax (T=1, float32): all a black-box peer lets out (``peers.X.blackbox``);
* ``module:<path>``   the output of any submodule (``model.get_submodule(path)``), any model.

Models without ``tap_points()`` (torchvision, user models) get generic taps:
``pool`` = input of the last ``nn.Linear`` and ``stageK`` = output of ``layerK``.

A model may also declare ``pre_relu_bns() -> dict[str, str]``: for a pre-ReLU tap, the
path of the BatchNorm whose affine output it is (OFD reads the margin from its γ, β);
:func:`bn_before` looks it up.

A model may declare ``set_active_taps(names)``: :class:`TappedModel` tells it which taps are
requested, so it can skip work only a tap reads (HSAKD's auxiliary heads, ``aux1..auxK``/``aux``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal

import torch
from torch import nn

LOGITS = "logits"
PROBS = "probs"
MODULE_PREFIX = "module:"


@dataclass(frozen=True)
class TapPoint:
    """Where a tap lives: the ``input`` or ``output`` of the submodule at dotted path ``module``.

    ``module=""`` is the model itself.  ``flatten`` flattens the tensor to ``[B, -1]``
    (for ``pool`` taps whose module input is not flat yet).
    """

    module: str
    where: Literal["input", "output"] = "output"
    flatten: bool = False

    def __post_init__(self) -> None:
        if self.where not in ("input", "output"):
            raise ValueError(f"TapPoint.where must be 'input' or 'output', not {self.where!r}")


def stage_points(index: int, output: str, pre: str, pre_where: str = "input") -> dict[str, TapPoint]:
    """``stage{index}`` = output of ``output``; ``stage{index}_pre`` = ``pre_where`` of ``pre``."""
    return {
        f"stage{index}": TapPoint(output, "output"),
        f"stage{index}_pre": TapPoint(pre, pre_where),  # type: ignore[arg-type]
    }


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, TappedModel) else model


def _generic_tap_points(model: nn.Module) -> dict[str, TapPoint]:
    """Taps for models that declare none: ``stageK`` = ``layerK`` output, ``pool`` = input of the last Linear."""
    points: dict[str, TapPoint] = {}
    k = 1
    while isinstance(getattr(model, f"layer{k}", None), nn.Module):
        points[f"stage{k}"] = TapPoint(f"layer{k}")
        k += 1
    last_linear = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last_linear = name
    if last_linear is not None:
        points["pool"] = TapPoint(last_linear, "input", flatten=True)
    return points


def tap_points(model: nn.Module) -> dict[str, TapPoint]:
    """Named tap points of ``model`` (its declared ``tap_points()``, else the generic ones); no ``logits``."""
    model = _unwrap(model)
    declared = getattr(model, "tap_points", None)
    points = dict(declared()) if callable(declared) else _generic_tap_points(model)
    points.pop(LOGITS, None)
    return points


def available_taps(model: nn.Module) -> list[str]:
    """Names of the named taps of ``model`` (``logits`` and ``probs`` included, generic ``module:`` taps not)."""
    return [*tap_points(model), LOGITS, PROBS]


def resolve_tap(model: nn.Module, name: str, points: dict[str, TapPoint] | None = None) -> TapPoint | None:
    """The TapPoint for tap ``name`` (None for ``logits``/``probs``); ValueError naming the available taps if unknown."""
    model = _unwrap(model)
    if name in (LOGITS, PROBS):
        return None
    if points is None:
        points = tap_points(model)
    if name in points:
        point = points[name]
    elif name.startswith(MODULE_PREFIX) and name != MODULE_PREFIX:
        point = TapPoint(name[len(MODULE_PREFIX):], "output")
    else:
        avail = ", ".join([*points, LOGITS, "module:<path>", PROBS])
        raise ValueError(f"no tap '{name}' (taps: {avail})")
    try:
        model.get_submodule(point.module)
    except AttributeError:
        avail = ", ".join([*points, LOGITS, "module:<path>", PROBS])
        raise ValueError(
            f"no tap '{name}' (no submodule '{point.module}' in {type(model).__name__}; taps: {avail})"
        ) from None
    return point


def bn_before(model: nn.Module, tap: str) -> nn.BatchNorm2d:
    """The BatchNorm2d whose output feeds pre-ReLU tap ``tap`` (the model's ``pre_relu_bns()``).

    ValueError if the model declares none, or none for this tap.
    """
    model = _unwrap(model)
    declared = getattr(model, "pre_relu_bns", None)
    if not callable(declared):
        raise ValueError(f"{type(model).__name__} does not declare the BatchNorm before its pre-ReLU taps "
                         "(pre_relu_bns(); declared by the CIFAR ResNets, WRNs and convnet)")
    bns = declared()
    if tap not in bns:
        raise ValueError(f"{type(model).__name__} declares no BatchNorm before tap '{tap}' "
                         f"(it does for: {', '.join(bns) or 'none'})")
    bn = model.get_submodule(bns[tap])
    if not isinstance(bn, nn.BatchNorm2d) or not bn.affine:
        raise ValueError(f"'{bns[tap]}' before tap '{tap}' of {type(model).__name__} is not an affine BatchNorm2d")
    return bn


class _Capture:
    """Hook that stores one tensor under a tap name in a shared dict (picklable, deep-copyable)."""

    def __init__(self, store: dict[str, Any], name: str, flatten: bool) -> None:
        self.store = store
        self.name = name
        self.flatten = flatten

    def _put(self, value: Any) -> None:
        if self.flatten and isinstance(value, torch.Tensor) and value.dim() > 2:
            value = value.flatten(1)
        self.store[self.name] = value


class _CaptureInput(_Capture):
    """Forward-pre-hook: captures the first positional input of the module."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self._put(args[0])


class _CaptureOutput(_Capture):
    """Forward hook: captures the output of the module."""

    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._put(output)


def _logits_of(out: Any) -> torch.Tensor:
    """The logits tensor of a model output (torchvision's GoogLeNet/Inception tuples included)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out:
        return out[0]
    raise TypeError(f"cannot find logits in model output of type {type(out).__name__}")


def _announce(model: nn.Module, taps: tuple[str, ...]) -> None:
    """Tell a model that declares ``set_active_taps`` which taps are requested now."""
    declared = getattr(model, "set_active_taps", None)
    if callable(declared):
        declared(taps)


class TappedModel(nn.Module):
    """Wraps a model; ``forward(x)`` returns ``{tap: tensor}`` with ``logits`` plus the requested taps.

    Hooks are registered once (here or in :meth:`set_taps`) and only for the requested
    taps.  Tensors keep autograd (no detach).  If a hooked module runs several times
    in one forward, the last call wins.  Taps see the tensor the module produced: an
    in-place op on it later in the forward would change it (zoo models use none).
    ``state_dict()`` of ``.model`` is the plain model's.
    """

    def __init__(self, model: nn.Module, taps: Iterable[str] = ()) -> None:
        super().__init__()
        self.model = model
        self._captured: dict[str, Any] = {}
        self._handles: list[Any] = []
        self._taps: tuple[str, ...] = ()
        self.set_taps(taps)

    @property
    def taps(self) -> tuple[str, ...]:
        """The requested taps, in request order (may include ``logits``)."""
        return self._taps

    def available_taps(self) -> list[str]:
        """Named taps of the wrapped model."""
        return available_taps(self.model)

    def set_taps(self, taps: Iterable[str]) -> "TappedModel":
        """Replace the requested taps: validate all, then remove the old hooks and register new ones."""
        if isinstance(taps, str):
            taps = [taps]
        requested = tuple(dict.fromkeys(taps))
        points = tap_points(self.model)
        resolved = {name: resolve_tap(self.model, name, points) for name in requested}
        self.remove_hooks()
        for name, point in resolved.items():
            if point is None:  # logits (the forward's return value) or probs (its softmax)
                continue
            module = self.model.get_submodule(point.module)
            if point.where == "input":
                handle = module.register_forward_pre_hook(_CaptureInput(self._captured, name, point.flatten))
            else:
                handle = module.register_forward_hook(_CaptureOutput(self._captured, name, point.flatten))
            self._handles.append(handle)
        self._taps = requested
        _announce(self.model, requested)
        return self

    def remove_hooks(self) -> None:
        """Remove every hook this wrapper put on the model (the model is then hook-free again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._taps = ()
        _announce(self.model, ())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        captured = self._captured
        captured.clear()
        try:
            result = {LOGITS: _logits_of(self.model(x, *args, **kwargs))}
            for name in self._taps:
                if name == LOGITS:
                    continue
                if name == PROBS:
                    result[PROBS] = torch.softmax(result[LOGITS].float(), dim=-1)
                    continue
                try:
                    result[name] = captured[name]
                except KeyError:
                    raise RuntimeError(
                        f"tap '{name}' was not computed: its module did not run in forward"
                    ) from None
        finally:
            captured.clear()  # hold no activations between steps
        return result

    def extra_repr(self) -> str:
        return f"taps={list(self._taps)}"
