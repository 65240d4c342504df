"""online_kd.data: splits, seeded augmentation and the deterministic batch stream."""
from __future__ import annotations

import pickle
import random
from types import SimpleNamespace as NS

import numpy as np
import pytest
import torch

from online_kd.data import (Batch, BatchStream, DataError, PadCropFlip, SyntheticDataset, build_data,
                            dataset_info, stratified_split)
from online_kd.data.hashing import MASK32, below, mix64, sample_uint32, sample_uint32_py


def make_cfg(dataset="digits", **kw):
    base = dict(dataset=dataset, root="~/data", download=False, batch_size=64, test_batch_size=None,
                augment="standard", holdout=0.0, image_size=None,
                synthetic=NS(num_train=203, num_test=60, shape=(3, 12, 12), num_classes=5))
    base.update(kw)
    return NS(**base)


@pytest.fixture(scope="module")
def digits():
    return build_data(make_cfg("digits"), seed=7)


@pytest.fixture(scope="module")
def synthetic_aug():
    """Synthetic train split with a crop+flip augmentation (synthetic has none by default)."""
    b = build_data(make_cfg("synthetic"), seed=3)
    return b.train, PadCropFlip(3, pad=2, flip=True, fill=b.train.pad_fill)


def collect(stream: BatchStream, epoch: int, start_batch: int = 0) -> list[Batch]:
    return list(stream.epoch(epoch, start_batch))


def cat(batches: list[Batch]) -> Batch:
    return Batch(*(torch.cat(t) for t in zip(*(b[:3] for b in batches))))  # x, y, index (pair: None here)


def assert_batches_equal(a: list[Batch], b: list[Batch]):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert torch.equal(u.index, v.index)
        assert torch.equal(u.y, v.y)
        assert torch.equal(u.x, v.x)


# ---------------------------------------------------------------- hashing

def test_tensor_hash_matches_python_reference():
    key = mix64("test", 12345, 3)
    idx = torch.tensor([0, 1, 2, 17, 2**31 - 1, 2**32 + 5, 10**12])
    got = sample_uint32(key, idx).tolist()
    assert got == [sample_uint32_py(key, i) for i in idx.tolist()]
    assert all(0 <= v <= MASK32 for v in got)


def test_hash_draws_are_roughly_uniform():
    h = sample_uint32(mix64("uniform"), torch.arange(90000))
    counts = torch.bincount(below(h, 9), minlength=9).float()
    assert counts.min() > 0.95 * 10000 and counts.max() < 1.05 * 10000
    assert len(torch.unique(h)) > 89990


# ---------------------------------------------------------------- shards

@pytest.mark.parametrize("which", ["digits", "synthetic"])
@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_concatenate_to_the_global_batch(which, num_shards, digits, synthetic_aug):
    if which == "digits":
        ds, aug = digits.train, digits.train_transform
        assert aug is not None
    else:
        ds, aug = synthetic_aug
    batch = 100 if which == "digits" else 64          # 1437 % 100 and 203 % 64: last batch partial
    assert len(ds) % batch != 0
    whole = BatchStream(ds, batch, seed=11, transform=aug)
    shards = [BatchStream(ds, batch, seed=11, transform=aug, num_shards=num_shards, shard=r)
              for r in range(num_shards)]
    for epoch in (0, 1):
        one = collect(whole, epoch)
        parts = [collect(s, epoch) for s in shards]
        assert len(one) == len(whole) == len(parts[0])
        assert len(one[-1].index) == len(ds) % batch
        for b, full in enumerate(one):
            pieces = [p[b] for p in parts]
            sizes = [len(p.index) for p in pieces]
            assert max(sizes) - min(sizes) <= 1
            assert_batches_equal([full], [cat(pieces)])
        # the epoch covers the split exactly once
        assert torch.equal(torch.sort(torch.cat([b.index for b in one])).values, torch.arange(len(ds)))


def test_every_peer_sees_the_same_batches(digits):
    a = BatchStream(digits.train, 64, seed=5, transform=digits.train_transform)
    b = BatchStream(digits.train, 64, seed=5, transform=digits.train_transform)
    assert_batches_equal(collect(a, 2), collect(b, 2))


def test_empty_shards_are_still_yielded(synthetic_aug):
    ds = synthetic_aug[0].subset(torch.arange(5))
    streams = [BatchStream(ds, 4, seed=0, num_shards=3, shard=r) for r in range(3)]
    sizes = [[len(b.index) for b in s.epoch(0)] for s in streams]
    assert sizes == [[2, 1], [1, 0], [1, 0]]
    empty = list(streams[2].epoch(0))[1]
    assert empty.x.shape == (0, 3, 12, 12) and empty.y.dtype == torch.int64


