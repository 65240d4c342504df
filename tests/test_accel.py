"""The GPU path's options, checked on CPU: train.channels_last, train.compile, and bf16 autocast against fp32."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from online_kd.data import build_data
from online_kd.engine.accel import compile_backend
from online_kd.engine.local import LocalEngine, RunOptions
from online_kd.engine.runtime import Runtime
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
BF16_TOLERANCE = 0.05  # |bf16 − fp32| / max|fp32| of logits and losses: bf16 keeps 8 bits of mantissa (≈ 0.4 %)


def quick(name, **overrides):
    raw = yaml.safe_load((ROOT / "topologies" / "quick" / f"{name}.yaml").read_text())
    return load_topology(raw, {"train.epochs": 1, "train.max_steps_per_epoch": 2, **overrides})


def step_losses(out: Path) -> dict[tuple[int, str], float]:
    rows = [json.loads(line) for line in (out / "steps" / "local.jsonl").read_text().splitlines()]
    return {(r["step"], r["peer"]): r["loss"] for r in rows}


def run(topo, out):
    LocalEngine(topo, RunOptions(out_dir=out, tracking=False, quiet=True, record_steps=True)).run()
    return step_losses(out)


def test_compile_backend_names():
    assert compile_backend(False) is None and compile_backend(True) == "inductor"
    assert compile_backend("aot_eager") == "aot_eager"


def test_channels_last_and_compiled_peers_train_as_the_eager_ones(tmp_path):
    """FitNet's hint stage then its KD stage (other taps: a recompile), channels-last weights and inputs,
    compiled with aot_eager (inductor takes over a minute per graph on 2 CPU cores; the GPU script uses it)."""
    plain = run(quick("fitnet"), tmp_path / "eager")
    fast = run(quick("fitnet", **{"train.channels_last": True, "train.compile": "aot_eager"}), tmp_path / "compiled")
    assert plain.keys() == fast.keys() and len(plain) >= 4
    assert max(abs(plain[k] - fast[k]) / abs(plain[k]) for k in plain) <= 1e-4


def test_channels_last_reaches_weights_and_inputs():
    topo = quick("dml", **{"train.channels_last": True})
    data = build_data(topo.config.data, 0)
    rt = Runtime(topo, data.info)
    net = rt.peers["a"].net
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    seen = []
    convs[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    rt.enter_stage(topo.stages[0])
    rt.forward(torch.randn(5, 1, 8, 8), ["a"])
    assert seen == [True]
    assert set(net.state_dict()) == set(Runtime(quick("dml"), data.info).peers["a"].net.state_dict())


@pytest.mark.parametrize("name", ["dml", "fitnet"])
def test_bf16_autocast_on_cpu_is_fp32_within_tolerance(name):
    """Same weights and batch: logits of every peer and the first step's losses agree within BF16_TOLERANCE,
    and bf16 is really used (the logits come out in bf16)."""
    outs, losses = {}, {}
    for precision in ("fp32", "bf16"):
        topo = quick(name, **{"train.precision": precision})
        data = build_data(topo.config.data, 0)
        rt = Runtime(topo, data.info)
        rt.enter_stage(topo.stages[-1])
        batch = next(iter(data.train_stream().epoch(0)))
        outs[precision] = rt.forward(batch.x, list(rt.peers))
        res = rt.train_step(batch, 0, 0)
        losses[precision] = {p: float(t["loss"]) for p, t in res.terms.items()}
    for peer, o in outs["fp32"].items():
        z32, z16 = o["logits"], outs["bf16"][peer]["logits"]
        assert z32.dtype == torch.float32 and z16.dtype == torch.bfloat16
        err = (z16.float() - z32).abs().max() / z32.abs().max()
        assert 0 < err <= BF16_TOLERANCE, (peer, float(err))
    for peer, v in losses["fp32"].items():
        assert abs(losses["bf16"][peer] - v) / abs(v) <= BF16_TOLERANCE, (peer, v, losses["bf16"][peer])
