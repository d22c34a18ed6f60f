"""A real multi-process Ray cluster, beside the in-process one of tests/conftest.py.

Three nodes started the way KubeRay and the cluster launcher start them, `ray start --block`,
each in its own session (so its own process group), on this machine: a head and two
workers, one fake GPU each. Token authentication is on for all of them and for the
reelfarm driver, with one token handed to every process through the environment
(``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``; see infra/README.md, "How Ray's auth token
reaches each node"). ``reelfarm render --address 127.0.0.1:PORT`` puts chunks on all
three; one worker node is then killed mid-chunk, like a spot node going away, and the film
still has every chunk exactly once and its exact frame count.

Nothing here calls ``ray.init`` or ``ray stop`` in the test process: the session's
in-process cluster (and anyone else's Ray on this machine) is left alone. Only the
processes this module started are killed, found by their session id.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reelfarm.cluster.manifest import read_manifest
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.render.ffmpeg import probe
from reelfarm.schemas.loader import load_film
from tests.films import write_film

# final.mp4 is probed. The test takes 40-60 s on a busy 2-core machine; the timeout is a backstop.
pytestmark = [pytest.mark.ffmpeg, pytest.mark.timeout(240)]

RAY = str(Path(sys.executable).with_name("ray"))

# Ray's own failure detection, shortened for the test (read by every Ray process from its
# environment, RAY_<config name>): a raylet that stops answering is declared dead after
# about 1.5 s instead of ~15 s. Authentication is not touched by these.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "3",
}


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Every live process in session ``sid`` (Ray's workers leave the node's process group
    for their own, but stay in its session)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the process group ``proc`` leads and whatever else is in its session, until
    none is left (a raylet may be forking a worker while it is killed; a killed process
    takes a moment to die)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + 10
    while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass


@dataclass
class RayNode:
    name: str
    proc: subprocess.Popen
    node_manager_port: int
    log: Path
    node_id: str = ""

    def stop(self) -> None:
        _kill_session(self.proc)


@dataclass
class RayCluster:
    address: str  # 127.0.0.1:GCS_PORT
    env: dict[str, str] = field(repr=False)  # what every Ray process here and the driver get
    root: Path
    nodes: dict[str, RayNode] = field(default_factory=dict)
    token: str = field(default="", repr=False)
    seen: dict = field(default_factory=dict)  # what a driver saw when the nodes were up

    def logs(self) -> str:
        return "\n".join(f"--- {n.name}\n" + n.log.read_text(errors="replace")[-3000:] for n in self.nodes.values())


def _ray_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # no RAY_ADDRESS etc.
    env.update(FAST_FAILURE_DETECTION)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PYTHONUNBUFFERED="1")
    return env


def _start_node(cluster: RayCluster, name: str, *, head: bool, gcs_port: int, worker_ports: range) -> RayNode:
    nm, om, agent, agent_grpc, rt_env, metrics, client = _free_ports(7)
    cmd = [RAY, "start", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "1",
           "--object-store-memory", str(80 * 1024 ** 2),
           # Own ports and temp dir per node: two raylets on one machine must not pick the
           # same socket file or port.
           "--temp-dir", str(cluster.root / name),
           "--node-manager-port", str(nm), "--object-manager-port", str(om),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(rt_env), "--metrics-export-port", str(metrics),
           "--min-worker-port", str(worker_ports.start), "--max-worker-port", str(worker_ports.stop - 1)]
    if head:
        cmd += ["--head", "--port", str(gcs_port), "--include-dashboard", "false",
                "--ray-client-server-port", str(client)]
    else:
        cmd += ["--address", cluster.address]
    log = cluster.root / f"{name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=cluster.env, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    node = RayNode(name, proc, nm, log)
    cluster.nodes[name] = node
    return node


# What a driver sees: run in a subprocess (this process must not ray.init).
_PROBE = r"""
import json, os, sys, time
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
deadline = time.monotonic() + float(sys.argv[2])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) >= int(sys.argv[3]) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
out = {"token_mode": get_authentication_mode() == AuthenticationMode.TOKEN,
       "nodes": {str(n["NodeManagerPort"]): n["NodeID"] for n in alive},
       "gpus": {n["NodeID"]: n["Resources"].get("GPU", 0) for n in alive}}
