"""Atomic checkpoints: one directory per epoch, one file per peer plus the engine's own state.

A checkpoint directory is written under a temporary name and renamed into place; the
``latest`` pointer is replaced atomically afterwards, so a crash at any moment leaves the
previous checkpoint whole. Files are read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

ENGINE_FILE = "engine.pt"


def peer_file(peer: str) -> str:
    return f"peer_{peer}.pt"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def write_checkpoint(root: str | os.PathLike, epoch: int, files: Mapping[str, Any], keep: int = 2) -> Path:
    """Write ``files`` (name → object) as checkpoint ``epoch-NNNN`` under ``root`` and point ``latest`` at it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch:04d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        for name, obj in files.items():
            with open(tmp / name, "wb") as f:
                torch.save(obj, f)
                f.flush()
                os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    atomic_write_text(final.name, root / "latest")
    old = sorted(p for p in root.glob("epoch-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The directory ``latest`` points at, or None when no checkpoint was completed."""
    pointer = Path(root) / "latest"
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    return path if path.is_dir() else None


#: entries that hold the state dict in a wrapped checkpoint: ours and RepDistiller's/mdistiller's ('model'), others'
STATE_DICT_ENTRIES = ("model", "state_dict", "net")
DATA_PARALLEL_PREFIX = "module."


def load_init(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A peer's ``init``: a plain state_dict, a peer file of ours, or a published checkpoint.

    Published CIFAR teachers load as they are: RepDistiller's ``ckpt_epoch_240.pth`` / ``<model>_best.pth``
    (``{'epoch', 'model': state_dict, 'accuracy', 'optimizer'}``) and mdistiller's
    ``download_ckpts/cifar_teachers/<model>_vanilla/ckpt_epoch_240.pth`` (the same files, read as
    ``load_checkpoint(path)['model']``). The state dict is the first of :data:`STATE_DICT_ENTRIES` that
    holds a dict; a ``module.`` prefix on every key (saved through ``nn.DataParallel``) is dropped. The
    zoo's CIFAR nets use RepDistiller's parameter names, so no other key mapping is needed.
    ValueError when the file holds Python objects beyond tensors (RepDistiller's ``<model>_last.pth``
    stores its argparse options): it is read with ``weights_only=True``.
    """
    try:
        obj = load(Path(path).expanduser())
    except pickle.UnpicklingError:
        raise ValueError(f"'{path}' holds Python objects beyond tensors, which are not loaded (weights_only); "
                         "use a checkpoint of tensors only (RepDistiller: ckpt_epoch_N.pth or <model>_best.pth, "
                         "not <model>_last.pth)") from None
    if isinstance(obj, dict):
        entry = next((k for k in STATE_DICT_ENTRIES if isinstance(obj.get(k), dict)), None)
        obj = obj[entry] if entry is not None else obj
        if obj and all(isinstance(k, str) and k.startswith(DATA_PARALLEL_PREFIX) for k in obj):
            obj = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in obj.items()}
    return obj


def load_init_into(net: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load :func:`load_init`'s state dict strictly into ``net``; ValueError naming the keys that do not fit."""
    state = load_init(path)
    if not isinstance(state, dict):
        raise ValueError(f"'{path}' holds a {type(state).__name__}, not a state dict")
    result = None
    try:
        result = net.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"'{path}' does not fit {type(net).__name__}: {str(err).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{what} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''} ({len(keys)})"
                 for what, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)) if keys]
        raise ValueError(f"'{path}' does not fit {type(net).__name__}: {'; '.join(parts)}")
