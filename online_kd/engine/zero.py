"""DeepSpeed ZeRO-1/2 inside one peer's replica group (ray engine).

DeepSpeed's data-parallel group is the peer's replica group, handed over through a minimal
Megatron-style ``mpu``; ZeRO-3 is refused because its trace checks run over the whole world,
where ranks hold different models. The peer's optimizer and schedule still come from the YAML.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import TopologyError


class ReplicaMPU:
    """What DeepSpeed asks of an mpu: data parallel = the replica group, no model parallelism."""

    def __init__(self, replica_group, own_group):
        self.dp, self.mp = replica_group, own_group

    def get_data_parallel_group(self):
        return self.dp

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.dp)

    def get_data_parallel_rank(self):
        return dist.get_rank(self.dp)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.dp)

    def get_model_parallel_group(self):
        return self.mp

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


def read_config(peer: str, path: str) -> dict:
    """The peer's DeepSpeed JSON, checked: ZeRO stage 1 or 2, no optimizer or scheduler of its own."""
    where = f"peers.{peer}.deepspeed.config"
    p = Path(path).expanduser()
    if not p.is_file():
        raise TopologyError(where, f"no such DeepSpeed config '{path}'")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise TopologyError(where, f"not valid JSON ({err})") from None
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise TopologyError(where, f"ZeRO stage {stage} is not supported: use 1 or 2 (stage 3 checks module traces "
                                   "over all ranks, which hold different peers)")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise TopologyError(where, f"remove '{key}': the peer's optimizer and schedule come from the topology")
    return cfg


def wrap(peer, cfg: dict, micro_batch: int, replica_group, own_group):
    """A DeepSpeed engine over the peer (its net and edge modules) with the peer's own optimizer."""
    import deepspeed

    cfg = {**cfg, "train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
           "zero_allow_untested_optimizer": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=peer, optimizer=peer.optimizer, config=cfg,
                                                   mpu=ReplicaMPU(replica_group, own_group), dist_init_required=False)
    return engine


def state_file(peer: str, replica: int) -> str:
    """The checkpoint file of one replica's ZeRO optimizer partition."""
    return f"peer_{peer}.zero{replica}.pt"


def optimizer_state(peer) -> dict:
    """A replica's ZeRO optimizer partition, with tensors and plain values only (loadable weights_only)."""
    sd = dict(peer.ds.optimizer.state_dict())
    sd.pop("loss_scaler", None)  # a DeepSpeed object; fp32 training keeps the static scale of 1
    return sd


def load_optimizer_state(path: Path) -> dict:
    """weights_only load of a ZeRO partition, allowing DeepSpeed's own plain types (enums, fragment records)."""
    import importlib

    from .checkpoint import load

    allowed = []
    for qual in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        if not qual.startswith("deepspeed."):
            raise RuntimeError(f"{path}: unexpected type {qual} in a ZeRO checkpoint")
        module, _, attr = qual.rpartition(".")
        allowed.append(getattr(importlib.import_module(module), attr))
    with torch.serialization.safe_globals(allowed):
        return load(path)
