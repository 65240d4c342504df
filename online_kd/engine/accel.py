"""The accelerator options of ``train``: channels-last memory format and ``torch.compile`` of each peer's forward.

Both change how a peer computes, never what: the peer's weights, state dict and taps
are those of the plain network (tests compare them with the eager fp32 forward).
"""
from __future__ import annotations

import torch
from torch import nn

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


def _channels_last_input(module: nn.Module, args: tuple):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def compile_backend(option: bool | str) -> str | None:
    """The ``torch.compile`` backend that ``train.compile`` names (true: inductor), None when off."""
    if option is False or option is None:
        return None
    return "inductor" if option is True else str(option)


def accelerate(net: nn.Module, tapped: nn.Module, train) -> None:
    """Apply ``train.channels_last`` to ``net`` (weights) and ``tapped`` (inputs), ``train.compile`` to ``tapped``.

    The tapped model is compiled in place (``nn.Module.compile``), so its state dict keeps
    its keys; hooks are guarded, so a stage that asks for other taps recompiles once.
    """
    if getattr(train, "channels_last", False):
        net.to(memory_format=torch.channels_last)
        tapped.register_forward_pre_hook(_channels_last_input)
    backend = compile_backend(getattr(train, "compile", False))
    if backend is not None:
        torch._dynamo.config.skip_nnmodule_hook_guards = False  # taps are hooks: a new set must recompile
        tapped.compile(backend=backend)
