"""Prefetching loader processes (data.workers, data.prefetch): the same batches bit for bit as loading in the
training thread, for every worker count, sampler, shard, view and resume point; workers end with their epoch."""
from __future__ import annotations

import multiprocessing
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch
import yaml

from online_kd.data import Batch, BatchStream, build_data
from online_kd.data.prefetch import LoaderOptions
from online_kd.engine import checkpoint as ckpt
from online_kd.engine.local import LocalEngine, RunOptions
from online_kd.topology import load_topology

ROOT = Path(__file__).resolve().parents[1]
WORKERS = [0, 1, 2]


def data_cfg(dataset="digits", **kw):
    base = dict(dataset=dataset, root="~/data", download=False, batch_size=48, test_batch_size=None,
                augment="standard", holdout=0.0, image_size=None, sampler="random",
                synthetic=NS(num_train=203, num_test=60, shape=(3, 12, 12), num_classes=5))
    base.update(kw)
    return NS(**base)


def assert_same(a: list[Batch], b: list[Batch]):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u.index, v.index) and torch.equal(u.y, v.y) and torch.equal(u.x, v.x)
        assert (u.pair is None) == (v.pair is None)
        if u.pair is not None:
            assert_same([u.pair], [v.pair])


def stream(bundle, workers: int, **kw) -> BatchStream:
    return BatchStream(bundle.train, bundle.batch_size, bundle.seed, transform=bundle.train_transform,
                       sampler=bundle.train_sampler, loader=LoaderOptions(workers, prefetch=2), **kw)


def write_jpegs(root: Path, per_class=(5, 2)):
    from PIL import Image

    rng = random.Random(0)
    for split, n in zip(("train", "val"), per_class):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = np.random.default_rng(rng.randint(0, 10**6)).integers(0, 256, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.jpg", quality=90)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    jpegs = tmp_path_factory.mktemp("jpegs")
    write_jpegs(jpegs)
    return {
        "digits": build_data(data_cfg(), seed=5),
        "class_paired": build_data(data_cfg(sampler="class_paired"), seed=5),
        "imagefolder": build_data(data_cfg("imagefolder", root=str(jpegs), image_size=8, batch_size=3), seed=5),
    }


@pytest.mark.parametrize("kind", ["digits", "class_paired", "imagefolder"])
def test_every_worker_count_gives_the_same_batches(bundles, kind):
    b = bundles[kind]
    for epoch in (0, 1):
        expected = list(stream(b, 0).epoch(epoch))
        assert len(expected) > 2 and (kind != "class_paired" or expected[0].pair is not None)
        for w in WORKERS[1:]:
            assert_same(list(stream(b, w).epoch(epoch)), expected)
            assert_same(list(stream(b, w).epoch(epoch, start_batch=2)), expected[2:])  # resume mid-epoch
    assert not torch.equal(expected[0].x, list(stream(b, 2).epoch(0))[0].x)  # epochs differ: not a constant


@pytest.mark.parametrize("workers", WORKERS[1:])
def test_shards_for_replicas_are_unchanged(bundles, workers):
    b = bundles["class_paired"]
    for r in range(2):
        assert_same(list(stream(b, workers, num_shards=2, shard=r).epoch(1)),
                    list(stream(b, 0, num_shards=2, shard=r).epoch(1)))


def test_workers_end_with_the_epoch_and_when_it_is_left_early(bundles):
    s = stream(bundles["digits"], 2)
    list(s.epoch(0))
    assert multiprocessing.active_children() == []
    it = s.epoch(1)
    next(it)
    assert len(multiprocessing.active_children()) == 2
    it.close()  # a loop that breaks (max_steps_per_epoch) drops its iterator
    assert multiprocessing.active_children() == []


def test_pinned_only_for_cuda_consumers():
    opts = LoaderOptions(2, 3)
    assert opts.on("cpu").pin_memory is False and opts.on("cuda:0").pin_memory is True
    assert opts.on("cuda").workers == 2 and opts.on("cuda").prefetch == 3


def test_bundle_streams_carry_the_configured_loader():
    b = build_data(data_cfg(workers=2, prefetch=4), seed=0)
    assert b.train_stream().loader == LoaderOptions(2, 4) == b.eval_stream().loader
    assert build_data(data_cfg(), seed=0).loader == LoaderOptions(0, 2)


# ---------------------------------------------------------------- both engines' loop: whole runs

def quick(name, **overrides):
    raw = yaml.safe_load((ROOT / "topologies" / "quick" / f"{name}.yaml").read_text())
    return load_topology(raw, {"train.max_steps_per_epoch": 3, "train.epochs": 2, **overrides})


def run(topo, out, **kw):
    LocalEngine(topo, RunOptions(out_dir=Path(out), tracking=False, quiet=True, **kw)).run()
    return final_weights(out)


def final_weights(out) -> dict:
    path = ckpt.latest_checkpoint(Path(out) / "checkpoints")
    return {f.name: ckpt.load(f)["model"] for f in sorted(path.glob("*.pt")) if f.name != ckpt.ENGINE_FILE}


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)


@pytest.mark.parametrize("name", ["cskd", "kdcl_general"])  # a sampler's pair fields; peers with their own views
def test_local_runs_are_identical_with_loader_workers(tmp_path, name):
    expected = run(quick(name), tmp_path / "w0")
    assert_same_weights(run(quick(name, **{"data.workers": 2}), tmp_path / "w2"), expected)


def test_stop_and_resume_with_workers_equals_a_whole_run(tmp_path):
    whole = run(quick("dml", **{"train.epochs": 3}), tmp_path / "whole")
    topo = quick("dml", **{"train.epochs": 3, "data.workers": 1, "data.prefetch": 1})
    run(topo, tmp_path / "split", stop_after_epochs=1)
    assert_same_weights(run(topo, tmp_path / "split", resume=True), whole)


@pytest.mark.parametrize("override, place", [
    ("data.workers=-1", "data.workers: "), ("data.workers=two", "data.workers: "),
    ("data.prefetch=0", "data.prefetch: "), ("train.channels_last=maybe", "train.channels_last: "),
    ("train.compile=tvm", "train.compile: "),
])
def test_bad_loader_and_accelerator_fields_are_one_line_exit_2(tmp_path, override, place):
    r = subprocess.run([sys.executable, "-m", "online_kd.cli", "validate", ROOT / "topologies/quick/dml.yaml",
                        "--set", override], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith(f"error: {place}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
