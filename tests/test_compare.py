"""`run --seeds` (mean ± std over seed runs, grouped in MLflow) and `compare` over such runs and plain ones."""
import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from online_kd.cli import main

ROOT = Path(__file__).resolve().parents[1]
DML = str(ROOT / "topologies/quick/dml.yaml")
QUICK = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=3", "--quiet"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Seeds 0 and 1 of quick/dml.yaml as one group, and a plain run with another lr: one SQLite store."""
    d = tmp_path_factory.mktemp("compare")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    assert main(["run", DML, *QUICK, "--seeds", "0,1", "--out", str(d / "seeds"), "--tracking-uri", uri]) == 0
    assert main(["run", DML, *QUICK, "--set", "peers.a.optimizer.lr=0.01", "--out", str(d / "plain"),
                 "--tracking-uri", uri]) == 0
    return {"dir": d, "uri": uri, "client": MlflowClient(tracking_uri=uri),
            "summary": json.loads((d / "seeds" / "summary.json").read_text())}


def test_run_seeds_reports_mean_and_std_of_the_seed_runs(store):
    agg = store["summary"]
    assert agg["seeds"] == [0, 1] and agg["finished"]
    for peer in ("a", "b"):
        per_seed = [json.loads((store["dir"] / "seeds" / f"seed-{s}" / "summary.json").read_text())["peers"][peer]
                    for s in (0, 1)]
        for key in ("top1_last", "top1_best"):
            x, y = (p[key] for p in per_seed)
            assert agg["peers"][peer][key]["mean"] == pytest.approx((x + y) / 2, abs=1e-3)
            assert agg["peers"][peer][key]["std"] == pytest.approx(abs(x - y) / math.sqrt(2), abs=1e-3)  # n-1
    seed_topologies = [(store["dir"] / "seeds" / f"seed-{s}" / "topology.yaml").read_text() for s in (0, 1)]
    assert "seed: 0" in seed_topologies[0] and "seed: 1" in seed_topologies[1]


def test_seed_group_in_mlflow(store):
    client = store["client"]
    exp = client.get_experiment_by_name("quick")
    (group,) = client.search_runs([exp.experiment_id], "tags.`online_kd.kind` = 'seeds'")
    assert group.info.status == "FINISHED" and group.data.params["seeds"] == "0,1"
    assert group.data.metrics["a.top1_last_mean"] == pytest.approx(store["summary"]["peers"]["a"]["top1_last"]["mean"])
    runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{group.info.run_id}'")
    assert sorted((r.info.run_name, r.data.params["train.seed"]) for r in runs) == [("quick-dml-seed0", "0"),
                                                                                   ("quick-dml-seed1", "1")]
    for r in runs:
        peers = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{r.info.run_id}'")
        assert sorted(p.info.run_name for p in peers) == ["a", "b"]
        assert all(len(client.get_metric_history(p.info.run_id, "top1")) == 2 for p in peers)


