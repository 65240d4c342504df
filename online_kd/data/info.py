"""What a data set looks like (channels, classes, size, counts), known before loading it.

Models and the topology planner size themselves from this, so it must not download
or read the data: CIFAR and digits metadata are constants, synthetic comes from the
config and imagefolder only lists its class folders.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

# Per-channel mean / std of the raw [0, 1] pixels (train split), as in RepDistiller.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # ImageNet statistics
}

DIGITS_TOTAL = 1797
DIGITS_TEST_FRACTION = 0.2
DEFAULT_IMAGE_SIZE = 224

_FIXED = {
    # name: (channels, classes, (H, W), train, test)
    "cifar10": (3, 10, (32, 32), 50000, 10000),
    "cifar100": (3, 100, (32, 32), 50000, 10000),
    "digits": (1, 10, (8, 8), DIGITS_TOTAL - math.ceil(DIGITS_TEST_FRACTION * DIGITS_TOTAL),
               math.ceil(DIGITS_TEST_FRACTION * DIGITS_TOTAL)),
}


@dataclass(frozen=True)
class DatasetInfo:
    """Shape metadata of a data set.

    ``num_train`` counts the train split *after* the holdout is taken out of it;
    ``num_holdout`` is that holdout (0 when none). Counts are None where they are
    unknown without reading the data (imagefolder before ``build_data``).
    """

    name: str
    in_channels: int
    num_classes: int
    image_size: tuple[int, int]
    num_train: int | None
    num_test: int | None
    num_holdout: int | None = 0


def holdout_count(n: int, fraction: float) -> int:
    """How many of ``n`` train samples the holdout takes (ceil, like scikit-learn's test_size)."""
    return math.ceil(fraction * n) if fraction > 0 else 0


_VARIABLE = re.compile(r"\$\{(\w+)(:?)-([^}]*)\}|\$\{(\w+)\}|\$(\w+)")


def expand_root(root: str | os.PathLike) -> Path:
    """``data.root`` with environment variables and ``~`` expanded, where the data is loaded (on a cluster:
    on each worker's node, so each node may keep its data elsewhere). ``${VAR:-default}`` takes the default
    when VAR is unset or empty, ``${VAR-default}`` when it is unset (as a shell does); a variable without
    a default must be set."""
    def value(m: re.Match) -> str:
        name = m[1] or m[4] or m[5]
        got = os.environ.get(name)
        if m[1] is not None and (got is None or (m[2] and not got)):
            return m[3]
        if got is None:
            raise DataError("data.root", f"{str(root)!r} names the environment variable {name}, which is not set "
                                         f"(set it, or give a default: ${{{name}:-/path/to/data}})")
        return got
    return Path(os.path.expanduser(_VARIABLE.sub(value, str(root))))


def imagefolder_dirs(root: Path) -> tuple[Path, Path]:
    """The train and evaluation folders of an ImageFolder tree (``val``, else ``test``)."""
    train = root / "train"
    if not train.is_dir():
        raise DataError("data.root", f"no ImageFolder tree under {root}: expected {train}/<class>/<image> "
                                     "(and val/ or test/ beside it)")
    for name in ("val", "test"):
        if (root / name).is_dir():
            return train, root / name
    raise DataError("data.root", f"ImageFolder tree {root} has train/ but neither val/ nor test/")


def imagefolder_classes(train_dir: Path) -> list[str]:
    """Sorted class folder names, as torchvision's ImageFolder numbers them."""
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    if not classes:
        raise DataError("data.root", f"{train_dir} has no class folders")
    return classes


def dataset_info(cfg) -> DatasetInfo:
    """The metadata of ``cfg.dataset`` without loading (imagefolder lists its class folders)."""
    name = cfg.dataset
    holdout = float(getattr(cfg, "holdout", 0.0) or 0.0)
    if name in _FIXED:
        c, k, hw, n_train, n_test = _FIXED[name]
        h = holdout_count(n_train, holdout)
        return DatasetInfo(name, c, k, hw, n_train - h, n_test, h)
    if name == "synthetic":
        spec = cfg.synthetic
        c, hh, ww = (int(v) for v in spec.shape)
        h = holdout_count(int(spec.num_train), holdout)
        return DatasetInfo(name, c, int(spec.num_classes), (hh, ww), int(spec.num_train) - h,
                           int(spec.num_test), h)
    if name == "imagefolder":
        train_dir, _ = imagefolder_dirs(expand_root(cfg.root))
        size = int(getattr(cfg, "image_size", None) or DEFAULT_IMAGE_SIZE)
        return DatasetInfo(name, 3, len(imagefolder_classes(train_dir)), (size, size), None, None, None)
    raise DataError("data.dataset", f"unknown data set '{name}' "
                                    "(known: cifar10, cifar100, digits, imagefolder, synthetic)")
