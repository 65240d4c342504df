"""Text-level mutants of every shipped topology (``tests/fuzz_yaml.py``): each is accepted or refused with
one line, never a crash or a hang; a sample goes through the real ``online-kd validate`` subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fuzz_yaml import ERROR_LINE, MUTATORS, ROOT, TOPOLOGIES, mutant, run

SEED = 7  # not the seed of the README's figures: CI explores other mutants


def test_every_shipped_yaml_and_mutator_is_used():
    assert len(TOPOLOGIES) >= 50 and {p.parent.name for p in TOPOLOGIES} >= {"quick", "cifar10", "cifar100"}
    used = {what.split(":")[0] for i in range(300) for what in mutant(SEED, i)[2].split("; ")}
    assert used >= {m.__name__ for m in MUTATORS}


def test_three_hundred_mutants_in_process(tmp_path):
    """Every 8th through ``online_kd.cli.main`` with the dry forward; the others load and check only."""
    outcomes = list(run(300, seed=SEED, dry_forward=0.125, limit=30.0, workdir=tmp_path))
    bad = [f"#{i} {src.name} ({what}): {out.kind} {out.detail}" for i, src, what, out in outcomes
           if out.kind in ("crash", "hang")]
    assert not bad, "\n".join(bad)
    kinds = [out.kind for *_, out in outcomes]
    assert kinds.count("clear") > 200 and kinds.count("accepted") > 5  # the mutants reach both outcomes


def _cli(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "online_kd.cli", "validate", str(path)], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env=env)


@pytest.mark.slow
def test_forty_mutants_through_the_cli(tmp_path):
    """Exit 2 and one 'error: place: message' line without a traceback, or exit 0 and 'ok: …'."""
    paths = []
    for i in range(40):
        source, data, what = mutant(SEED + 1, i)
        path = tmp_path / f"{i:02d}-{source.name}"
        path.write_bytes(data)
        paths.append((path, what))
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda pw: _cli(pw[0], tmp_path), paths))
    rejected = 0
    for (path, what), out in zip(paths, results):
        where = f"{path.name} ({what})"
        assert "Traceback" not in out.stderr, f"{where}: {out.stderr[-3000:]}"
        if out.returncode == 0:
            assert out.stdout.startswith("ok: ") and not out.stderr, where
            continue
        rejected += 1
        assert out.returncode == 2, f"{where}: exit {out.returncode}: {out.stderr[-2000:]}"
        assert ERROR_LINE.match(out.stderr) and out.stdout == "", f"{where}: {out.stderr!r}"
    assert rejected >= 30