ray.shutdown()
# The same GCS with a wrong token: refused, so the cluster really checks tokens.
os.environ["RAY_AUTH_TOKEN"] = "0" * 64
from ray._raylet import AuthenticationTokenLoader, GcsClient
AuthenticationTokenLoader.instance().reset_cache()
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"x", None, timeout=5)
    out["wrong_token"] = "accepted"
except Exception as e:
    out["wrong_token"] = f"{type(e).__name__}: {str(e)[:200]}"
print("PROBE " + json.dumps(out), flush=True)
"""


def _probe(cluster: RayCluster, want_nodes: int, timeout: float = 40.0) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, cluster.address, str(timeout), str(want_nodes)],
                          env=cluster.env, capture_output=True, text=True, timeout=timeout + 30)
    for line in done.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    raise AssertionError(f"probe failed ({done.returncode}):\n{done.stdout}\n{done.stderr[-3000:]}\n{cluster.logs()}")


@pytest.fixture
def ray_processes():
    """Head + two workers, each a `ray start --block` in its own session, token auth on.

    The head has a fake GPU too: the farm puts GPU workers only on nodes with a GPU once
    any node has one, so a GPU-less head would take no chunks and "chunks on all three
    nodes" would be impossible. It is never the node that is stopped (it holds the GCS).
    """
    root = Path(tempfile.mkdtemp(prefix="rf-mp-", dir="/tmp"))  # short: Ray's socket paths
    token = secrets.token_hex(32)
    gcs_port, = _free_ports(1)
    cluster = RayCluster(address=f"127.0.0.1:{gcs_port}", env=_ray_env(token), root=root, token=token)
    base = random.randrange(20000, 30000 - 300, 100)  # below the ephemeral range; 100 per node
    t0 = time.monotonic()
    try:
        _start_node(cluster, "head", head=True, gcs_port=gcs_port, worker_ports=range(base, base + 100))
        for i in (1, 2):  # they wait for the GCS themselves
            _start_node(cluster, f"worker{i}", head=False, gcs_port=gcs_port,
                        worker_ports=range(base + 100 * i, base + 100 * (i + 1)))
        seen = _probe(cluster, want_nodes=3)
        for node in cluster.nodes.values():
            node.node_id = seen["nodes"].get(str(node.node_manager_port), "")
        assert all(n.node_id for n in cluster.nodes.values()), f"{seen}\n{cluster.logs()}"
        cluster.seen = seen
        print(f"3 nodes up in {time.monotonic() - t0:.1f} s")
        yield cluster
    finally:
        for node in cluster.nodes.values():
            node.stop()
        shutil.rmtree(root, ignore_errors=True)


def _film(folder: Path) -> Path:
    # 4 shots of 100 frames, 16-frame chunks with 4 of overlap: 32 chunks.
    shots = [
        {"id": "s01_010", "frames": 100, "prompt": "a flame alone on a shelf", "characters": ["flame"]},
        {"id": "s01_020", "frames": 100, "prompt": "a moth flies in", "characters": ["moth"]},
        {"id": "s02_010", "frames": 100, "prompt": "they meet", "characters": ["flame", "moth"]},
        {"id": "s02_020", "frames": 100, "prompt": "the end", "characters": []},
    ]
    return write_film(folder, shots=shots)


class _Events:
    """The driver's --json lines, read as they come."""

    def __init__(self, stream) -> None:
        self.items: list[dict] = []
        self.other: list[str] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            try:
                ev = json.loads(line)
            except ValueError:
                self.other.append(line)
                continue
            with self._lock:
                self.items.append(ev)

    def of(self, kind: str) -> list[dict]:
        with self._lock:
            return [e for e in self.items if e.get("kind") == kind]

    def join(self) -> None:
        self._thread.join(10)


