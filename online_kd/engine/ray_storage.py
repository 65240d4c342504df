"""Where the ray engine's Ray Train keeps a run's checkpoints (``RunConfig.storage_path``).

Without ``engine.storage`` it is ``<run directory>/ray``: the driver's disk, which only works when every
worker runs on the driver's machine. With it, a path every node sees (an NFS-style mount) or a URI that
pyarrow's filesystems understand (``s3://``, ``gs://``, ``file://``; ``engine.storage_endpoint`` for an
S3-compatible store), under a folder of its own per run (``<storage>/<run directory name>-<8 hex>``)
so that two runs never share one. The location is kept in ``<run directory>/ray_storage.json``, so
``--resume`` finds it whatever the YAML says by then.
"""
from __future__ import annotations

import io
import json
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import TopologyError
from ..rundir import atomic_write_text

RECORD = "ray_storage.json"
NAME = "ray"  # RunConfig(name=...): Ray Train keeps the run under <storage_path>/<NAME>


@dataclass(frozen=True)
class RayStorage:
    """A run's Ray Train storage: ``base`` is a local directory or a URI; ``endpoint`` an S3 endpoint."""

    base: str
    endpoint: str | None = None

    @property
    def is_uri(self) -> bool:
        return "://" in self.base

    # ------------------------------------------------------------------ what Ray Train gets
    def run_config_args(self) -> dict[str, Any]:
        """``storage_path`` (and ``storage_filesystem`` for an S3 endpoint) of ``RunConfig``."""
        if self.endpoint:
            return {"storage_path": self.base.split("://", 1)[1], "storage_filesystem": self.filesystem()[0]}
        return {"storage_path": self.base}

    def filesystem(self):
        """(pyarrow filesystem, path inside it) of ``base``."""
        import pyarrow.fs as pafs

        if not self.is_uri:
            return pafs.LocalFileSystem(), self.base
        if self.endpoint:
            return pafs.S3FileSystem(endpoint_override=self.endpoint), self.base.split("://", 1)[1]
        return pafs.FileSystem.from_uri(self.base)

    # ------------------------------------------------------------------ Ray Train's folder of this run
    @property
    def run_root(self) -> str:
        """Ray Train's folder of the run (``<base>/ray``): a local path or a URI."""
        return f"{self.base.rstrip('/')}/{NAME}"

    def local_root(self) -> Path | None:
        """:attr:`run_root` as a local path, or None for a URI."""
        return None if self.is_uri else Path(self.run_root)

    def where(self, fs_path: str) -> str:
        """A path inside :meth:`filesystem` (e.g. a reported checkpoint's ``path``) as a user reads it."""
        if not self.is_uri:
            return fs_path
        return f"{self.base.split('://', 1)[0]}://{fs_path.lstrip('/')}"

    def read_bytes(self, relative: str) -> bytes | None:
        """A file under :attr:`run_root` (``relative`` to it), or None when there is none."""
        import pyarrow.fs as pafs

        fs, root = self.filesystem()
        path = f"{root.rstrip('/')}/{NAME}/{relative}"
        if fs.get_file_info(path).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()

    def load(self, relative: str) -> Any:
        """A torch file under :attr:`run_root`, loaded with ``weights_only`` (None when missing)."""
        import torch

        data = self.read_bytes(relative)
        return None if data is None else torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

    # ------------------------------------------------------------------ the run directory's record
    def save(self, out: Path) -> None:
        atomic_write_text(json.dumps(asdict(self)), Path(out) / RECORD)


def for_run(out: Path, storage: str | None, endpoint: str | None) -> RayStorage:
    """The storage of the run in ``out``: the one its record names (a resumed run), else a new folder under
    ``engine.storage`` (recorded now), else ``<out>/ray``."""
    recorded = recorded_storage(out)
    if recorded is not None:
        return recorded
    if storage is None:
        return RayStorage(str(Path(out).resolve() / "ray"))
    base = storage[len("file://"):] if storage.startswith("file://") else storage
    if "://" not in base:
        base = str(Path(base).expanduser().resolve())
    made = RayStorage(f"{base.rstrip('/')}/{Path(out).resolve().name}-{secrets.token_hex(4)}", endpoint)
    made.save(out)
    return made


def recorded_storage(out: Path) -> RayStorage | None:
    """The storage ``<out>/ray_storage.json`` records, or None (a run on the default ``<out>/ray``)."""
    path = Path(out) / RECORD
    if not path.is_file():
        return None
    try:
        return RayStorage(**json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise TopologyError(str(path), f"not a storage record ({err}); delete it only if the run's checkpoints "
                                       "are under <run directory>/ray") from None


def of_run(out: Path) -> RayStorage:
    """The storage a run in ``out`` used (its record, else the default ``<out>/ray``)."""
    return recorded_storage(out) or RayStorage(str(Path(out).resolve() / "ray"))


def alive_nodes() -> int:
    """Alive nodes of the connected Ray cluster."""
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def check_shared(storage: str | None, nodes: int) -> None:
    """On a cluster of several nodes the checkpoints need a place every node reaches."""
    if storage is None and nodes > 1:
        raise TopologyError("engine.storage", f"the Ray cluster has {nodes} nodes, and Ray Train's checkpoints "
                                              "must be where every node reaches them: set a path every node "
                                              "sees (an NFS-style mount) or a URI (s3://, gs://)")
