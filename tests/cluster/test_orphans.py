"""No orphans: after `kill -9` of a render's driver, nothing it started is alive 10 s later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.loader import load_film
from tests.films import write_film

pytestmark = pytest.mark.ffmpeg


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_nothing_outlives_a_killed_driver(tmp_path):
    spec = write_film(tmp_path / "spec")
    plan = plan_film(load_film(spec))
    out = tmp_path / "out"
    store = ChunkStore(str(out))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Embedded Ray and Prefect's temporary server: the processes that used to be left behind.
    driver = subprocess.Popen([sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", str(out),
                               "--chunk-delay", "0.5", "--workers", "1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline and not any(store.is_complete(c.key) for c in plan.chunks):
            assert driver.poll() is None, "the render ended before the test could kill it"
            time.sleep(0.2)
        tree = [p for p in psutil.Process(driver.pid).children(recursive=True)]
        names = " ".join(p.name() for p in tree if _alive(p))
        assert len(tree) >= 3, names  # Prefect's server, Ray's GCS/raylet/workers, the watchdog
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait(30)
    time.sleep(10)
    left = [p for p in tree if _alive(p) and "reelfarm.reaper" not in " ".join(p.cmdline())]
    try:
        assert not left, [(p.pid, p.name(), " ".join(p.cmdline())[:120]) for p in left]
    finally:
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