def test_drop_last(digits):
    s = BatchStream(digits.train, 100, seed=0, drop_last=True)
    assert len(s) == len(digits.train) // 100
    assert all(len(b.index) == 100 for b in s.epoch(0))


def test_bad_shard_arguments(digits):
    with pytest.raises(ValueError):
        BatchStream(digits.train, 8, seed=0, num_shards=2, shard=2)
    with pytest.raises(ValueError):
        BatchStream(digits.train, 0, seed=0)


# ---------------------------------------------------------------- determinism

def test_same_seed_and_epoch_same_stream_else_different(digits):
    aug = digits.train_transform
    s = BatchStream(digits.train, 64, seed=1, transform=aug)
    e0, e0_again, e1 = collect(s, 0), collect(s, 0), collect(s, 1)
    assert_batches_equal(e0, e0_again)
    assert not torch.equal(e0[0].index, e1[0].index)

    # different epoch: different augmentation of the same sample
    idx = torch.arange(len(digits.train))
    p0, p1 = aug.params(idx, 0), aug.params(idx, 1)
    assert not torch.equal(torch.stack(p0[:2]), torch.stack(p1[:2]))

    # different seed: different order and augmentation
    other_aug = build_data(make_cfg("digits"), seed=8).train_transform
    other = BatchStream(digits.train, 64, seed=2, transform=other_aug)
    o0 = collect(other, 0)
    assert not torch.equal(e0[0].index, o0[0].index)
    assert not torch.equal(torch.stack(aug.params(idx, 0)[:2]), torch.stack(other_aug.params(idx, 0)[:2]))


def test_augmentation_depends_only_on_sample_index(digits, synthetic_aug):
    for ds, aug in [(digits.train, digits.train_transform), synthetic_aug]:
        by_index = []
        for batch, seed in [(32, 0), (50, 1)]:
            # different batch sizes and orders: every sample lands in a different batch/position
            s = BatchStream(ds, batch, seed=seed, transform=aug)
            got = cat(collect(s, 4))
            order = torch.argsort(got.index)
            by_index.append(got.x[order])
        assert torch.equal(by_index[0], by_index[1])
        # and it does something
        plain, _ = ds.get(torch.arange(len(ds)))
        assert not torch.equal(plain, by_index[0])


def test_digits_augmentation_is_a_crop_without_flip(digits):
    dy, dx, flip = digits.train_transform.params(torch.arange(len(digits.train)), 0)
    assert not flip.any()
    assert set(dy.tolist()) == {0, 1, 2} and set(dx.tolist()) == {0, 1, 2}


def test_padding_equals_zero_padding_raw_pixels_then_normalising(digits):
    """PadCropFlip on normalised data == pad raw zeros, crop, flip, normalise (RepDistiller order)."""
    ds = digits.train
    idx = torch.arange(40)
    aug = PadCropFlip(9, pad=3, flip=True, fill=ds.pad_fill)
    x, _ = ds.get(idx)
    got = aug(x, idx, epoch=2)
    raw = ds.data[ds.rows[idx]]                      # values / 16, before normalisation
    dy, dx, flip = aug.params(idx, 2)
    padded = torch.nn.functional.pad(raw, (3, 3, 3, 3), value=0.0)
    for i in range(len(idx)):
        crop = padded[i, :, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8]
        if flip[i]:
            crop = crop.flip(-1)
        want = (crop - ds.mean.view(-1, 1, 1)) / ds.std.view(-1, 1, 1)
        torch.testing.assert_close(got[i], want)
    assert flip.any() and not flip.all()


def test_start_batch_skips_exactly_the_first_batches(digits):
    s = BatchStream(digits.train, 64, seed=4, transform=digits.train_transform)
    full = collect(s, 3)
    assert_batches_equal(collect(s, 3, start_batch=5), full[5:])
    assert collect(s, 3, start_batch=len(s)) == []
    two = [BatchStream(digits.train, 64, seed=4, transform=digits.train_transform, num_shards=2, shard=r)
           for r in range(2)]
    resumed = [cat([a, b]) for a, b in zip(collect(two[0], 3, 7), collect(two[1], 3, 7))]
    assert_batches_equal(resumed, full[7:])


# ---------------------------------------------------------------- digits splits

