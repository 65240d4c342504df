"""The ray engine's checkpoints: the one Ray Train restores from, checked before a resume.

Ray Train keeps its checkpoints under ``<out>/ray/ray`` and restores a run from the latest
one its ``checkpoint_manager_snapshot.json`` names. Rank 0's ``engine.pt`` holds the run's
history (as the local engine's does), so the driver derives ``metrics.jsonl`` from it. A damaged
latest checkpoint is replaced in the snapshot by the newest intact one, said in one line.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

from ..errors import TopologyError
from . import checkpoint as ckpt

SNAPSHOT = "checkpoint_manager_snapshot.json"


def storage(out: Path) -> Path:
    """Where Ray Train keeps this run (``RunConfig(name="ray", storage_path=<out>/ray)``)."""
    return Path(out) / "ray" / "ray"


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
    snap_path = storage(out) / SNAPSHOT
    if not snap_path.is_file():
        return None, None
    snap = json.loads(snap_path.read_text())
    results = snap.get("checkpoint_results") or []
    damaged: list[ckpt.DamagedCheckpoint] = []
    for i in reversed(range(len(results))):
        directory = storage(out) / results[i]["checkpoint_dir_name"]
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
    """The history in a reported Ray checkpoint's engine.pt (controller side), or None without one."""
    path = Path(checkpoint.path) / ckpt.ENGINE_FILE
    return ckpt.load(path).get("history") if path.is_file() else None


def kept_words(out: Path) -> str:
    """What a diverged ray run leaves to resume from (for its error line)."""
    snap_path = storage(out) / SNAPSHOT
    latest = json.loads(snap_path.read_text()).get("latest_checkpoint_result") if snap_path.is_file() else None
    if not latest:
        return ckpt.describe_kept(None, None)
    directory = storage(out) / latest["checkpoint_dir_name"]
    return ckpt.describe_kept(directory, ckpt.load(directory / ckpt.ENGINE_FILE)["epoch"])
