"""`online-kd tune`: a real Ray Tune sweep (local Ray, 2 CPUs, ASHA on) and the MLflow tree it leaves;
`compare` on that tree; space files that are wrong fail before Ray starts, naming their place."""
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from online_kd.cli import main
from online_kd.topology import load_topology
from online_kd.topology.load import read_yaml
from online_kd.tune import check_space, load_space, metric_epochs

ROOT = Path(__file__).resolve().parents[1]
KD = ROOT / "topologies/quick/kd.yaml"
SPACE = {
    "metric": "peers.student.top1",
    "mode": "max",
    "num_samples": 2,
    "search_seed": 0,
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "params": {"edges[0].temperature": {"choice": [1, 4]}, "edges[0].alpha": {"uniform": [0.5, 0.9]}},
}
QUICK = ["--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=3"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """One real sweep feeds every test here: 2 trials of quick/kd.yaml (2+2 epochs, 3 steps each) on 2 CPUs."""
    d = tmp_path_factory.mktemp("sweep")
    (d / "space.yaml").write_text(yaml.safe_dump(SPACE))
    uri = f"sqlite:///{d / 'mlflow.db'}"
    r = subprocess.run([sys.executable, "-m", "online_kd.cli", "tune", str(KD), "--space", "space.yaml", *QUICK,
                        "--num-cpus", "2", "--out", "sweep", "--tracking-uri", uri, "--json", "--quiet"],
                       cwd=d, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"dir": d, "uri": uri, "summary": json.loads(r.stdout), "stderr": r.stderr,
            "client": MlflowClient(tracking_uri=uri)}


def _runs(client, **tags):
    exp = client.get_experiment_by_name("quick")
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items()) or ""
    return client.search_runs([exp.experiment_id], filter_string=flt, max_results=1000)


def test_sweep_names_the_best_trial(sweep):
    s = sweep["summary"]
    assert [t["trial"] for t in s["trials"]] == ["trial-000", "trial-001"]
    assert s["scheduler"] == "asha" and s["max_t"] == 2  # the student is measured in its 2 epochs
    reported = {t["trial"]: t["metric"] for t in s["trials"]}
    assert all(v is not None for v in reported.values())
    best = max(reported, key=reported.get)
    assert s["best"]["trial"] == best
    assert f"best trial: {best}" in sweep["stderr"]
    for t in s["trials"]:
        temp, alpha = t["overrides"]["edges[0].temperature"], t["overrides"]["edges[0].alpha"]
        assert temp in (1, 4) and 0.5 <= alpha <= 0.9
        run_dir = Path(t["out"])
        history = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        student = [h["nodes"]["student"]["top1"] for h in history if "top1" in h["nodes"].get("student", {})]
        assert t["measurements"] == len(student) and t["metric"] == pytest.approx(student[-1])
        # Tune got one report per measurement of the metric (all of them unless ASHA stopped the trial)
        assert t["reports"] == len(student) if t["status"] == "done" else 1 <= t["reports"] <= len(student)
        assert t["metrics"]["peers.student.top1"] == pytest.approx(student[t["reports"] - 1])
        assert t["metrics"]["peers.student.best_top1"] == pytest.approx(max(student[: t["reports"]]))
        trial_topology = yaml.safe_load((run_dir / "topology.yaml").read_text())
        assert trial_topology["edges"][0]["temperature"] == temp
        assert trial_topology["edges"][0]["alpha"] == pytest.approx(alpha)
        assert t["status"] in ("done", "stopped") and (t["status"] == "done") == (run_dir / "summary.json").is_file()
        if t["status"] == "stopped":  # ASHA cut it at a rung, before its last measurement
            assert t["reports"] < s["max_t"]
    assert (sweep["dir"] / "sweep" / "sweep.json").is_file()