def test_compare_shows_mean_std_over_seeds_and_differing_overrides(store, tmp_path, capsys):
    assert main(["compare", "quick", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["run"], r["peer"]) for r in rows] == [("quick-dml-seed0", "a"), ("quick-dml-seed0", "b"),
                                                     ("quick-dml-seed1", "a"), ("quick-dml-seed1", "b"),
                                                     ("quick-dml", "a"), ("quick-dml", "b")]
    agg = store["summary"]["peers"]
    for r in rows[:4]:
        assert r["group"] == "quick-dml seeds 0,1" and r["n_seeds"] == 2
        assert r["last_mean"] == pytest.approx(agg[r["peer"]]["top1_last"]["mean"], abs=1e-3)
        assert r["best_std"] == pytest.approx(agg[r["peer"]]["top1_best"]["std"], abs=1e-3)
        assert r["top1_last"] == pytest.approx(agg[r["peer"]]["top1_last"]["values"][str(r["seed"])], abs=1e-3)
    plain = rows[4:]
    assert all(r["n_seeds"] is None and r["group"] == "" for r in plain)  # another lr: not a seed of the group
    # the one override that differs among the compared runs is a column of its own
    assert [r["peers.a.optimizer.lr"] for r in rows] == [None] * 4 + [0.01, 0.01]
    assert "train.epochs" not in rows[0]  # the same in every run

    assert main(["compare", "quick", "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    a0 = rows[0]
    assert f"{a0['last_mean']:.2f} ± {a0['last_std']:.2f}" in out and "peers.a.optimizer.lr" in out
    png = tmp_path / "compare.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_compare_selects_runs_and_names_bad_input(store, tmp_path, capsys):
    assert main(["compare", "quick", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--format", "json",
                 "--runs", "quick-dml seeds 0,1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["run"] for r in rows} == {"quick-dml-seed0", "quick-dml-seed1"}
    assert main(["compare", "quick", "--tracking-uri", store["uri"], "--runs", "quick-dml-sed0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --runs: unknown run 'quick-dml-sed0' (did you mean") and len(err.splitlines()) == 1
    assert main(["compare", "quik", "--tracking-uri", store["uri"]]) == 2
    assert capsys.readouterr().err.startswith("error: EXPERIMENT: unknown experiment 'quik' (did you mean quick?)")


def test_seed_runs_resume(tmp_path, capsys):
    out = str(tmp_path / "r")
    args = ["run", DML, *QUICK, "--seeds", "3,4", "--out", out, "--no-tracking"]
    assert main([*args, "--stop-after-epochs", "1"]) == 0
    assert not json.loads((tmp_path / "r" / "summary.json").read_text())["finished"]
    assert main(args) == 2 and "already holds a seed group" in capsys.readouterr().err
    assert main([*args, "--resume", "--json"]) == 0
    agg = json.loads(capsys.readouterr().out)
    assert agg["finished"] and agg["runs"]["3"]["epochs"] == 2 and agg["runs"]["4"]["epochs"] == 2


def test_compare_identifies_runs_and_names_overrides_in_full(store, tmp_path, capsys):
    from online_kd.compare import collect, differing_overrides, legend_label

    rows = collect(store["uri"], "quick")
    assert len({(r.run_id, r.peer) for r in rows}) == len(rows)
    for r in rows:
        assert len(r.started) == len("2026-01-01 00:00:00") and Path(r.out).is_dir() and r.short_id == r.run_id[:8]
    assert {Path(r.out).name for r in rows} == {"seed-0", "seed-1", "plain"}
    paths = differing_overrides(rows)
    plain = next(r for r in rows if r.run == "quick-dml")
    assert legend_label(plain, paths) == f"quick-dml {plain.run_id[:8]} (peers.a.optimizer.lr=0.01)"

    assert main(["compare", "quick", "--tracking-uri", store["uri"], "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "run id" in out and "started" in out and all(r.short_id in out for r in rows)
    assert out.splitlines()[-1] == f"wrote {tmp_path / 'compare.png'}"
    assert main(["compare", "quick", "--tracking-uri", store["uri"], "--out", str(tmp_path), "--format", "csv"]) == 0
    cap = capsys.readouterr()
    assert cap.out == (tmp_path / "compare.csv").read_text()  # stdout is the document; the files are named on stderr
    assert cap.err.strip() == f"wrote {tmp_path / 'compare.csv'} and {tmp_path / 'compare.png'}"


def test_compare_never_merges_peers_of_different_topologies(tmp_path):
    """quick/dml and quick/kdcl both have a peer 'b' (a convnet in one, a convnet_small in the other)."""
    from online_kd.compare import collect, panels

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for name in ("dml", "kdcl"):
        assert main(["run", str(ROOT / f"topologies/quick/{name}.yaml"), *QUICK, "--out", str(tmp_path / name),
                     "--tracking-uri", uri]) == 0
    rows = collect(uri, "quick")
    by_panel = panels(rows)
    assert ("quick-dml", "b") in by_panel and ("quick-kdcl", "b") in by_panel
    for (topology, peer), members in by_panel.items():
        assert {(r.topology, r.peer) for r in members} == {(topology, peer)} and len({r.model for r in members}) == 1
    assert by_panel[("quick-dml", "b")][0].model == "convnet"
    assert by_panel[("quick-kdcl", "b")][0].model == "convnet_small"
    assert len([r for r in rows if r.peer == "b"]) == 2  # one row per run × peer
