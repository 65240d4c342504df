"""A real two-node Ray cluster on one machine, for the multi-node tests.

``two_node_cluster()`` starts a head (``ray start --head``, node ``a``) and a second node (``ray start
--address``, node ``b``), each with its own ports, temp dir, custom resource (``node_a``/``node_b``)
and node label (``okd-node=a``/``b``), both with token authentication and the token in the cluster's
own directory (``RAY_AUTH_TOKEN_PATH``), so ``~/.ray`` and other Ray instances on the machine are
left alone. Node b runs in a private mount namespace (``unshare -m``) with a tmpfs over
``Cluster.private``: the parent of the tests' run directories is an empty directory there, as it
would be on another machine, while ``Cluster.storage`` (outside the tmpfs) is seen by both nodes,
like an NFS mount. ``Cluster.node_b_view(path)`` reads a path as node b sees it
(``/proc/<pid>/root``, which resolves in that process's mount namespace).

Nothing here uses ``ray stop`` (it stops every Ray process on the machine): each node's processes
carry a marker environment variable, and teardown kills exactly those.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

MARKER = "OKD_TEST_RAY_NODE"  # env var on every process a test node starts: "<cluster dir name>:<node>"
NODE_B_SENTINEL = ".node_b_tmpfs"  # written into node b's tmpfs: proves a view is the private one
START_TIMEOUT_S = 120


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (all held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def marked_pids(name: str, value: str) -> list[int]:
    """Processes (other than this one) whose environment holds ``name=value``."""
    needle = f"{name}={value}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def kill_all(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def private_mount_namespace() -> list[str]:
    """The ``unshare`` prefix that runs a command in a mount namespace of its own, where it may mount a
    tmpfs: plain ``--mount`` as root, else inside a user namespace that maps this user to root."""
    return ["unshare", "--mount", "--propagation", "private", *([] if os.geteuid() == 0 else ["--map-root-user"])]


def can_unshare() -> bool:
    """Whether :func:`private_mount_namespace` works here (unshare present, namespaces allowed)."""
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        probe = subprocess.run([*private_mount_namespace(), "mount", "-t", "tmpfs", "okd-probe", d],
                               capture_output=True, timeout=30)
    return probe.returncode == 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@dataclass
class Node:
    """One ``ray start --block`` process and everything it started (found by its marker)."""

    name: str
    marker: str
    proc: subprocess.Popen
    log: Path

    def pids(self) -> list[int]:
        return marked_pids(MARKER, self.marker)

    def raylet_pid(self) -> int:
        found = [p for p in self.pids() if _comm(p) == "raylet"]
        assert len(found) == 1, f"node {self.name}: raylets {found}"
        return found[0]

    def stop(self) -> None:
        """SIGKILL every process of this node, until none is left (a throwaway node needs no draining)."""
        for _ in range(20):
            pids = self.pids()
            if not pids and self.proc.poll() is not None:
                break
            kill_all(pids + ([self.proc.pid] if self.proc.poll() is None else []))
            time.sleep(0.25)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log.read_text()[-n:]
        except OSError:
            return ""


@dataclass
class Cluster:
    """Addresses, directories and nodes of a running two-node test cluster."""

    root: Path  # short (< 108-byte unix socket paths under the temp dirs)
    token: Path
    gcs_port: int
    dashboard_port: int
    nodes: dict[str, Node] = field(default_factory=dict)

    @property
    def storage(self) -> Path:
        """Seen by both nodes (outside node b's tmpfs): for engine.storage."""
        return self.root / "storage"

    @property
    def private(self) -> Path:
        """Only the head's machine sees what is written here: put run directories and MLflow stores under it."""
        return self.root / "private"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self, base: dict | None = None) -> dict:
        """An environment for drivers and CLIs of this cluster: its address, token auth, its token."""
        env = {k: v for k, v in (base or os.environ).items()
               if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH", MARKER))}
        env.update(RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token))
        return env

    def api(self, path: str) -> dict:
        """GET from the dashboard's REST API (jobs, State API) with the token."""
        req = urllib.request.Request(self.dashboard + path,
                                     headers={"Authorization": f"Bearer {self.token.read_text().strip()}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def alive_nodes(self) -> list[dict]:
        """The State API's ALIVE nodes (node_id, labels, resources_total, ...)."""
        result = self.api("/api/v0/nodes?detail=1&limit=100")["data"]["result"]["result"]
        return [n for n in result if n["state"] == "ALIVE"]

    def node_id(self, name: str) -> str:
        """The Ray node id of node ``name`` ('a' or 'b'), from its label."""
        ids = [n["node_id"] for n in self.alive_nodes() if n["labels"].get("okd-node") == name]
        assert len(ids) == 1, (name, ids)
        return ids[0]

    def node_b_view(self, path: Path) -> Path:
        """``path`` as node b's processes see it (their mount namespace)."""
        return Path(f"/proc/{self.nodes['b'].proc.pid}/root") / Path(path).relative_to("/")

    # ------------------------------------------------------------------ starting nodes
    def _start(self, name: str, args: list[str], wrap: list[str] | None = None) -> Node:
        marker = f"{self.root.name}:{name}:{secrets.token_hex(2)}"
        tmp = self.root / f"node_{name}"
        tmp.mkdir(exist_ok=True)
        (nm, om, metrics, agent_http, agent_grpc, rt_agent) = free_ports(6)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token), **{MARKER: marker})
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", *args,
               f"--node-manager-port={nm}", f"--object-manager-port={om}", f"--metrics-export-port={metrics}",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={rt_agent}", "--num-cpus=2", f"--resources={{\"node_{name}\": 1}}",
               f"--labels=okd-node={name}", f"--temp-dir={tmp}", "--disable-usage-stats"]
        log = self.root / f"node_{name}.log"
        with open(log, "a") as out:
            proc = subprocess.Popen([*(wrap or []), *cmd], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, cwd=self.root)
        node = self.nodes[name] = Node(name, marker, proc, log)
        return node

    def start_head(self) -> None:
        node = self._start("a", ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={self.dashboard_port}",
                                 f"--ray-client-server-port={free_ports(1)[0]}"])
        self._wait(lambda: self._dashboard_up(), node, "the head's dashboard")

    def start_node_b(self) -> None:
        """Node b in its own mount namespace, with an empty tmpfs over ``private``; waits until it is ALIVE."""
        wrap = [*private_mount_namespace(), "sh", "-c",
                'mount -t tmpfs -o size=64m okd-node-b "$0" && touch "$0/' + NODE_B_SENTINEL + '" && exec "$@"',
                str(self.private)]
        before = {n["node_id"] for n in self.alive_nodes()}  # a lost node b may still be listed ALIVE a while
        node = self._start("b", [f"--address={self.address}"], wrap)
        self._wait(lambda: any(n["labels"].get("okd-node") == "b" and n["node_id"] not in before
                               for n in self.alive_nodes()), node, "node b")

    def kill_node_b_raylet(self) -> int:
        """kill -9 node b's raylet (a node lost), then the rest of its processes; returns the raylet's pid."""
        pid = self.nodes["b"].raylet_pid()
        os.kill(pid, signal.SIGKILL)
        self.nodes["b"].stop()
        return pid

    def _dashboard_up(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
        except urllib.error.HTTPError:  # 401 without the token: up
            return True
        except OSError:
            return False
        return True

    def _wait(self, ready, node: Node, what: str) -> None:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if node.proc.poll() is not None:
                raise RuntimeError(f"ray start (node {node.name}) exited with {node.proc.returncode}:\n{node.tail()}")
            try:
                if ready():
                    return
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{what} did not come up in {START_TIMEOUT_S} s:\n{node.tail()}")
            time.sleep(0.5)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            self.nodes[name].stop()


@contextlib.contextmanager
def two_node_cluster() -> Iterator[Cluster]:
    """Starts node a (head) and node b, checks both are ALIVE, yields the Cluster; stops both and removes its files."""
    root = Path(tempfile.mkdtemp(prefix="okdmn-", dir="/tmp"))
    token = root / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    (root / "storage").mkdir()
    (root / "private").mkdir()
    gcs, dash = free_ports(2)
    cluster = Cluster(root, token, gcs, dash)
    try:
        cluster.start_head()
        cluster.start_node_b()
        alive = cluster.alive_nodes()
        assert len(alive) == 2, alive
        yield cluster
    finally:
        cluster.stop()
        left = [p for n in cluster.nodes.values() for p in n.pids()]
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test cluster still running: {left}"
