"""MLflow tracking for topology runs: one parent run per topology, one child run per node.

Layout in MLflow::

    experiment
    └── parent run  (run_name; params = the whole resolved config, flattened to dotted keys)
        ├── child run "a"    (tags online_kd.node=a, online_kd.role=...; params = node params;
        │                     metrics logged per epoch with step=epoch)
        ├── child run "b"
        └── child run "ens"  (ensembles get a child run too)

Nesting is MLflow's convention: the tag ``mlflow.parentRunId`` on each child.

Everything goes through :class:`mlflow.tracking.MlflowClient` with explicit run ids, never
through the global ``mlflow.start_run`` state, so one :class:`RunTracker` can live in any single
process (the local driver, or a Ray Train controller-side callback) and be re-attached after a
restart with :meth:`RunTracker.state` / :meth:`RunTracker.resume`.

Sweeps and seed repeats add a level on top (``nest_under``): the sweep or seed group is a run
of its own (:meth:`RunTracker.open_group`), each topology run its child, each node a grandchild::

    experiment
    └── sweep run "quick-kd tune"   (online_kd.kind=sweep; params = the search space)
        ├── topology run "trial-000"  (params include the overridden paths; tag best=true)
        │   ├── child run "teacher"
        │   └── child run "student"
        └── topology run "trial-001"  …

SQLite stores take several writing processes (the trials of a sweep) only because MLflow sets a
20 s ``busy_timeout`` on each session; keep them few, or use ``mlflow server`` for many.

Metric and param names are sanitised for MLflow (see :func:`sanitize_key`): MLflow accepts only
alphanumerics, ``_ - . /``, spaces (and ``:`` off Windows), so an edge metric such as
``edge/a->b`` is logged as ``edge/a_to_b``; any other rejected character becomes ``_``.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunTracker", "default_tracking_uri", "flatten_params", "sanitize_key"]

# MLflow's limits (mlflow.utils.validation); hard-coded fallbacks keep this module importable
# and stable should those private names move.
try:  # pragma: no cover - depends on the installed mlflow
    from mlflow.utils.validation import (
        MAX_ENTITY_KEY_LENGTH,
        MAX_METRICS_PER_BATCH,
        MAX_PARAM_VAL_LENGTH,
        MAX_PARAMS_TAGS_PER_BATCH,
        MAX_TAG_VAL_LENGTH,
    )
except Exception:  # pragma: no cover
    MAX_ENTITY_KEY_LENGTH = 250
    MAX_METRICS_PER_BATCH = 1000
    MAX_PARAM_VAL_LENGTH = 6000
    MAX_PARAMS_TAGS_PER_BATCH = 100
    MAX_TAG_VAL_LENGTH = 8000

#: Tag names set by this module.
TAG_NODE = "online_kd.node"
TAG_ROLE = "online_kd.role"
TAG_KIND = "online_kd.kind"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
TAG_TOPOLOGY = "online_kd.topology"
TAG_NODES = "online_kd.nodes"
TAG_SEED = "online_kd.seed"
TAG_TRIAL = "online_kd.trial"
TAG_OUT = "online_kd.out"
TAG_OVERRIDES = "online_kd.overrides"  # JSON {path: value} of the overrides that made this run

_STATUSES = ("FINISHED", "FAILED", "KILLED")
_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def default_tracking_uri(cwd: str | os.PathLike | None = None) -> str:
    """Tracking URI to use when none is configured.

    ``$MLFLOW_TRACKING_URI`` if set (non-empty), else ``sqlite:///<absolute cwd>/mlflow.db``.
    The path is made absolute so that the store does not move when a worker changes directory
    (``sqlite:///`` + ``/abs/path`` gives the four-slash absolute form).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    base = os.path.abspath(os.fspath(cwd) if cwd is not None else os.getcwd())
    return "sqlite:///" + os.path.join(base, "mlflow.db")


def sanitize_key(key: str) -> str:
    """Map an arbitrary metric/param name onto one MLflow accepts.

    ``->`` becomes ``_to_`` and ``<-`` becomes ``_from_`` (edge names such as ``edge/a->b``);
    every other character outside ``[A-Za-z0-9_-. /]`` becomes ``_`` (``:`` too, because
    Windows stores reject it). Empty, ``.`` and ``..`` path segments are removed or replaced,
    since MLflow also rejects names that are not normalised paths. Cut to MLflow's key length.
    """
    s = str(key).replace("->", "_to_").replace("<-", "_from_")
    s = _BAD_CHARS.sub("_", s)
    parts = []
    for seg in s.split("/"):
        if seg == "":
            continue
        if set(seg) == {"."}:
            seg = "_" * len(seg)
        parts.append(seg)
    s = "/".join(parts) or "_"
    return s[:MAX_ENTITY_KEY_LENGTH]


def flatten_params(params: Mapping[str, Any] | None, prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings to dotted keys with ``str()``-ed values truncated to MLflow's
    param-value limit; sequences are kept whole (``str(list)``). Keys are sanitised."""
    out: dict[str, str] = {}

    def rec(obj: Any, pre: str) -> None:
        if isinstance(obj, Mapping) and (obj or not pre):
            for k, v in obj.items():
                rec(v, f"{pre}.{k}" if pre else str(k))
        else:
            out[sanitize_key(pre)] = str(obj)[:MAX_PARAM_VAL_LENGTH]

    rec(params or {}, prefix)
    return out


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(value: Any) -> float | None:
    """float(value) if it is a finite number (also 0-d tensors / numpy scalars), else None."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _metric_entities(values: Mapping[str, Any], step: int, ts: int) -> list:
    """MLflow Metric entities for finite values; sanitised keys, clashes get a numeric suffix."""
    from mlflow.entities import Metric

    out, seen = [], set()
    for key, value in values.items():
        f = _finite(value)
        if f is None:
            continue
        name = sanitize_key(key)
        base, n = name, 2
        while name in seen:
            name = f"{base[: MAX_ENTITY_KEY_LENGTH - 4]}_{n}"
            n += 1
        seen.add(name)
        out.append(Metric(key=name, value=f, timestamp=ts, step=int(step)))
    return out


def _default_artifact_location(uri: str, experiment: str) -> str | None:
    """For ``sqlite:///`` stores, keep artifacts beside the database (``<db dir>/mlartifacts/
    <experiment>``) instead of MLflow's ``./mlruns`` relative to whatever the cwd is. Other
    stores (HTTP servers) decide themselves."""
    if not uri.startswith("sqlite:///"):
        return None
    db_path = uri[len("sqlite:///") :]
    if not db_path or db_path.startswith(":memory:"):
        return None
    db_dir = Path(db_path).expanduser().resolve().parent
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment) or "default"
    return (db_dir / "mlartifacts" / name).as_uri()


class RunTracker:
    """One MLflow parent run per topology run, one child run per node (peer or ensemble).

    Why: a topology trains several networks together; putting each node in its own nested run
    lets the MLflow UI compare peers directly (same metric names, one chart), while the parent
    holds the config, the summary and the artifacts (topology picture, curves, YAML).

    Usage::

        tr = RunTracker(uri, "cifar100", "dml-r18-r18")
        tr.start({"a": {"model": "resnet18", "role": "peer"}, ...}, params=config)
        tr.log_epoch(0, {"a": {"val/top1": 61.2, "edge/b->a": 0.3}, ...})
        ckpt["tracker"] = tr.state()         # after a restart: RunTracker.resume(ckpt["tracker"])
        tr.log_summary({"a": {"top1_best": 70.1}})
        tr.finish()

    Also a context manager: ``with tracker:`` finishes with FAILED on an exception (KILLED on
    KeyboardInterrupt), FINISHED otherwise. Picklable (the client is re-created lazily).
    """

    #: Node name under which :meth:`log_epoch` logs on the parent run instead of a child.
    PARENT = "__parent__"

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str,
        tags: dict[str, str] | None = None,
        artifact_location: str | None = None,
        nest_under: str | None = None,
        kind: str = "topology",
    ):
        self.uri = str(uri)
        self.experiment = str(experiment)
        self.run_name = str(run_name)
        self.tags = {str(k): str(v) for k, v in (tags or {}).items()}
        self.artifact_location = artifact_location
        self.nest_under = nest_under  # run id of a sweep / seed group this run belongs to
        self.kind = str(kind)
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.child_run_ids: dict[str, str] = {}
        self._client = None
        self._finished = False
        self._logged: dict[str, dict[str, int]] = {}  # run id -> metric -> last step the store holds (resume)

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def client(self):
        """The :class:`mlflow.tracking.MlflowClient` bound to :attr:`uri` (created lazily)."""
        if self._client is None:
            from mlflow.tracking import MlflowClient

            if self.uri.startswith("sqlite:///"):
                db = Path(self.uri[len("sqlite:///") :])
                if db.is_absolute():
                    db.parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_client"] = None
        return d

    def _get_or_create_experiment(self) -> str:
        """Experiment id for :attr:`experiment`, created if missing (restored if deleted).
        Tolerates another process creating it at the same time."""
        from mlflow.exceptions import MlflowException

        client = self.client
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            location = self.artifact_location or _default_artifact_location(
                self.uri, self.experiment
            )
            try:
                return client.create_experiment(self.experiment, artifact_location=location)
            except MlflowException as e:
                exp = client.get_experiment_by_name(self.experiment)
                if exp is None:  # not the creation race: a real error
                    raise e
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    def _require_started(self) -> None:
        if self.parent_run_id is None:
            raise RuntimeError("RunTracker not started: call start() or RunTracker.resume()")

    def _log_batch(self, run_id: str, metrics=(), params=(), tags=()) -> None:
        """log_batch respecting MLflow's per-call limits (one call unless they are exceeded)."""
        held = self._logged.get(run_id, {})
        metrics = [m for m in metrics if m.step > held.get(m.key, -1)]  # a resumed run repeats no step
        params, tags = list(params), list(tags)
        while metrics or params or tags:
            p, params = params[:MAX_PARAMS_TAGS_PER_BATCH], params[MAX_PARAMS_TAGS_PER_BATCH:]
            t, tags = tags[:MAX_PARAMS_TAGS_PER_BATCH], tags[MAX_PARAMS_TAGS_PER_BATCH:]
            room = MAX_METRICS_PER_BATCH - len(p) - len(t)
            m, metrics = metrics[:room], metrics[room:]
            self.client.log_batch(run_id, metrics=m, params=p, tags=t)

    def _log_params(self, run_id: str, params: Mapping[str, Any] | None) -> None:
        from mlflow.entities import Param

        flat = flatten_params(params)
        self._log_batch(run_id, params=[Param(k, v) for k, v in flat.items()])

    def _run_id_for(self, node: str) -> str:
        if node == self.PARENT:
            return self.parent_run_id  # type: ignore[return-value]
        try:
            return self.child_run_ids[node]
        except KeyError:
            raise KeyError(
                f"unknown node {node!r}: known nodes are {sorted(self.child_run_ids)} "
                f"(use RunTracker.PARENT for the parent run)"
            ) from None

    # -- public API ---------------------------------------------------------------------------

    def start(self, nodes: dict[str, dict[str, object]], params: dict[str, object]) -> None:
        """Create the parent run and one child run per node.

        ``params`` (nested allowed) are logged on the parent, flattened to dotted keys, values
        ``str()``-ed and truncated to MLflow's limit. Each node's dict is logged as that child's
        params; the child is named after the node and tagged ``online_kd.node`` (node name),
        ``online_kd.role`` (``node.get('role')``, when given) and ``mlflow.parentRunId``.
        """
        from mlflow.entities import RunTag

        if self.parent_run_id is not None:
            raise RuntimeError("RunTracker already started")
        client = self.client
        self.experiment_id = self._get_or_create_experiment()
        parent_tags = {**self.tags, TAG_KIND: self.kind}
        if self.nest_under:
            parent_tags[TAG_PARENT] = str(self.nest_under)
        parent = client.create_run(
            self.experiment_id, start_time=_now_ms(), tags=parent_tags, run_name=self.run_name
        )
        self.parent_run_id = parent.info.run_id
        self._finished = False
        try:
            self._log_params(self.parent_run_id, params)
            for node, node_params in nodes.items():
                node_params = dict(node_params or {})
                child_tags = {
                    **self.tags,
                    TAG_KIND: "node",
                    TAG_PARENT: self.parent_run_id,
                    TAG_NODE: str(node),
                }
                if node_params.get("role") is not None:
                    child_tags[TAG_ROLE] = str(node_params["role"])
                child_tags = {k: v[:MAX_TAG_VAL_LENGTH] for k, v in child_tags.items()}
                run = client.create_run(
                    self.experiment_id, start_time=_now_ms(), tags=child_tags, run_name=str(node)
                )
                self.child_run_ids[str(node)] = run.info.run_id
                self._log_params(run.info.run_id, node_params)
            client.log_batch(
                self.parent_run_id,
                tags=[RunTag(TAG_NODES, ",".join(self.child_run_ids)[:MAX_TAG_VAL_LENGTH])],
            )
        except BaseException:
            self.finish("FAILED")
            raise

    def state(self) -> dict:
        """JSON-able ids (uri, experiment, parent and child run ids) to store in a checkpoint,
        so that :meth:`resume` continues the same MLflow history after a restart."""
        self._require_started()
        return {
            "version": 1,
            "uri": self.uri,
            "experiment": self.experiment,
            "experiment_id": self.experiment_id,
            "run_name": self.run_name,
            "tags": dict(self.tags),
            "parent_run_id": self.parent_run_id,
            "child_run_ids": dict(self.child_run_ids),
            "nest_under": self.nest_under,
            "kind": self.kind,
        }

    @classmethod
    def resume(cls, state: dict) -> "RunTracker":
        """Re-attach to the runs recorded by :meth:`state` and mark them RUNNING again.

        Nothing is re-created and params are not re-logged. Metrics logged afterwards append to
        the same histories. MLflow cannot delete points, so the steps each metric already holds
        are read back and never logged again: a resume that repeats an epoch logs it once.
        """
        tr = cls(
            state["uri"],
            state.get("experiment", ""),
            state.get("run_name", ""),
            tags=state.get("tags"),
            nest_under=state.get("nest_under"),
            kind=state.get("kind", "topology"),
        )
        tr.experiment_id = state.get("experiment_id")
        tr.parent_run_id = state["parent_run_id"]
        tr.child_run_ids = dict(state.get("child_run_ids", {}))
        client = tr.client
        for run_id in [tr.parent_run_id, *tr.child_run_ids.values()]:
            client.update_run(run_id, status="RUNNING")
        tr._logged = tr._last_steps()
        return tr

    def _last_steps(self) -> dict[str, dict[str, int]]:
        """Run id -> metric -> the last step the store holds: what a resumed run must not log again
        (a kill can fall between logging an epoch and checkpointing it)."""
        out: dict[str, dict[str, int]] = {}
        for run_id in [self.parent_run_id, *self.child_run_ids.values()]:
            for key in self.client.get_run(run_id).data.metrics:
                steps = [m.step for m in self.client.get_metric_history(run_id, key)]
                out.setdefault(run_id, {})[key] = max(steps, default=-1)
        return out

    def log_epoch(self, epoch: int, metrics: dict[str, dict[str, float]]) -> None:
        """Log ``metrics`` (node -> {metric: value}) with ``step=epoch`` on each node's child
        run, one ``log_batch`` call per run. Non-finite values (nan, inf) and non-numbers are
        skipped; names are sanitised (``edge/b->a`` -> ``edge/b_to_a``, see
        :func:`sanitize_key`). Node :attr:`PARENT` logs on the parent run."""
        self._require_started()
        ts = _now_ms()
        for node, values in metrics.items():
            run_id = self._run_id_for(node)
            entities = _metric_entities(values or {}, int(epoch), ts)
            if entities:
                self._log_batch(run_id, metrics=entities)

    def log_summary(self, summary: dict[str, dict[str, float]]) -> None:
        """Final per-node numbers (e.g. ``top1_last``, ``top1_best``): logged on each child run
        and, prefixed with the node name (``a.top1_best``), on the parent so that runs of
        different topologies can be compared in one table."""
        self._require_started()
        ts = _now_ms()
        parent_values: dict[str, Any] = {}
        for node, values in summary.items():
            values = values or {}
            if node == self.PARENT:
                parent_values.update(values)
                continue
            entities = _metric_entities(values, 0, ts)
            if entities:
                self._log_batch(self._run_id_for(node), metrics=entities)
            for k, v in values.items():
                parent_values[f"{node}.{k}"] = v
        entities = _metric_entities(parent_values, 0, ts)
        if entities:
            self._log_batch(self.parent_run_id, metrics=entities)  # type: ignore[arg-type]

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local file or directory as an artifact of the parent run."""
        self._require_started()
        self.client.log_artifact(self.parent_run_id, os.fspath(path), artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Store ``text`` as the artifact ``artifact_file`` (e.g. ``topology.yaml``) of the
        parent run."""
        self._require_started()
        self.client.log_text(self.parent_run_id, text, artifact_file)

    def set_tags(self, tags: Mapping[str, Any], node: str = PARENT) -> None:
        """Set tags (values ``str()``-ed) on the parent run or on a node's child run."""
        from mlflow.entities import RunTag

        self._require_started()
        entities = [RunTag(sanitize_key(k) if not str(k).startswith("mlflow.") else str(k),
                           str(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        self._log_batch(self._run_id_for(node), tags=entities)

    @classmethod
    def open_group(
        cls,
        uri: str,
        experiment: str,
        run_name: str,
        kind: str,
        params: Mapping[str, Any] | None = None,
        tags: dict[str, str] | None = None,
    ) -> "RunTracker":
        """A run that groups topology runs (``kind`` 'sweep' or 'seeds'): no node children of its
        own; topology runs join it with ``RunTracker(..., nest_under=group.parent_run_id)``."""
        tr = cls(uri, experiment, run_name, tags=tags, kind=kind)
        tr.start({}, dict(params or {}))
        return tr

    def finish(self, status: str = "FINISHED") -> None:
        """Terminate the child runs, then the parent, with ``status`` ("FINISHED", "FAILED" or
        "KILLED"). Idempotent; children are terminated even if one of them fails."""
        status = str(status).upper()
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {_STATUSES}, got {status!r}")
        if self.parent_run_id is None or self._finished:
            return
        end = _now_ms()
        errors: list[BaseException] = []
        for run_id in [*self.child_run_ids.values(), self.parent_run_id]:
            try:
                self.client.set_terminated(run_id, status=status, end_time=end)
            except Exception as e:  # keep terminating the others
                errors.append(e)
        self._finished = True
        if errors:
            raise errors[0]

    def __enter__(self) -> "RunTracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        elif issubclass(exc_type, KeyboardInterrupt):
            self.finish("KILLED")
        else:
            self.finish("FAILED")

    def __repr__(self) -> str:
        return (
            f"RunTracker(uri={self.uri!r}, experiment={self.experiment!r}, "
            f"run_name={self.run_name!r}, parent_run_id={self.parent_run_id!r}, "
            f"nodes={sorted(self.child_run_ids)})"
        )


def close_sweep(sweep: RunTracker, summary: dict, outcomes: list) -> None:
    """A sweep's end in MLflow: close what stopped trials left open, tag each trial's status and the best
    configuration, close the sweep run. ``outcomes``: the trials (``name``, ``status``; ``run_id`` is set here)."""
    from mlflow.entities import RunTag

    client = sweep.client
    trial_runs = client.search_runs([sweep.experiment_id], max_results=5000,
                                    filter_string=f"tags.{TAG_PARENT} = '{sweep.parent_run_id}'")
    by_name = {r.data.tags.get(TAG_TRIAL): r for r in trial_runs}
    best = summary["best"] or {"trials": []}
    end = int(time.time() * 1000)
    for o in outcomes:
        run = by_name.get(o.name)
        if run is None:
            continue
        o.run_id = run.info.run_id
        tags = [RunTag("online_kd.status", o.status), RunTag("best", str(o.name in best["trials"]).lower())]
        client.log_batch(run.info.run_id, tags=tags)
        if o.status != "done" and run.info.status != "FINISHED":  # stopped by ASHA: Tune ended its process
            status = "FAILED" if o.status == "error" else "KILLED"
            nodes = client.search_runs([sweep.experiment_id], max_results=1000,
                                       filter_string=f"tags.{TAG_PARENT} = '{run.info.run_id}'")
            for r in [*nodes, run]:
                if r.info.status != status:
                    client.set_terminated(r.info.run_id, status=status, end_time=end)
    for t in summary["trials"]:
        t["run_id"] = next((o.run_id for o in outcomes if o.name == t["trial"]), None)
    if summary["best"]:
        b = summary["best"]
        sweep.set_tags({"best_trial": b["trial"], "best_trials": ",".join(b["trials"]),
                        "best_overrides": json.dumps(b["overrides"], sort_keys=True, default=str)})
        sweep.log_summary({sweep.PARENT: {"best_mean": b["mean"], "best_std": b["std"]}})
    sweep.finish("FINISHED")
