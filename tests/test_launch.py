"""Launch files: the cluster YAMLs parse and name what they must; launch/submit.sh submits a real Ray job.

The slow test starts its own Ray head (``ray start --head --block``) on loopback, on free ports, in a
short temp dir, with token authentication on and the token in that temp dir (``RAY_AUTH_TOKEN_PATH``),
so it touches neither ``~/.ray`` nor any other Ray instance on the machine. It does not use
``ray stop``, which would stop every Ray process on the machine: teardown kills only the processes
that carry this head's marker environment variable (every process the head starts inherits it).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from cluster import free_ports, kill_all, marked_pids

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SUBMIT = LAUNCH / "submit.sh"
MARKER = "OKD_TEST_RAY_HEAD"  # env var set on the test head; every Ray process it starts inherits it
ENGINE = "ray"  # the engine the submitted job runs


# ------------------------------------------------------------------ the YAMLs
def test_rayjob_manifest():
    docs = [d for d in yaml.safe_load_all((LAUNCH / "rayjob.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert "online-kd run" in spec["entrypoint"]
    assert "topologies/cifar100/dml.yaml" in spec["entrypoint"] and "--engine ray" in spec["entrypoint"]
    assert "engine.storage=/mnt/shared/" in spec["entrypoint"]  # checkpoints where every pod reaches them
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith(("sqlite:////", "http"))
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"]
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["groupName"] and g["template"]["spec"]["containers"] for g in groups)
    gpu = [g for g in groups
           if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {}) for c in g["template"]["spec"]["containers"])]
    assert gpu, "a GPU worker group"


def test_cluster_launcher_config():
    cfg = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    workers = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert workers and any(t.get("resources", {}).get("GPU", 0) >= 1 for t in workers)
    assert any("pip install" in c for c in cfg["setup_commands"])
    # Ray's own schema for cluster launcher configs (ships with ray).
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)
    # and the launcher's own checks after filling in the AWS defaults (no cloud calls)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))


def test_submit_script_usage():
    assert os.access(SUBMIT, os.X_OK)
    out = subprocess.run([str(SUBMIT), "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "ray job submit" in out.stdout
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    bad = subprocess.run([str(SUBMIT), "topologies/quick/dml.yaml"], capture_output=True, text=True, cwd=ROOT,
                         env={**env, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db", "RAY_ADDRESS": "http://127.0.0.1:9"})
    assert bad.returncode == 2 and "relative" in bad.stderr


def test_cluster_launcher_turns_token_auth_on_and_exposes_nothing_unauthenticated():
    cfg = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    assert any("RAY_AUTH_MODE=token" in o for o in cfg["docker"]["run_options"])
    assert "~/.ray/auth_token" in cfg["file_mounts"].values()  # one token for every node and client
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("export RAY_AUTH_MODE=token;" in c for c in starts), starts
    assert any("auth_token" in c and "exit 1" in c for c in cfg["head_start_ray_commands"])  # no token: no cluster
    commands = [c for key, value in cfg.items() if key.endswith("_commands") for c in value]
    assert commands and not [c for c in commands if "0.0.0.0" in c or "--host=::" in c or "--host ::" in c]
    mlflow = [c for c in commands if "mlflow server" in c]
    assert len(mlflow) == 1 and ("--host 127.0.0.1" in mlflow[0] or "basic-auth" in mlflow[0]), mlflow
    assert "--dashboard-host=127.0.0.1" in starts[0]


def _submit(args: list[str], tmp_path: Path, **env_over: str) -> subprocess.CompletedProcess:
    """submit.sh with no token anywhere (HOME is empty) unless ``env_over`` gives one; nothing listens on :9."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_"))}
    env.update(HOME=str(tmp_path), MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
               RAY_ADDRESS="http://127.0.0.1:9", **env_over)
    return subprocess.run([str(SUBMIT), *args, "topologies/quick/dml.yaml"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=120)


def test_submit_refuses_without_a_token(tmp_path):
    out = _submit([], tmp_path)
    assert out.returncode == 2 and "no Ray auth token" in out.stderr and "--insecure" in out.stderr
    assert "RAY_ADDRESS=" not in out.stderr  # stopped before `ray job submit`
    (tmp_path / "token").write_text("t" * 32)
    off = _submit([], tmp_path, RAY_AUTH_MODE="disabled", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    assert off.returncode == 2 and "RAY_AUTH_MODE=disabled: refusing" in off.stderr
    empty = _submit([], tmp_path, RAY_AUTH_TOKEN_PATH=str(tmp_path / "missing"))
    assert empty.returncode == 2 and "no Ray auth token" in empty.stderr


def test_submit_goes_on_with_a_token_or_when_told_insecure(tmp_path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("t" * 32)
    tok = _submit([], tmp_path)  # ~/.ray/auth_token: on to `ray job submit`, which finds no cluster on :9
    assert "RAY_AUTH_MODE=token" in tok.stderr and "ray job submit" in tok.stderr and tok.returncode != 2
    (tmp_path / ".ray" / "auth_token").unlink()
    insecure = _submit(["--insecure"], tmp_path)
    assert "--insecure" in insecure.stderr and "RAY_AUTH_MODE=<unset>" in insecure.stderr
    assert "ray job submit" in insecure.stderr and insecure.returncode != 2


# ------------------------------------------------------------------ a real local cluster
def _ray_env(base: dict) -> dict:
    env = {k: v for k, v in base.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


@pytest.fixture
def ray_head():
    """A Ray head on loopback with token auth; yields (job server address, client env, temp dir)."""
    if shutil.which("ray") is None:
        pytest.skip("no ray CLI")
    # Ray's unix socket paths live under --temp-dir and must stay short (< 108 bytes).
    tmp = Path(tempfile.mkdtemp(prefix="okdray-", dir="/tmp"))
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    (gcs, dash, client, agent_http, agent_grpc, metrics, rt_agent, nm, om) = free_ports(9)
    env = _ray_env(os.environ)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), **{MARKER: tmp.name})
    cmd = ["ray", "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
           f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
           f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_agent}",
           f"--node-manager-port={nm}", f"--object-manager-port={om}",
           "--num-cpus=4", f"--temp-dir={tmp}", "--disable-usage-stats"]
    log = open(tmp / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp)
    address = f"http://127.0.0.1:{dash}"
    t0 = time.time()
    try:
        deadline = time.time() + 90
        while True:
            if head.poll() is not None:
                pytest.fail(f"ray start exited with {head.returncode}:\n{(tmp / 'head.log').read_text()[-4000:]}")
            try:  # the job server answers (401 without a token also means it is up)
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"the dashboard did not come up:\n{(tmp / 'head.log').read_text()[-4000:]}")
            time.sleep(0.5)
        print(f"ray head up in {time.time() - t0:.1f}s")
        yield address, env, tmp
    finally:
        t1 = time.time()
        # Stop only this head: SIGTERM lets it drain (up to 30 s), which is too slow for a throwaway
        # cluster, so every process it started gets SIGKILL shortly after.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        for _ in range(3):
            pids = marked_pids(MARKER, tmp.name)
            if not pids:
                break
            kill_all(pids, signal.SIGKILL)
            time.sleep(0.5)
        if head.poll() is None:
            head.kill()
            head.wait(timeout=10)
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"ray head stopped in {time.time() - t1:.1f}s")


