"""``build_data(cfg, seed)``: load the configured data set into train / test / holdout splits.

The splits (test split of digits, every holdout) are fixed by constants, not by
the run's seed: runs with different seeds differ only in batch order and
augmentation, never in which samples they train on.
"""
from __future__ import annotations

import urllib.error
from dataclasses import dataclass

import torch

from .augment import BatchTransform, PadCropFlip, RandomResizedCropFlip
from .datasets import ImageFolderDataset, IndexedDataset, SyntheticDataset, TensorDataset, stratified_split
from .errors import DataError
from .info import (DEFAULT_IMAGE_SIZE, DIGITS_TEST_FRACTION, NORMALIZATION, DatasetInfo, expand_root,
                   imagefolder_classes, imagefolder_dirs)
from .prefetch import LoaderOptions
from .samplers import build_sampler
from .stream import BatchStream

_CIFAR_LABEL = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


@dataclass
class DataBundle:
    """The loaded splits of one data set and the training augmentation (None when ``augment: none``).

    ``train_stream`` / ``eval_stream`` build the usual streams: shuffled and
    augmented for train, in order and plain for test and holdout.
    """

    info: DatasetInfo
    train: IndexedDataset
    test: IndexedDataset
    holdout: IndexedDataset | None
    train_transform: BatchTransform | None
    seed: int = 0
    batch_size: int = 64
    test_batch_size: int = 64
    train_sampler: object = None  # data.sampler over the train split (adds batch.pair), None for random
    loader: LoaderOptions = LoaderOptions()  # data.workers / data.prefetch (engines add pinning: ``loader.on(device)``)

    def train_stream(self, num_shards: int = 1, shard: int = 0, drop_last: bool = False) -> BatchStream:
        """Shuffled, augmented global batches of the train split (this shard of each)."""
        return BatchStream(self.train, self.batch_size, self.seed, transform=self.train_transform,
                           shuffle=True, drop_last=drop_last, num_shards=num_shards, shard=shard,
                           sampler=self.train_sampler, loader=self.loader)

    def eval_stream(self, split: str = "test", num_shards: int = 1, shard: int = 0) -> BatchStream:
        """Unshuffled, unaugmented batches of ``test`` or ``holdout``."""
        ds = {"test": self.test, "holdout": self.holdout, "train": self.train}[split]
        if ds is None:
            raise DataError("data.holdout", "this run has no holdout split: set data.holdout (e.g. 0.1)")
        return BatchStream(ds, self.test_batch_size, self.seed, transform=None, shuffle=False,
                           num_shards=num_shards, shard=shard, loader=self.loader)


def _pad_crop_flip(cfg, seed: int, pad: int, flip: bool, fill) -> PadCropFlip | None:
    """The standard tensor augmentation with the YAML's padding mode and rotation (None for ``augment: none``)."""
    if cfg.augment != "standard":
        return None
    return PadCropFlip(seed, pad=pad, flip=flip, fill=fill, padding_mode=getattr(cfg, "padding_mode", "constant"),
                       rotation=float(getattr(cfg, "rotation", 0.0) or 0.0))


