"""The local Ray instance that the ray engine and `tune` start listens on loopback only, with token auth on.

The sockets are read from the kernel (psutil) for every process of the instance: the driver, GCS,
raylet, dashboard and its agents, the Train controller and workers (and their torch rendezvous store).
"""
import ipaddress
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from online_kd.engine.raystart import ensure_ray

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def listeners(root: psutil.Process) -> dict[tuple[str, int], str]:
    """(address, port) -> process name, for every listening TCP socket of ``root`` and its descendants."""
    names = {root.pid: root.name()}
    for child in root.children(recursive=True):
        try:
            names[child.pid] = child.name()
        except psutil.Error:
            continue
    return {(c.laddr.ip, c.laddr.port): names[c.pid] for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in names}


def exposed(found: dict[tuple[str, int], str]) -> dict[tuple[str, int], str]:
    """The listeners reachable from another machine: any address that is not loopback (0.0.0.0, ::, a NIC's)."""
    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)

    return {k: v for k, v in found.items() if not loopback(k[0])}


def test_ray_engine_run_listens_on_loopback_only(tmp_path):
    """A whole ray-engine run through the CLI, its listeners sampled every 0.2 s until it exits."""
    cmd = [sys.executable, "-m", "online_kd.cli", "run", str(ROOT / "topologies/quick/dml.yaml"), "--engine", "ray",
           "--no-tracking", "--out", str(tmp_path / "run"), "--set", "train.epochs=1",
           "--set", "train.max_steps_per_epoch=3", "--set", "train.threads=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    root = psutil.Process(proc.pid)
    seen: dict[tuple[str, int], str] = {}
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        try:
            seen.update(listeners(root))
        except psutil.Error:
            pass  # a process ended while being read
        time.sleep(0.2)
    if proc.poll() is None:
        proc.kill()
    err = proc.communicate()[1]
    assert proc.returncode == 0, err[-3000:]
    names = set(seen.values())
    # the sample saw the instance at work, not only its start or end
    for want in ("gcs_server", "raylet", "ray::RayTrainWorker", "ray::TrainController"):  # or 'ray::<actor>.<method>'
        assert any(n == want or n.startswith(want + ".") for n in names), (want, sorted(names))
    assert not exposed(seen), exposed(seen)


def test_local_instance_requires_a_token_even_when_disabled_in_the_env(tmp_path, monkeypatch):
    from ray._raylet import AuthenticationTokenLoader, Config

    token = "okd-test-" + "0" * 32
    (tmp_path / "token").write_text(token)
    # an instance that an earlier test started in this process left its token and auth mode cached
    AuthenticationTokenLoader.instance().reset_cache()
    Config.initialize("")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    import ray

    assert not ray.is_initialized()
    assert ensure_ray(2) is True
    try:
        assert ensure_ray(2) is False  # already up: nothing started twice
        found = listeners(psutil.Process())
        assert found and not exposed(found), found
        url = ray._private.worker.global_worker.node.address_info["webui_url"]
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://{url}/api/version", timeout=10)
        assert refused.value.code in (401, 403)
        req = urllib.request.Request(f"http://{url}/api/version", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    finally:
        ray.shutdown()
        # this process cached the test's token and auth mode: forget them, or the next instance that a
        # test here starts would present the wrong token to its GCS
        monkeypatch.undo()
        AuthenticationTokenLoader.instance().reset_cache()
        Config.initialize("")
