"""Ray Train's torch.distributed set-up, with the rendezvous store listening only where its clients connect.

Ray Train joins the workers with ``init_method="env://"``: rank 0 hosts torch's ``TCPStore`` at
MASTER_ADDR:MASTER_PORT (the node address of rank 0), and torch binds that store to every interface
whatever MASTER_ADDR says. :class:`BoundStoreTorchConfig` makes rank 0 bind it to MASTER_ADDR
itself (127.0.0.1 on a local instance, the node's address on a cluster): every rank connects there.
"""
from __future__ import annotations

import importlib
import ipaddress
import socket

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


class BoundStoreTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store listens on MASTER_ADDR only."""

    @property
    def backend_cls(self):
        return _BoundStoreBackend


class _BoundStoreBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        worker_group.execute(bind_store_to_master_addr)  # in every worker, before it joins the process group
        super().on_start(worker_group, backend_config)


def bind_store_to_master_addr() -> None:
    """Makes this process's rank-0 rendezvous store listen on its host address instead of every interface."""
    from torch.distributed import TCPStore

    rendezvous = importlib.import_module("torch.distributed.rendezvous")  # the package's name is also a function
    original = rendezvous._create_c10d_store
    if getattr(original, "binds_to_host", False):
        return

    def create(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or rendezvous._agent_store_serves(hostname, port) or not _is_ip(hostname):
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        sock = socket.socket(socket.AF_INET6 if ":" in hostname else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((hostname, port))
        sock.listen(max(128, world_size))
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True, timeout=timeout,
                        multi_tenant=True, master_listen_fd=sock.detach(), use_libuv=use_libuv)

    create.binds_to_host = True
    rendezvous._create_c10d_store = create


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
