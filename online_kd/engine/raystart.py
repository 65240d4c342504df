"""Starts the Ray instance the ray engine and ``tune`` run on, or joins the one at $RAY_ADDRESS.

A local instance is private to this run: it listens on the loopback interface only and requires
Ray's token authentication. Ray turns a loopback node address into the machine's external one (so
that other nodes could join) and then binds its gRPC servers (GCS, raylet, object manager, every
worker and the driver) to all interfaces; a private instance has no other node, so here the node
address stays 127.0.0.1, and every server, agent and the dashboard binds to it.
"""
from __future__ import annotations

import os

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