def test_digits_splits(digits):
    info = digits.info
    assert (info.num_train, info.num_test, info.num_classes, info.in_channels) == (1437, 360, 10, 1)
    assert info == dataset_info(make_cfg("digits"))
    assert len(digits.train) == 1437 and len(digits.test) == 360 and digits.holdout is None
    b = next(digits.train_stream().epoch(0))
    assert b.x.shape == (64, 1, 8, 8) and b.x.dtype == torch.float32
    assert b.y.dtype == torch.int64 and b.index.dtype == torch.int64
    assert set(torch.unique(digits.test.targets).tolist()) == set(range(10))
    assert not set(digits.train.rows.tolist()) & set(digits.test.rows.tolist())
    # train statistics standardise the train split
    x, _ = digits.train.get(torch.arange(len(digits.train)))
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_digits_split_and_holdout_do_not_depend_on_the_seed(digits):
    a = build_data(make_cfg("digits", holdout=0.25), seed=0)
    b = build_data(make_cfg("digits", holdout=0.25), seed=123)
    assert torch.equal(a.test.rows, digits.test.rows)
    assert torch.equal(a.holdout.rows, b.holdout.rows) and torch.equal(a.train.rows, b.train.rows)
    assert len(a.holdout) == 360 and len(a.train) == 1437 - 360
    assert a.info == dataset_info(make_cfg("digits", holdout=0.25))
    assert a.info.num_holdout == 360
    assert not set(a.train.rows.tolist()) & set(a.holdout.rows.tolist())
    assert set(a.train.rows.tolist()) | set(a.holdout.rows.tolist()) == set(digits.train.rows.tolist())
    # stratified: every class gives its share
    counts = torch.bincount(a.holdout.targets, minlength=10)
    assert counts.min() >= 33 and counts.max() <= 39


def test_test_split_is_not_shuffled_nor_augmented(digits):
    s = build_data(make_cfg("digits", test_batch_size=100), seed=1).eval_stream("test")
    batches = collect(s, 5)
    assert [len(b.index) for b in batches] == [100, 100, 100, 60]
    got = cat(batches)
    assert torch.equal(got.index, torch.arange(360))
    x, y = digits.test.get(torch.arange(360))
    assert torch.equal(got.x, x) and torch.equal(got.y, y)
    with pytest.raises(DataError, match="data.holdout"):
        digits.eval_stream("holdout")


def test_stratified_split_small_and_exact():
    targets = torch.arange(100) % 10
    keep, take = stratified_split(targets, 0.05, "x")
    assert len(take) == 5 and len(keep) == 95 and len(torch.unique(targets[take])) == 5
    keep2, take2 = stratified_split(targets, 0.05, "x")
    assert torch.equal(take, take2)


def test_holdout_and_augment_none():
    b = build_data(make_cfg("synthetic", holdout=0.1, augment="none", test_batch_size=16), seed=0)
    assert b.train_transform is None and len(b.holdout) == 21 and len(b.train) == 182
    assert b.info.num_train == 182 and b.info.num_holdout == 21
    assert [len(x.index) for x in b.eval_stream("holdout").epoch(0)] == [16, 5]
    assert build_data(make_cfg("digits", augment="none"), seed=0).train_transform is None


# ---------------------------------------------------------------- synthetic

def test_synthetic_shapes_and_learnability():
    cfg = make_cfg("synthetic", batch_size=50)
    b = build_data(cfg, seed=0)
    assert b.info == dataset_info(cfg)
    assert (b.info.in_channels, b.info.num_classes, b.info.image_size) == (3, 5, (12, 12))
    assert (len(b.train), len(b.test)) == (203, 60)
    batch = next(b.train_stream().epoch(0))
    assert batch.x.shape == (50, 3, 12, 12)
    assert torch.bincount(b.train.targets, minlength=5).tolist() == [41, 41, 41, 40, 40]

    xtr, ytr = b.train.get(torch.arange(len(b.train)))
    means = torch.stack([xtr[ytr == k].mean(0) for k in range(5)])
    d = torch.cdist(means.flatten(1), means.flatten(1))
    assert d[~torch.eye(5, dtype=torch.bool)].min() > 5     # class means differ clearly
    xte, yte = b.test.get(torch.arange(len(b.test)))
    pred = torch.cdist(xte.flatten(1), means.flatten(1)).argmin(1)
    assert (pred == yte).float().mean() > 0.9                # nearest class mean learns it

    # pure function of the index, independent of the run seed, test differs from train
    again = build_data(cfg, seed=99)
    x1, _ = again.train.get(torch.tensor([5, 0, 200]))
    torch.testing.assert_close(x1, xtr[[5, 0, 200]], rtol=0, atol=0)
    assert not torch.equal(xte[:5], xtr[:5])


def test_synthetic_large_is_lazy():
    ds = SyntheticDataset(10**6, (3, 32, 32), 100, "train")
    x, y = ds.get(torch.tensor([999_999, 3]))
    assert x.shape == (2, 3, 32, 32) and y.max() < 100
    assert abs(x.std().item() - 1.4) < 0.5


# ---------------------------------------------------------------- CIFAR

def test_dataset_info_needs_no_files(tmp_path):
    for name, k in [("cifar10", 10), ("cifar100", 100)]:
        info = dataset_info(make_cfg(name, root=str(tmp_path / "nothing"), holdout=0.1))
        assert (info.in_channels, info.num_classes, info.image_size) == (3, k, (32, 32))
        assert (info.num_train, info.num_holdout, info.num_test) == (45000, 5000, 10000)
    with pytest.raises(DataError, match="data.root"):
        dataset_info(make_cfg("imagefolder", root=str(tmp_path / "nothing")))
    with pytest.raises(DataError, match="data.dataset"):
        dataset_info(make_cfg("mnist"))