def test_mlflow_tree_sweep_trials_peers(sweep):
    client, s = sweep["client"], sweep["summary"]
    (parent,) = _runs(client, **{"online_kd.kind": "sweep"})
    assert parent.info.run_id == s["sweep_run_id"] and parent.info.status == "FINISHED"
    assert parent.data.tags["best_trial"] == s["best"]["trial"]
    assert parent.data.params["metric"] == "peers.student.top1" and parent.data.params["scheduler"] == "asha"
    assert parent.data.params["space.edges.0.temperature"] == "choice[1, 4]"
    trials = _runs(client, **{"mlflow.parentRunId": parent.info.run_id})
    assert sorted(t.info.run_name for t in trials) == ["trial-000", "trial-001"]
    by_name = {t["trial"]: t for t in s["trials"]}
    for trial in trials:
        t = by_name[trial.info.run_name]
        assert trial.data.tags["online_kd.kind"] == "topology"
        assert float(trial.data.params["edges.0.alpha"]) == pytest.approx(t["overrides"]["edges[0].alpha"])
        assert trial.data.params["edges.0.temperature"] == str(t["overrides"]["edges[0].temperature"])
        assert trial.data.tags["best"] == ("true" if t["trial"] == s["best"]["trial"] else "false")
        assert trial.info.status == ("FINISHED" if t["status"] == "done" else "KILLED")
        peers = {p.info.run_name: p for p in _runs(client, **{"mlflow.parentRunId": trial.info.run_id})}
        assert set(peers) == {"teacher", "student"}
        student = client.get_metric_history(peers["student"].info.run_id, "top1")
        assert [m.step for m in sorted(student, key=lambda m: m.step)] == [3, 4][: t["measurements"]]
        assert max(student, key=lambda m: m.step).value == pytest.approx(t["metric"])
        assert client.get_metric_history(peers["student"].info.run_id, "loss")  # losses per epoch too
        assert len(client.get_metric_history(peers["teacher"].info.run_id, "top1")) >= 2


def test_compare_reads_the_sweep(sweep, tmp_path, capsys):
    client = sweep["client"]
    rc = main(["compare", "quick", "--tracking-uri", sweep["uri"], "--out", str(tmp_path), "--format", "json"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert sorted((r["run"], r["peer"]) for r in rows) == [("trial-000", "student"), ("trial-000", "teacher"),
                                                           ("trial-001", "student"), ("trial-001", "teacher")]
    for r in rows:
        curve = sorted(client.get_metric_history(
            _runs(client, **{"mlflow.parentRunId": r["run_id"], "online_kd.node": r["peer"]})[0].info.run_id, "top1"),
            key=lambda m: m.step)
        assert r["top1_last"] == pytest.approx(curve[-1].value) and r["epochs"] == curve[-1].step
        best = max(curve, key=lambda m: m.value)
        assert r["top1_best"] == pytest.approx(best.value) and r["best_epoch"] == best.step
        assert r["model"] == {"teacher": "convnet", "student": "convnet_small"}[r["peer"]]
        assert r["role"] == r["peer"] and r["group"] == "quick-kd tune space"
        assert r["best_trial"] == (r["run"] == sweep["summary"]["best"]["trial"])
        assert r["n_seeds"] is None  # both trials have seed 0: nothing to average over
    png = tmp_path / "compare.png"
    assert png.is_file() and png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "compare.json").read_text()) == rows

    assert main(["compare", "quick", "--tracking-uri", sweep["uri"], "--out", str(tmp_path), "--format", "csv"]) == 0
    table = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(t["run"], t["peer"], float(t["top1_last"])) for t in table] == \
           [(r["run"], r["peer"], pytest.approx(r["top1_last"])) for r in rows]
    differing = [p for p in ("edges[0].temperature", "edges[0].alpha")
                 if len({str(t["overrides"][p]) for t in sweep["summary"]["trials"]}) > 1]
    assert differing and all(p in table[0] for p in differing)  # the overrides that differ are columns

    assert main(["compare", "quick", "--tracking-uri", sweep["uri"], "--out", str(tmp_path), "--format", "markdown",
                 "--runs", "trial-001"]) == 0
    md = capsys.readouterr().out.strip().splitlines()
    assert md[0].startswith("| group | run | run id | started | seed | peer |") and set(md[1]) <= {"|", "-"}
    assert len(md) == 4 and all("trial-001" in line for line in md[2:])


def test_shipped_spaces_fit_their_topologies():
    for topo, space in (("kd", "kd_temperature"), ("dml", "dml_lr")):
        sp = load_space(ROOT / "configs/tune" / f"{space}.yaml")
        raw = read_yaml(ROOT / "topologies/quick" / f"{topo}.yaml")
        assert check_space(sp, raw, [0, 1]) == len(metric_epochs(load_topology(raw), sp.config.metric))


def test_metric_epochs_follow_stages():
    kd = load_topology(KD, ["train.epochs=3", "train.eval_every=2"])
    assert metric_epochs(kd, "peers.student.top1") == [3, 5]  # trained in epochs 3-5; evaluated at 2, 4, 6 (last)
    assert metric_epochs(kd, "peers.teacher.top1") == [1, 3, 5]
    assert metric_epochs(kd, "peers.mean.top1") == [1, 3, 5]