def _digits(cfg, seed: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    raw = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0   # [1797, 1, 8, 8] in [0, 1]
    targets = torch.as_tensor(d.target, dtype=torch.int64)
    train_rows, test_rows = stratified_split(targets, DIGITS_TEST_FRACTION, "digits/test")
    mean, std = raw[train_rows].mean().item(), raw[train_rows].std().item()
    full = TensorDataset(raw, targets, [mean], [std])
    train, test = full.subset(train_rows), full.subset(test_rows)
    # digits are not mirror-symmetric: crop only
    aug = _pad_crop_flip(cfg, seed, 1, False, full.pad_fill)
    return train, test, aug, 10


def _cifar(cfg, seed: int):
    from torchvision import datasets

    name = cfg.dataset
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    root = expand_root(cfg.root)
    label = _CIFAR_LABEL[name]
    splits = []
    for train in (True, False):
        try:
            ds = cls(str(root), train=train, download=bool(cfg.download))
        except RuntimeError as e:
            if cfg.download or (root / cls.base_folder).exists():
                raise DataError("data.root", f"{label} under {root} is incomplete or corrupt ({e}); "
                                             "delete it and set data.download: true") from e
            raise DataError("data.root", f"{label} not found under {root}: expected the folder "
                                         f"{root / cls.base_folder}/ (set data.download: true, or "
                                         f"--set data.root=DIR where DIR/{cls.base_folder}/ holds it)") from e
        except (OSError, urllib.error.URLError) as e:
            raise DataError("data.download", f"could not download {label} to {root} ({e}); "
                                             "download it elsewhere and point data.root at it") from e
        data = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()        # uint8 [N, 3, 32, 32]
        mean, std = NORMALIZATION[name]
        splits.append(TensorDataset(data, torch.as_tensor(ds.targets, dtype=torch.int64), mean, std,
                                    scale=1 / 255))
    train, test = splits
    aug = _pad_crop_flip(cfg, seed, 4, True, train.pad_fill)
    return train, test, aug, 10 if name == "cifar10" else 100


def _imagefolder(cfg, seed: int):
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    for key, plain in (("padding_mode", "constant"), ("rotation", 0.0)):
        if getattr(cfg, key, plain) != plain:
            raise DataError(f"data.{key}", "applies to the crop + flip of digits and CIFAR; imagefolder uses "
                                           "RandomResizedCrop (remove it)")
    root = expand_root(cfg.root)
    train_dir, eval_dir = imagefolder_dirs(root)
    classes = imagefolder_classes(train_dir)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    size = int(getattr(cfg, "image_size", None) or DEFAULT_IMAGE_SIZE)
    mean, std = NORMALIZATION["imagefolder"]
    splits = []
    for d in (train_dir, eval_dir):
        samples = make_dataset(str(d), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise DataError("data.root", f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {d}")
        splits.append(ImageFolderDataset([p for p, _ in samples], [t for _, t in samples], size, mean, std))
    train, test = splits
    aug = RandomResizedCropFlip(seed, size) if cfg.augment == "standard" else None
    return train, test, aug, len(classes)


def _synthetic(cfg, seed: int):
    s = cfg.synthetic
    shape, k = tuple(int(v) for v in s.shape), int(s.num_classes)
    train = SyntheticDataset(int(s.num_train), shape, k, "train")
    test = SyntheticDataset(int(s.num_test), shape, k, "test")
    return train, test, None, k   # no augmentation: the noise already differs per sample


_LOADERS = {"digits": _digits, "cifar10": _cifar, "cifar100": _cifar, "imagefolder": _imagefolder,
            "synthetic": _synthetic}


def build_data(cfg, seed: int) -> DataBundle:
    """Load ``cfg.dataset`` (``DataError`` naming the YAML key when it cannot), split off the holdout.

    ``seed`` drives only the training augmentation (and the streams built from
    the bundle), not the data or the splits.
    """
    name = cfg.dataset
    if name not in _LOADERS:
        raise DataError("data.dataset", f"unknown data set '{name}' (known: {', '.join(sorted(_LOADERS))})")
    train, test, aug, num_classes = _LOADERS[name](cfg, seed)
    holdout = None
    fraction = float(getattr(cfg, "holdout", 0.0) or 0.0)
    if fraction > 0:
        keep, take = stratified_split(train.targets, fraction, name, "holdout")
        if len(keep) == 0:
            raise DataError("data.holdout", f"holdout {fraction} leaves no training samples out of {len(train)}")
        train, holdout = train.subset(keep), train.subset(take)
    info = DatasetInfo(name, train.in_channels, num_classes, tuple(train.image_size), len(train), len(test),
                       0 if holdout is None else len(holdout))
    batch = int(cfg.batch_size)
    test_batch = int(getattr(cfg, "test_batch_size", None) or batch)
    sampler = build_sampler(getattr(cfg, "sampler", "random") or "random", train.targets, int(seed))
    return DataBundle(info, train, test, holdout, aug, seed=int(seed), batch_size=batch, test_batch_size=test_batch,
                      train_sampler=sampler,
                      loader=LoaderOptions(int(getattr(cfg, "workers", 0)), int(getattr(cfg, "prefetch", 2))))
