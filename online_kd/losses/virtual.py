"""Virtual teachers: nodes with no network whose output is a hand-made distribution."""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from ..finite import FiniteModel
from .registry import register_virtual


class VirtualParams(FiniteModel):
    model_config = ConfigDict(extra="forbid")


class VirtualTeacher(nn.Module):
    """Answers a batch's labels with ``{'logits': log q}`` for a distribution q."""

    Params = VirtualParams
    name: str

    def __init__(self, params: BaseModel, num_classes: int):
        super().__init__()
        self.params = params
        self.num_classes = num_classes

    def distribution(self, y: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, y: Tensor) -> dict[str, Tensor]:
        return {"logits": torch.log(self.distribution(y).clamp_min(1e-30))}


@register_virtual("uniform")
class Uniform(VirtualTeacher):
    """The uniform distribution. A ``kd`` edge (T=1, α=ε) from it has label smoothing's gradient, but its value
    is the smoothed CE minus ε·ln C; label smoothing itself is the ``label_smoothing`` loss."""

    def distribution(self, y):
        return torch.full((y.shape[0], self.num_classes), 1.0 / self.num_classes, device=y.device)


class TfKDVirtualParams(VirtualParams):
    correct_prob: float = Field(0.99, gt=0, lt=1)
    temperature: float = Field(20.0, gt=0)
    construction: Literal["reference", "paper"] = "reference"


@register_virtual("tfkd")
class TfKDTeacher(VirtualTeacher):
    """Tf-KD's hand-made teacher: p^d has ``correct_prob`` on the label, the rest spread evenly.

    ``construction: reference`` returns softmax(p^d / T) as the official code does (softmax of a
    probability vector, nearly uniform at T=20); ``paper`` returns p^d itself.
    """

    Params = TfKDVirtualParams

    def distribution(self, y):
        p = self.params
        k = self.num_classes
        pd = torch.full((y.shape[0], k), (1.0 - p.correct_prob) / (k - 1), device=y.device)
        pd.scatter_(1, y.view(-1, 1), p.correct_prob)
        return torch.softmax(pd / p.temperature, dim=-1) if p.construction == "reference" else pd