def _wait_for(predicate, timeout: float, what: str, *, driver: subprocess.Popen, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if driver.poll() is not None:
            raise AssertionError(f"the driver exited ({driver.returncode}) while waiting for {what}")
        time.sleep(step)
    raise AssertionError(f"timed out waiting for {what}")


def test_render_on_three_ray_start_nodes_survives_losing_one(ray_processes, tmp_path):
    cluster = ray_processes
    seen = cluster.seen
    # Token auth on throughout: the driver runs in token mode, a wrong token is refused.
    assert seen["token_mode"] is True, seen
    assert seen["wrong_token"].startswith("AuthenticationError") and "InvalidAuthToken" in seen["wrong_token"], seen
    ids = {name: n.node_id for name, n in cluster.nodes.items()}
    assert all(seen["gpus"][i] == 1 for i in ids.values())
    victim = cluster.nodes["worker2"]

    spec = _film(tmp_path / "spec")
    out = tmp_path / "out"
    plan = plan_film(load_film(spec))
    assert len(plan.chunks) >= 30
    cmd = [sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", str(out),
           "--address", cluster.address, "--no-prefect", "--chunk-delay", "0.5", "--json"]
    stderr_log = tmp_path / "driver.err"
    t_driver = time.monotonic()
    with open(stderr_log, "wb") as err:
        driver = subprocess.Popen(cmd, env=cluster.env, stdout=subprocess.PIPE, stderr=err, text=True,
                                  start_new_session=True)
    def report() -> str:
        return f"driver stderr:\n{stderr_log.read_text(errors='replace')[-4000:]}\n{cluster.logs()}"

    try:
        events = _Events(driver.stdout)

        def node_of(ev: dict) -> str:  # worker ids are "<node id[:8]>/gpu-N"
            return next((name for name, i in ids.items() if ev.get("worker", "").startswith(i[:8])), "?")

        # Chunks finished on all three nodes, then the victim is inside its next chunk.
        _wait_for(lambda: {node_of(e) for e in events.of("chunk_done")} >= set(ids), 60,
                  "chunks on all three nodes", driver=driver)
        done_before = len(events.of("chunk_done"))
        starts = len([e for e in events.of("chunk_start") if node_of(e) == "worker2"])
        _wait_for(lambda: len([e for e in events.of("chunk_start") if node_of(e) == "worker2"]) > starts, 10,
                  "the victim to start a chunk", driver=driver)
        time.sleep(0.2)
        print(f"chunks on all three nodes {time.monotonic() - t_driver:.1f} s after the driver started")
        victim.stop()  # the whole node: raylet, its agents, its worker processes
        assert not _session_pids(victim.proc.pid)
        stopped_at = time.monotonic()

        rc = driver.wait(90)
        events.join()
    except (AssertionError, subprocess.TimeoutExpired) as e:
        raise AssertionError(f"{e}\n{report()}") from None
    finally:
        if driver.poll() is None:
            _kill_session(driver)
    assert rc == 0, report()
    assert done_before < len(plan.chunks), "the node must be stopped mid-run"

    # Every chunk exactly once: committed, announced done once, recorded done in the manifest.
    keys = {c.key for c in plan.chunks}
    store = ChunkStore(str(out))
    assert all(store.is_complete(k) for k in keys)
    done = Counter(e["key"] for e in events.of("chunk_done"))
    assert set(done) == keys and set(done.values()) == {1}, done
    summary = events.of("summary")[-1]
    assert summary["ok"] and summary["rendered"] == len(keys) and summary["failed"] == 0, summary
    assert summary["nodes_used"] == 3, summary

    rows = read_manifest(store).to_pylist()
    assert {r["content_key"] for r in rows} == keys and all(r["status"] == "done" for r in rows)
    assert {r["node"] for r in rows} == set(ids.values())  # chunks on all three nodes
    retried = [r for r in rows if r["attempts"] > 1]
    assert retried, "the chunk the stopped node was rendering is retried"
    assert all(r["node"] != victim.node_id for r in retried)
    assert any(e["worker"].startswith(victim.node_id[:8]) for e in events.of("worker_lost")), report()

    # The cut: exactly the plan's frames.
    assert probe(str(out / "final.mp4")).frames == plan.frames
    print(f"stopped {victim.name} after {done_before}/{len(keys)} chunks; "
          f"the run ended {time.monotonic() - stopped_at:.1f} s later")
