"""Ray Train's torch backend, with the process group's store served on loopback when the workers are.

A process group meets at a TCPStore served by rank 0, at Ray Train's master address (the node's address,
127.0.0.1 on the local Ray a job starts: ``compute.ray_connection``). torch binds that server to every
interface whatever the address, so a local training run would leave one port open to the network for its
whole length (measured: ``::`` on rank 0, the only non-loopback listener of ``timerefine train``). torch
takes an already-bound socket instead (``TCPStore(master_listen_fd=...)``), so each worker, before Ray
Train sets up its process group, has the store created on a socket bound to the master address itself
when that address is loopback. Runs across machines (a master address that is not loopback) are untouched.

Imported by the training job only where it builds its trainer: it imports Ray, which a job must not do
before ``compute.prepare_local_ray``.
"""

from __future__ import annotations

import datetime
import importlib
import ipaddress
import socket
from typing import Any

from ray.train.backend import Backend
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group serves its store on loopback when the master address is."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: TorchConfig) -> None:
        worker_group.execute(keep_stores_on_loopback)
        super().on_start(worker_group, backend_config)


def keep_stores_on_loopback() -> None:
    """In this process, create the server of a process group's store whose host is a loopback address on a
    socket bound to that address (torch's own would listen on every interface)."""
    # The module, not torch.distributed's function of the same name that `import ... as` would give.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create_store = rendezvous._create_c10d_store
    if getattr(create_store, "keeps_stores_on_loopback", False):
        return

    def create_loopback_store(
        hostname: str, port: int, rank: int, world_size: int, timeout: datetime.timedelta, use_libuv=True
    ):
        if rank != 0 or not _is_loopback(hostname) or rendezvous._torchelastic_use_agent_store():
            return create_store(hostname, port, rank, world_size, timeout, use_libuv)
        family = socket.AF_INET6 if ":" in hostname else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((hostname, port))
        listener.listen(socket.SOMAXCONN)
        return rendezvous.TCPStore(
            host_name=hostname,
            port=port,
            world_size=world_size,
            is_master=True,
            timeout=timeout,
            multi_tenant=True,
            master_listen_fd=listener.detach(),  # the store owns the socket from here on
            use_libuv=use_libuv,
        )

    create_loopback_store.keeps_stores_on_loopback = True
    rendezvous._create_c10d_store = create_loopback_store


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
