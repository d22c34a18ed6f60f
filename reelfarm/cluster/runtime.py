"""Start or join Ray, in one place, and see what the cluster offers.

With no address (and no ``RAY_ADDRESS``) an embedded local instance of reelfarm's own is
started, sized to the machine, on loopback only (see :func:`_loopback_node`): never a
cluster another process started here. With an address (``auto``, ``HOST:PORT``,
``ray://...``, or ``RAY_ADDRESS``) an existing cluster is joined, as Ray does it. Ray's
token authentication is left as Ray sets it (on by default since 2.52).
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray

__all__ = ["ClusterInfo", "NodeSlots", "connect", "draining_nodes", "gpus_per_node", "is_loopback",
           "node_slots"]

logger = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class NodeSlots:
    """Worker slots on one alive node: ``gpus`` GPU workers or ``cpus`` CPU workers (a GPU
    worker holds ``gpus_per_worker`` GPUs, see :func:`node_slots`)."""

    node_id: str
    address: str
    gpus: int
    cpus: int


@dataclass(frozen=True)
class ClusterInfo:
    started: bool  # True when this process started an embedded instance
    address: str
    nodes: int
    gpus: float
    cpus: float


@contextmanager
def _loopback_node() -> Iterator[None]:
    """While an embedded instance starts: its node IP is 127.0.0.1, so every server binds loopback.

    Ray binds its servers by the node IP: the GCS, raylet, object manager and core
    workers' gRPC servers listen on 127.0.0.1 when the node IP is 127.0.0.1 and on every
    interface otherwise; the dashboard agent, runtime-env agent and the monitor's and
    dashboard's metrics bind the node IP itself. But ``ray.init(_node_ip_address=
    "127.0.0.1")`` alone does nothing: ``ray.init`` passes it through
    ``services.resolve_ip_for_localhost``, which turns a loopback address into the
    machine's routable IP unless ``ray_constants.ENABLE_RAY_CLUSTER`` is false (Ray's
    switch for single-machine Ray on macOS and Windows, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``
    read once at import). So the switch is off for the start only: the node's processes
    get the IP on their command lines and keep it; the switch is back on before anything
    else (a later join of a real cluster) could read it.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP, IPv4-mapped IPv6 included) is a loopback address."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None,
            include_dashboard: bool = False, dashboard_host: str = "127.0.0.1") -> ClusterInfo:
    """Join ``address`` or start a local Ray instance; reuse one already running here."""
    started = False
    if not ray.is_initialized():
        kwargs: dict = {"log_to_driver": False, "configure_logging": False}
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": always a new instance of our own, never whatever cluster was last
            # started on this machine (which a bare ray.init() would join). Token auth
            # stays on as Ray sets it; only its notice, printed on every run, is quietened.
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            with _loopback_node():
                ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, _node_ip_address=LOOPBACK,
                         include_dashboard=include_dashboard, dashboard_host=dashboard_host, **kwargs)
            started = True
            node = ray._private.worker.global_worker.node
            node_ip = node.node_ip_address if node is not None else LOOPBACK
            if not is_loopback(node_ip):  # a Ray whose switch moved: say so, the test will too
                logger.warning("embedded Ray runs on %s, not loopback: its servers listen on every "
                               "interface", node_ip)
    res = ray.cluster_resources()
    info = ClusterInfo(
        started=started,
        address=ray.get_runtime_context().gcs_address,
        nodes=len([n for n in ray.nodes() if n.get("Alive")]),
        gpus=res.get("GPU", 0.0),
        cpus=res.get("CPU", 0.0),
    )
    logger.info("ray: %s", info)
    return info


def draining_nodes() -> set[str]:
    """Nodes Ray is draining (spot preemption, scale-down), by hex id; empty where this Ray
    cannot say."""
    try:
        from ray._private.state import state

        return {str(n) for n in state.get_draining_nodes()}
    except Exception:  # noqa: BLE001 - an older Ray, or the GCS busy: no drain news this time
        return set()


def node_slots(*, workers: int | None = None, exclude: set[str] | frozenset[str] = frozenset(),
               gpu: bool | None = None, gpus_per_worker: int = 1) -> list[NodeSlots]:
    """Alive nodes and how many workers each can hold: one per ``gpus_per_worker`` GPUs of
    the node (a node with fewer holds none), else CPU workers.

    With ``gpu`` (default: any GPU in the cluster) only GPU workers are made. Without,
    ``workers`` CPU workers are spread over the nodes (default: one per two cores of this
    machine, at least one).
    """
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if gpu is None:
        gpu = any(n["Resources"].get("GPU") for n in alive)
    nodes = [n for n in alive if n["NodeID"] not in exclude]
    out = []
    if gpu:
        for n in nodes:
            g = int(n["Resources"].get("GPU", 0)) // gpus_per_worker
            if g:
                out.append(NodeSlots(n["NodeID"], n.get("NodeManagerAddress", ""), g, 0))
        return out
    want = workers or max(1, (os.cpu_count() or 2) // 2)
    cpu_nodes = [n for n in nodes if int(n["Resources"].get("CPU", 0)) >= 1]
    for i, n in enumerate(cpu_nodes):
        cap = int(n["Resources"].get("CPU", 0))
        share = want // len(cpu_nodes) + (1 if i < want % len(cpu_nodes) else 0)
        if share:
            out.append(NodeSlots(n["NodeID"], n.get("NodeManagerAddress", ""), 0, min(share, cap)))
    return out


def gpus_per_node(exclude: set[str] | frozenset[str] = frozenset()) -> dict[str, int]:
    """GPUs of each alive node (hex id), as Ray counts them."""
    return {n["NodeID"]: int(n["Resources"].get("GPU", 0)) for n in ray.nodes()
            if n.get("Alive") and n["NodeID"] not in exclude}
