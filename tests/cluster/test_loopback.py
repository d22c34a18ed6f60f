"""The embedded instance listens on loopback only: every TCP socket reelfarm's run starts.

A render with no address, recorded by Prefect, runs in a child process. When its first
chunk commits (an event on the run's bus, so every part of the run is up: Prefect's
temporary server, the GCS, the raylet, the render workers, the agents), the child lists
the listening TCP sockets of its whole process tree, found by parent and child, not by
name, and prints them. Every one must be on a loopback address.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from reelfarm.cluster.runtime import is_loopback
from tests.films import write_film

pytestmark = pytest.mark.ffmpeg

CHILD = r"""
import json, os, sys
import psutil
from ray._private import ray_constants
from reelfarm import events
from reelfarm.flows.film import record_run, render_film_flow
from reelfarm.settings import Settings

spec, out = sys.argv[1], sys.argv[2]
seen = []

def listeners():
    me = psutil.Process()
    rows = []
    for p in [me, *me.children(recursive=True)]:
        try:
            conns = p.net_connections(kind="tcp")
            cmd = " ".join(p.cmdline())[:160]
        except psutil.Error:  # gone since: it listens nowhere
            continue
        rows += [{"pid": p.pid, "cmd": cmd, "ip": c.laddr.ip, "port": c.laddr.port}
                 for c in conns if c.status == psutil.CONN_LISTEN]
    return rows

def on_event(e):
    if e.kind == "chunk_done" and not seen:
        seen.append(listeners())

events.subscribe(on_event)
summary = record_run(render_film_flow, spec, out, Settings(workers=1))
print("LISTENERS " + json.dumps({"ok": summary["ok"], "listeners": seen[0] if seen else None,
                                 "cluster_switch": ray_constants.ENABLE_RAY_CLUSTER}))
"""


def test_embedded_run_listens_on_loopback_only(tmp_path):
    spec = write_film(tmp_path / "spec")
    # The embedded Ray instance and Prefect's temporary server: no address for either.
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFECT_API_URL")}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(spec), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=os.getcwd())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("LISTENERS "))
    report = json.loads(line.removeprefix("LISTENERS "))
    assert report["ok"]
    assert report["cluster_switch"] is True  # Ray's switch is back: a later join is Ray's own
    rows = report["listeners"]
    # The snapshot saw the run's parts (else "all on loopback" would prove nothing).
    cmds = " ".join(r["cmd"] for r in rows)
    for part in ("gcs_server", "raylet", "DashboardAgent", "RuntimeEnvAgent", "ChunkWorker", "prefect.server"):
        assert part in cmds, (part, rows)
    wide = [r for r in rows if not is_loopback(r["ip"])]
    assert not wide, wide