def _job_api(address: str, token: str, path: str) -> dict:
    """GET from the job server's REST API (the same one `ray job status/logs` use), with the token."""
    req = urllib.request.Request(address + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _json_summary(text: str) -> dict:
    """The last top-level JSON object printed by `online-kd run --json` in a job log."""
    dec = json.JSONDecoder()
    starts = [i for i in range(len(text)) if text.startswith("{\n", i) and (i == 0 or text[i - 1] == "\n")]
    for i in reversed(starts):
        try:
            obj, _ = dec.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(obj, dict) and "peers" in obj:
            return obj
    raise AssertionError(f"no JSON summary in the job log:\n{text[-4000:]}")


@pytest.mark.slow
def test_submit_quick_dml_to_local_cluster(ray_head, tmp_path):
    from mlflow.tracking import MlflowClient

    address, env, _ = ray_head
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    out = tmp_path / "run"
    job_id = f"okd-test-{secrets.token_hex(4)}"
    env = {**env, "RAY_ADDRESS": address, "MLFLOW_TRACKING_URI": uri, "RAY_AUTH_MODE": "token",
           "OKD_SUBMIT_ARGS": f"--submission-id {job_id} --log-style record --log-color false"}
    t0 = time.time()
    try:
        sub = subprocess.run([str(SUBMIT), "topologies/quick/dml.yaml", "--set", "train.epochs=2", "--json",
                              "--out", str(out), "--engine", ENGINE],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        subprocess.run(["ray", "job", "stop", "--address", address, job_id], env=env, capture_output=True, timeout=30)
        pytest.fail(f"job did not finish in 240 s:\n{(e.stdout or b'')[-4000:]!r}")
    elapsed = time.time() - t0
    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    info = _job_api(address, token, f"/api/jobs/{job_id}")
    logs = _job_api(address, token, f"/api/jobs/{job_id}/logs")["logs"]
    assert sub.returncode == 0, f"submit failed ({sub.returncode}):\n{sub.stderr[-3000:]}\n{sub.stdout[-6000:]}"
    assert info["status"] == "SUCCEEDED", (info, logs[-4000:])
    print(f"job {job_id} SUCCEEDED: submit.sh took {elapsed:.1f}s")

    summary = _json_summary(logs)
    assert summary["finished"] is True and summary["epochs"] == 2
    assert set(summary["peers"]) == {"a", "b"}
    assert Path(summary["out"]) == out and (out / "metrics.jsonl").is_file()

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("quick")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=50)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {"a", "b"}
    for run in children.values():
        hist = client.get_metric_history(run.info.run_id, "top1")
        assert sorted(m.step for m in hist) == [1, 2], [(m.step, m.value) for m in hist]
