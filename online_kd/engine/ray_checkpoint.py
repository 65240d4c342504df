"""The ray engine's checkpoints: the one Ray Train restores from, checked before a resume.

Ray Train keeps its checkpoints under the run's storage (:mod:`online_kd.engine.ray_storage`;
``<out>/ray/ray`` by default) and restores a run from the latest one its
``checkpoint_manager_snapshot.json`` names. Rank 0's ``engine.pt`` holds the run's history (as
the local engine's does), so the driver derives ``metrics.jsonl`` from it. On a local or shared
path, a damaged latest checkpoint is replaced in the snapshot by the newest intact one, said in one
line. On a URI storage (object stores) only the latest checkpoint's ``engine.pt`` is read: checking
every file would download the whole checkpoint, and an object store writes each file whole.
"""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

from ..errors import TopologyError
from . import checkpoint as ckpt
from .ray_storage import RayStorage, of_run

SNAPSHOT = "checkpoint_manager_snapshot.json"


def storage(out: Path) -> str:
    """Where Ray Train keeps this run: ``<storage>/ray`` (a local path or a URI)."""
    return of_run(out).run_root


def _snapshot(where: RayStorage) -> dict | None:
    data = where.read_bytes(SNAPSHOT)
    return None if data is None else json.loads(data)


def _check(directory: Path) -> dict:
    """engine.pt of a Ray checkpoint directory, after checking every file in it reads back."""
    if not directory.is_dir():
        raise ckpt.DamagedCheckpoint(directory, "missing")
    for f in sorted(directory.glob("*.pt")):
        if ".zero" in f.name:  # a DeepSpeed partition: loaded with DeepSpeed's types allowed, here only checked whole
            try:
                with zipfile.ZipFile(f) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError) as err:
                raise ckpt.DamagedCheckpoint(f, str(err)) from None
            if bad:
                raise ckpt.DamagedCheckpoint(f, f"bad entry {bad}")
        else:
            ckpt.load_checked(f)
    return ckpt.load_checked(directory / ckpt.ENGINE_FILE)


def restore_point(out: Path, say=print) -> tuple[Path | None, dict | None]:
    """(directory, engine state) of the checkpoint Ray Train will restore this run from, or (None, None).

    When the latest is damaged, the snapshot is rewritten to name the newest intact one (said
    through ``say``); TopologyError (exit 2) names the damaged file when none is intact."""
    ckpt.latest_checkpoint(Path(out) / "checkpoints")  # refuses a pointer out of the run directory
    where = of_run(out)
    snap = _snapshot(where)
    if snap is None:
        return None, None
    results = snap.get("checkpoint_results") or []
    if where.is_uri:
        if not results:
            return None, None
        name = results[-1]["checkpoint_dir_name"]
        state = where.load(f"{name}/{ckpt.ENGINE_FILE}")
        return (f"{where.run_root}/{name}", state) if state is not None else (None, None)
    root = where.local_root()
    snap_path = root / SNAPSHOT
    damaged: list[ckpt.DamagedCheckpoint] = []
    for i in reversed(range(len(results))):
        directory = root / results[i]["checkpoint_dir_name"]
        try:
            state = _check(directory)
        except ckpt.DamagedCheckpoint as err:
            damaged.append(err)
            continue
        if damaged:
            snap["checkpoint_results"] = results[: i + 1]
            snap["checkpoint_report_indices"] = snap["checkpoint_report_indices"][: i + 1]
            snap["latest_checkpoint_result"] = results[i]
            ckpt.atomic_write_text(json.dumps(snap), snap_path)
            ckpt.atomic_write_text(str(directory), Path(out) / "checkpoints" / "latest")
            say(f"checkpoint file {damaged[0].path} is damaged ({damaged[0].reason}); "
                f"resuming from the newest intact checkpoint, {directory}")
        return directory, state
    if damaged:
        raise TopologyError("--resume", f"checkpoint file {damaged[0].path} is damaged ({damaged[0].reason}) "
                                        "and no older checkpoint is intact")
    return None, None


def committed_history(checkpoint) -> list[dict] | None:
    """The history in a reported Ray checkpoint's engine.pt (controller side, through the checkpoint's own
    filesystem: a local path or an object store), or None without one."""
    import pyarrow.fs as pafs

    path = f"{checkpoint.path.rstrip('/')}/{ckpt.ENGINE_FILE}"
    if checkpoint.filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with checkpoint.filesystem.open_input_stream(path) as f:
        return ckpt.load(io.BytesIO(f.read())).get("history")


def kept_words(out: Path) -> str:
    """What a diverged ray run leaves to resume from (for its error line)."""
    where = of_run(out)
    snap = _snapshot(where)
    latest = snap.get("latest_checkpoint_result") if snap else None
    if not latest:
        return ckpt.describe_kept(None, None)
    name = latest["checkpoint_dir_name"]
    state = where.load(f"{name}/{ckpt.ENGINE_FILE}") or {}
    return ckpt.describe_kept(f"{where.run_root}/{name}", state.get("epoch"))