BAD = [
    ({"params": {"edges[0].temprature": {"choice": [1, 2]}}},
     'space.params."edges[0].temprature": edges[0].temprature: unknown key, did you mean \'temperature\'?'),
    ({"params": {"peers.studnt.optimizer.lr": {"choice": [0.1]}}},
     'space.params."peers.studnt.optimizer.lr": unknown peer \'studnt\' (did you mean student?)'),
    ({"params": {"edges[3].alpha": {"choice": [0.5]}}}, 'space.params."edges[3].alpha": edges[3]: no such item'),
    ({"params": {"edges[0].temperature": {"normal": [1, 2]}}},
     'space.params."edges[0].temperature": unknown distribution \'normal\''),
    ({"params": {"edges[0].temperature": [1, 2]}}, 'space.params."edges[0].temperature": expected a distribution'),
    ({"params": {"edges[0].alpha": {"uniform": [0.9, 0.5]}}},
     'space.params."edges[0].alpha".uniform: low must be below high (got [0.9, 0.5])'),
    ({"params": {"peers.student.optimizer.lr": {"loguniform": [0, 0.1]}}},
     'space.params."peers.student.optimizer.lr".loguniform: needs 0 < low < high'),
    ({"params": {"train.max_steps_per_epoch": {"randint": [1.5, 4]}}},
     'space.params."train.max_steps_per_epoch".randint: expected two integers'),
    ({"params": {"edges[0].alpha": {"uniform": [0.5, 1.5]}}},
     'space.params."edges[0].alpha": edges[0].alpha: Input should be less than or equal to 1'),
    ({"metric": "peers.studnt.top1"}, "space.metric: unknown peer 'studnt' (did you mean student?)"),
    ({"metric": "student.accuracy"}, "space.metric: 'student.accuracy' is not one of peers.<peer>.top1"),
    ({"metric": "ensemble.ens.top1"}, "space.metric: the topology has no ensembles"),
    ({"mode": "maximum"}, "space.mode: Input should be 'max' or 'min' (got 'maximum')"),
    ({"scheduler": {"name": "hyperband"}}, "space.scheduler.name: Input should be 'asha' or 'none'"),
    ({"scheduler": {"name": "asha", "grace_period": 50}}, "space.scheduler.grace_period: 50 is beyond the 10"),
    ({"num_sample": 3}, "space.num_sample: unknown key, did you mean 'num_samples'?"),
    ({"search": "optuna"}, "space.search: optuna is not installed: pip install optuna"),
]


