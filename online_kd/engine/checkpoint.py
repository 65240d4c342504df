"""Atomic checkpoints: one directory per epoch, one file per peer plus the engine's own state.

A checkpoint directory is written under a temporary name and renamed into place; the
``latest`` pointer is replaced atomically afterwards, so a crash at any moment leaves the
previous checkpoint whole. Files are read back with ``torch.load(weights_only=True)``.

The checkpoint is an epoch's commit point: its engine state holds the history, from which a
resume derives ``metrics.jsonl`` again (see :mod:`online_kd.engine.record`). A resume takes the
newest intact epoch directory, saying so when a newer one is damaged.
``ONLINE_KD_FAULT=<point>`` kills the process at a named point of the write path (tests).
"""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import TopologyError, one_line
from ..rundir import atomic_write_text  # noqa: F401 - checkpoints' pointers are written with it

ENGINE_FILE = "engine.pt"
FAULT_ENV = "ONLINE_KD_FAULT"


_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here when ``$ONLINE_KD_FAULT`` is ``name`` (first time reached) or
    ``name:N`` (N-th time): the kill-at-each-write-point tests."""
    want = os.environ.get(FAULT_ENV)
    if not want or want.partition(":")[0] != name:
        return
    _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    if _FAULT_HITS[name] == int(want.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


class DamagedCheckpoint(Exception):
    """A checkpoint file that cannot be read back (missing, truncated, zeroed)."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged ({reason})")


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


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    return torch.load(path, map_location=map_location, weights_only=True)


def load_checked(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """:func:`load`, raising DamagedCheckpoint for an unreadable file and a one-line TopologyError
    (exit 2, never a fallback) for a file that weights_only refuses: a pickle that would run code."""
    path = Path(path)
    if not path.is_file():
        raise DamagedCheckpoint(path, "missing")
    try:
        return load(path, map_location)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise TopologyError(str(path), "refused by a weights_only load: the file holds code or objects, "
                                           "not only tensors and plain values; it is not loaded") from None
        raise DamagedCheckpoint(path, _reason(err)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise DamagedCheckpoint(path, _reason(err)) from None


def _reason(err: BaseException) -> str:
    text = one_line(err).split(". ")[0]
    return text[:100] + ("…" if len(text) > 100 else "")


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
        fault_point("checkpoint-files")
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    fault_point("checkpoint-renamed")
    atomic_write_text(final.name, root / "latest")
    fault_point("checkpoint-latest")
    old = sorted(p for p in root.glob("epoch-*") if p.is_dir() and p != final)
    for p in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The directory ``latest`` points at, or None when no checkpoint was completed.

    The pointer must name a directory inside the run directory (``root``'s parent) or inside the
    Ray Train storage the run directory records (``engine.storage``: a path every node sees); anything
    else is refused with a one-line error rather than followed. A pointer to an object store (a URI)
    gives None: there is no local directory to read."""
    from .ray_storage import recorded_storage

    root = Path(root)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    run = root.resolve().parent
    shared = recorded_storage(run)
    if shared is not None and shared.is_uri and text.startswith(shared.base):
        return None
    path = (root / text).resolve()
    allowed = [run] + ([Path(shared.base).resolve()] if shared is not None and not shared.is_uri else [])
    if not text or not any(path.is_relative_to(a) for a in allowed):
        raise TopologyError(str(pointer), f"points outside the run directory ('{text[:200]}'); "
                                          "refusing to follow it (delete it to resume from the epoch directories)")
    return path if path.is_dir() else None


def epoch_dirs(root: str | os.PathLike) -> list[Path]:
    """The completed ``epoch-NNNN`` directories under ``root``, newest first."""
    return sorted((p for p in Path(root).glob("epoch-[0-9]*") if p.is_dir()), reverse=True)


def newest_intact(root: str | os.PathLike, names: list[str], map_location: str | torch.device = "cpu",
                  say=print) -> tuple[Path | None, dict[str, Any]]:
    """(directory, name → loaded object) of the newest epoch directory whose files all load.

    A damaged newer one is reported through ``say`` in one line; when every one is damaged,
    TopologyError (exit 2) names the newest damaged file. (None, {}) when there is no checkpoint."""
    latest_checkpoint(root)  # a pointer out of the run directory is refused even though it is not followed
    damaged: list[DamagedCheckpoint] = []
    for d in epoch_dirs(root):
        try:
            files = {n: load_checked(d / n, map_location) for n in names}
        except DamagedCheckpoint as err:
            damaged.append(err)
            continue
        if damaged:
            say(f"checkpoint file {damaged[0].path} is damaged ({damaged[0].reason}); "
                f"resuming from the newest intact checkpoint, {d}")
        return d, files
    if damaged:
        raise TopologyError("--resume", f"checkpoint file {damaged[0].path} is damaged ({damaged[0].reason}) "
                                        "and no older checkpoint is intact")
    return None, {}


def describe_kept(path: Path | None, epochs_done: int | None) -> str:
    """What a diverged run leaves to resume from, in words for its error line (epochs numbered from 1)."""
    if path is None:
        return "no checkpoint was written before it diverged: nothing to resume, a new run starts from epoch 1"
    return f"the last good checkpoint is kept: {path}, after epoch {epochs_done}"


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
