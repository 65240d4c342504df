"""Atomic checkpoints: one directory per epoch, one file per peer plus the engine's own state.

A checkpoint directory is written under a temporary name and renamed into place; the
``latest`` pointer is replaced atomically afterwards, so a crash at any moment leaves the
previous checkpoint whole. Files are read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
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
    """Write ``files`` (name → object) as checkpoint ``epoch-NNNN`` under ``root`` and point ``latest`` at it.

    ``epoch`` is the loop's 0-based index of the epoch just done; the folder carries its number (from 1),
    as the console, metrics.jsonl and MLflow do."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{epoch + 1:04d}"
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


def load_init(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A peer's ``init``: a plain state_dict, or a peer file of ours (its 'model' entry)."""
    obj = load(Path(path).expanduser())
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        return obj["model"]
    return obj