@pytest.mark.parametrize("name,label", [("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")])
def test_missing_cifar_is_a_data_error(tmp_path, name, label):
    with pytest.raises(DataError) as e:
        build_data(make_cfg(name, root=str(tmp_path)), seed=0)
    msg = str(e.value)
    assert msg.startswith(f"data.root: {label} not found under {tmp_path}")
    assert "data.download: true" in msg
    folder = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    assert f"expected the folder {tmp_path / folder}/" in msg and "--set data.root=DIR" in msg
    assert isinstance(e.value, ValueError)


def test_corrupt_cifar_is_a_data_error(tmp_path):
    _write_fake_cifar10(tmp_path)                      # md5 sums do not match
    with pytest.raises(DataError, match="data.root: CIFAR-10 under .* is incomplete or corrupt"):
        build_data(make_cfg("cifar10", root=str(tmp_path)), seed=0)


def _write_fake_cifar10(root, n_train_per_batch=6, n_test=5):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}

    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train_per_batch)))
    (d / "test_batch").write_bytes(pickle.dumps(batch(n_test)))
    (d / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))


def test_cifar_loading_and_augmentation(tmp_path, monkeypatch):
    """A tiny fake CIFAR-10 on disk (integrity check off): uint8 storage, normalisation, pad 4 + crop + flip."""
    import torchvision

    _write_fake_cifar10(tmp_path)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_load_meta", lambda self: None)
    b = build_data(make_cfg("cifar10", root=str(tmp_path), batch_size=8), seed=0)
    assert (len(b.train), len(b.test), b.info.num_classes) == (30, 5, 10)
    assert b.train.data.dtype == torch.uint8 and b.train.data.shape == (30, 3, 32, 32)
    x, _ = b.test.get(torch.arange(5))
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (b.test.data.float() / 255 - mean) / std)
    aug = b.train_transform
    assert (aug.pad, aug.flip) == (4, True)
    dy, dx, flip = aug.params(torch.arange(30), 0)
    assert dy.max() <= 8 and dx.max() <= 8
    shards = [collect(BatchStream(b.train, 8, 0, aug, num_shards=2, shard=r), 0) for r in range(2)]
    assert_batches_equal([cat(list(p)) for p in zip(*shards)], collect(b.train_stream(), 0))


# ---------------------------------------------------------------- imagefolder

def _write_image_folder(root, classes=("cat", "dog", "emu"), per_class=(4, 2)):
    from PIL import Image

    rng = random.Random(0)
    for split, n in zip(("train", "val"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                w, h = rng.randint(10, 20), rng.randint(10, 20)
                arr = np.random.default_rng(rng.randint(0, 10**6)).integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")


def test_imagefolder_from_pngs(tmp_path):
    _write_image_folder(tmp_path)
    cfg = make_cfg("imagefolder", root=str(tmp_path), image_size=8, batch_size=5)
    info = dataset_info(cfg)
    assert (info.in_channels, info.num_classes, info.image_size) == (3, 3, (8, 8))
    b = build_data(cfg, seed=1)
    assert (b.info.num_train, b.info.num_test) == (12, 6)
    assert b.train.targets.tolist() == [0] * 4 + [1] * 4 + [2] * 4

    test = cat(collect(b.eval_stream(), 0))
    assert test.x.shape == (6, 3, 8, 8) and test.y.tolist() == [0, 0, 1, 1, 2, 2]

    one = collect(b.train_stream(), 0)
    assert [len(x.index) for x in one] == [5, 5, 2] and one[0].x.shape == (5, 3, 8, 8)
    two = [collect(b.train_stream(num_shards=2, shard=r), 0) for r in range(2)]
    assert_batches_equal([cat(list(p)) for p in zip(*two)], one)
    assert_batches_equal(collect(b.train_stream(), 0), one)

    # one loading thread gives the same result as several; the augmentation does something
    b.train.workers = 1
    assert_batches_equal(collect(b.train_stream(), 0), one)
    plain, _ = b.train.get(one[0].index)
    assert not torch.equal(plain, one[0].x)
    e0, e1 = cat(one), cat(collect(b.train_stream(), 1))
    assert not torch.equal(e0.x[torch.argsort(e0.index)], e1.x[torch.argsort(e1.index)])


def test_imagefolder_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="neither val/ nor test/"):
        build_data(make_cfg("imagefolder", root=str(tmp_path)), seed=0)
    (tmp_path / "test" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="data.root: no images"):
        build_data(make_cfg("imagefolder", root=str(tmp_path)), seed=0)