@pytest.mark.parametrize("change, message", BAD, ids=[m.split(":")[0] + str(i) for i, (_, m) in enumerate(BAD)])
def test_bad_space_is_one_line_exit_2(tmp_path, capsys, change, message):
    if change.get("search") == "optuna":
        try:
            import optuna  # noqa: F401
            pytest.skip("optuna is installed")
        except ImportError:
            pass
    space = {"metric": "peers.student.top1", "params": {"edges[0].alpha": {"uniform": [0.5, 0.9]}}, **change}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    rc = main(["tune", str(KD), "--space", str(tmp_path / "space.yaml"), "--out", str(tmp_path / "out"),
               "--no-tracking"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith(f"error: {message}"), err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # failed before anything started


def test_seeds_and_a_seed_path_in_the_space_clash(tmp_path, capsys):
    space = {"metric": "peers.student.top1", "params": {"train.seed": {"grid": [0, 1]}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    assert main(["tune", str(KD), "--space", str(tmp_path / "space.yaml"), "--seeds", "0,1", "--no-tracking"]) == 2
    assert capsys.readouterr().err.startswith("error: --seeds: the space already varies train.seed")
    assert main(["tune", str(KD), "--space", str(tmp_path / "space.yaml"), "--seeds", "0,x", "--no-tracking"]) == 2
    assert capsys.readouterr().err.startswith("error: --seeds: expected integers")


def test_seeds_of_a_configuration_are_compared_at_the_same_depth():
    from types import SimpleNamespace

    from online_kd.tune import Space, SpaceConfig, TrialOutcome
    from online_kd.tune.sweep import _summarise

    def trial(name, temp, seed, series, status):
        return TrialOutcome(name=name, trial_id=name, overrides={"edges[0].temperature": temp, "train.seed": seed},
                            value=series[-1], best=max(series), epoch=None, measurements=len(series),
                            status=status, series=series)

    outcomes = [trial("t0", 1, 0, [50.0, 60.0, 90.0], "done"), trial("t1", 1, 1, [55.0], "stopped"),
                trial("t2", 4, 0, [58.0, 70.0], "stopped"), trial("t3", 4, 1, [61.0, 72.0], "stopped")]
    space = Space(SpaceConfig(metric="peers.student.top1", params={"x": 1}), {}, Path("s.yaml"), "")
    s = _summarise(SimpleNamespace(name="kd"), space, [0, 1], Path("."), outcomes, max_t=3)
    first, second = s["configs"]
    # T=1 is judged where both of its seeds were measured: its 1st measurement (50, 55), not 90 vs 55
    assert second["overrides"] == {"edges[0].temperature": 1} and second["depth"] == 1
    assert second["mean"] == pytest.approx(52.5) and second["std"] == pytest.approx(5 / 2 ** 0.5)
    assert first["overrides"] == {"edges[0].temperature": 4} and first["depth"] == 2
    assert first["mean"] == pytest.approx(71.0) and first["best_mean"] == pytest.approx(71.0)
    assert s["best"]["trials"] == ["t2", "t3"] and s["best"]["trial"] == "t3"
    from rich.console import Console

    from online_kd.tune import print_sweep

    con = Console(record=True, width=200)
    print_sweep(s, con)
    text = con.export_text()
    assert "71.00 ± 1.41" in text and "52.50 ± 3.54" in text
    assert "best trial: t3 (edges[0].temperature=4): peers.student.top1 = 71.00 ± 1.41 over 2 seeds (measurement 2)" in text


def test_ray_engine_trial_drives_a_torch_trainer_and_reports_each_epoch(tmp_path):
    """engine: ray — the trial is the Train driver (Train v2 pattern): its workers' epochs reach Tune and MLflow."""
    space = {"metric": "peers.student.top1", "num_samples": 1, "scheduler": "none",
             "params": {"edges[0].temperature": {"choice": [4]}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = subprocess.run([sys.executable, "-m", "online_kd.cli", "tune", str(KD), "--space", "space.yaml", *QUICK,
                        "--set", "train.epochs=1", "--engine", "ray", "--num-cpus", "4", "--out", "sweep",
                        "--tracking-uri", uri, "--json", "--quiet"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    (t,) = json.loads(r.stdout)["trials"]
    assert t["status"] == "done" and t["measurements"] == 1 and t["reports"] == 1
    history = [json.loads(x) for x in (Path(t["out"]) / "metrics.jsonl").read_text().splitlines()]
    assert [h["stage"] for h in history] == ["teacher", "student"]
    assert t["metric"] == pytest.approx(history[-1]["nodes"]["student"]["top1"])
    client = MlflowClient(tracking_uri=uri)
    (trial,) = _runs(client, **{"online_kd.trial": "trial-000", "online_kd.kind": "topology"})
    assert trial.data.params["engine"] == "ray" and trial.info.status == "FINISHED"
    peers = {p.info.run_name: p for p in _runs(client, **{"mlflow.parentRunId": trial.info.run_id})}
    assert set(peers) == {"teacher", "student"}
    (student,) = client.get_metric_history(peers["student"].info.run_id, "top1")
    assert student.step == 2 and student.value == pytest.approx(t["metric"])


def test_follower_reports_complete_lines_once_per_epoch(tmp_path):
    """The ray-engine trial's follower of metrics.jsonl: a half-written line waits; a re-reported epoch is skipped."""
    import threading

    from online_kd.rundir import RunDir

    path = tmp_path / "metrics.jsonl"
    seen = []
    rec = lambda e: json.dumps({"epoch": e, "nodes": {"s": {"top1": float(e)}}})  # noqa: E731
    path.write_text(rec(1) + "\n" + rec(2) + "\n" + rec(2) + "\n" + rec(3)[:10])  # restart re-reported 2; 3 mid-write
    stop = threading.Event()
    stop.set()
    RunDir(tmp_path).follow(lambda epoch, nodes: seen.append(epoch), stop)
    assert seen == [1, 2]
    path.write_text(path.read_text()[: -10] + rec(3) + "\n")
    seen.clear()
    RunDir(tmp_path).follow(lambda epoch, nodes: seen.append(epoch), stop)
    assert seen == [1, 2, 3]
