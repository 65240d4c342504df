"""Starts the Ray instance the ray engine and ``tune`` run on, or joins the one at $RAY_ADDRESS.

A local instance is private to this run: it listens on the loopback interface only and requires
Ray's token authentication. Ray turns a loopback node address into the machine's external one (so
that other nodes could join) and then binds its gRPC servers (GCS, raylet, object manager, every
worker and the driver) to all interfaces; a private instance has no other node, so here the node
address stays 127.0.0.1, and every server, agent and the dashboard binds to it.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

HEALTH_CHECK_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_DEFAULT = "0.25"  # Ray's 2 s default lets each ray.train.report block up to 2 s
AUTH_MODE_ENV = "RAY_AUTH_MODE"
LOOPBACK = "127.0.0.1"


def ensure_ray(num_cpus: int, log_to_driver: bool = True, logging_level: str = "INFO") -> bool:
    """Connects to $RAY_ADDRESS, or starts a loopback-only local instance with ``num_cpus`` logical CPUs.

    Returns True if this call started or connected Ray (the caller then owns ``ray.shutdown()``),
    False if Ray was already up (e.g. inside a Tune trial). The Train controller's poll interval
    ($RAY_TRAIN_HEALTH_CHECK_INTERVAL_S) defaults to 0.25 s; a value already set (a job's runtime env)
    is left alone. The dashboard keeps running: it serves the State API that Ray Train queries.
    ``log_to_driver``: other processes' output forwarded to this one; ``logging_level``: of the driver's
    ``ray`` loggers (WARNING keeps Ray's start-up lines out of a run's output).
    """
    import ray

    preset = HEALTH_CHECK_ENV in os.environ  # e.g. by a job's runtime env, which ray.init must not contradict
    os.environ.setdefault(HEALTH_CHECK_ENV, HEALTH_CHECK_DEFAULT)
    if ray.is_initialized():
        return False
    init = {"log_to_driver": log_to_driver, "logging_level": logging_level}
    runtime_env = None if preset else {"env_vars": {HEALTH_CHECK_ENV: os.environ[HEALTH_CHECK_ENV]}}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, **init)
    else:
        _start_local(num_cpus, runtime_env, init)
    return True


def _start_local(num_cpus: int, runtime_env: dict | None, init: dict) -> None:
    import ray
    from ray._private import services

    _require_token_auth()
    resolve = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host  # keep 127.0.0.1 as the node address
    try:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env, _node_ip_address=LOOPBACK, dashboard_host=LOOPBACK,
                 **init)
    finally:
        services.resolve_ip_for_localhost = resolve


def _require_token_auth() -> None:
    """Token authentication on for the instance about to start (a token is made if none exists)."""
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "token":
        return
    os.environ[AUTH_MODE_ENV] = "token"  # read by this process and every Ray process it starts
    from ray._raylet import Config

    Config.initialize("")  # Ray's config caches the mode it read when first loaded


class RayStarting:
    """:func:`ensure_ray` in a background thread, so that Ray's processes start while the driver builds the
    plan (the dry forward) and opens its MLflow runs; :meth:`wait` returns what it returned.

    The thread lives on until :meth:`release` (after ``ray.shutdown()``) or the process exits: Ray binds
    the processes it starts to the thread that started them (``PR_SET_PDEATHSIG``), so they would be
    killed when a short-lived thread ended.
    """

    def __init__(self, num_cpus: int, **options):
        self._started: bool | None = None
        self._error: BaseException | None = None
        self._ready, self._released = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._start, args=(num_cpus,), kwargs=options,
                                        name="online-kd-ray", daemon=True)
        self._thread.start()

    def _start(self, num_cpus: int, **options) -> None:
        worker_log = logging.getLogger("ray._private.worker")
        worker_log.addFilter(_not_main_thread)
        try:
            self._started = ensure_ray(num_cpus, **options)
        except BaseException as err:  # raised again in the caller's thread by wait()
            self._error = err
        finally:
            worker_log.removeFilter(_not_main_thread)
            self._ready.set()
        if self._started:
            self._released.wait()

    def wait(self) -> bool:
        """True if this started or connected Ray (the caller owns ``ray.shutdown()``); raises what the start raised."""
        self._ready.wait()
        if self._error is not None:
            raise self._error
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init sets from the main thread
        return bool(self._started)

    def release(self) -> None:
        """Ray is shut down (or lives on without this process's thread): let the thread end."""
        self._released.set()

    def abandon(self) -> None:
        """The run stopped before it needed Ray: wait for the start, then shut down what it started."""
        self._ready.wait()
        if self._started:
            import ray

            ray.shutdown()
        self.release()


def _not_main_thread(record: logging.LogRecord) -> bool:
    """Drops ray.init's warning that it cannot set a SIGTERM handler outside the main thread (wait() sets it)."""
    return "SIGTERM handler is not set" not in record.getMessage()
