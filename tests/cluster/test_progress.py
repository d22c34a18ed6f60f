"""Progress while a render runs: live bars on a terminal, a line per event in a pipe, JSON
lines with --json; and Ctrl-C. Real `reelfarm render` processes on the session's Ray cluster."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from reelfarm.cluster.manifest import read_manifest
from reelfarm.cluster.store import ChunkStore
from reelfarm.flows.plan import plan_film
from reelfarm.schemas.loader import load_film
from tests.films import write_film

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.ffmpeg]
TWO_SHOTS = [
    {"id": "s01_010", "frames": 40, "prompt": "a flame alone", "characters": ["flame"]},
    {"id": "s01_020", "frames": 40, "prompt": "a moth flies in", "characters": ["moth"]},
]


def _cmd(ray_cluster, spec, out, *extra):
    return [sys.executable, "-m", "reelfarm.cli", "render", str(spec), "--out", str(out),
            "--address", ray_cluster.address, "--no-prefect", "--chunk-delay", "0.6", *extra]


def _committed(out, plan) -> int:
    store = ChunkStore(str(out))
    return sum(store.is_complete(c.key) for c in plan.chunks)


def test_progress_in_a_pipe_is_a_line_per_event_while_chunks_run(ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec", shots=TWO_SHOTS)
    plan = plan_film(load_film(spec))
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(ray_cluster, spec, out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    seen_midway = None
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if seen_midway is None and line.split()[1:2] == ["chunk_done"] and "[shot s01_010 1/" in line:
            seen_midway = _committed(out, plan)
    assert proc.wait(120) == 0, "".join(lines)
    # Per-shot progress was printed while chunks were still to come, not only at the end.
    assert seen_midway is not None and seen_midway < len(plan.chunks), "".join(lines)
    assert any("chunk_start" in ln and "s01_020/" in ln for ln in lines)
    assert any(ln.split()[1:2] == ["run_done"] for ln in lines)
    assert "\x1b[" not in "".join(lines)  # no cursor movement or colour in a pipe


def test_progress_on_a_terminal_is_live(ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec", shots=TWO_SHOTS)
    plan = plan_film(load_film(spec))
    out = tmp_path / "out"
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    proc = subprocess.Popen(_cmd(ray_cluster, spec, out), stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    text, midway = "", None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536).decode(errors="replace")
            except OSError:
                break
            if not chunk:
                break
            text += chunk
            # The farm line with some, not all, chunks done, drawn while others still render.
            partial = [int(a) for a, b in re.findall(r"(\d+)/(\d+) chunks \(", text) if 0 < int(a) < int(b)]
            if midway is None and partial and "s01_010" in text:
                midway = _committed(out, plan)
        elif proc.poll() is not None:
            break
    assert proc.wait(30) == 0, text[-3000:]
    os.close(master)
    assert midway is not None and midway < len(plan.chunks), text[-3000:]
    assert "\x1b[" in text  # a live display redraws in place
    assert "workers busy" in text and "GPU-s" in text and "ETA" in text


def test_json_progress_covers_every_chunk_start_and_end(ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec", shots=TWO_SHOTS)
    plan = plan_film(load_film(spec))
    out = tmp_path / "out"
    proc = subprocess.run(_cmd(ray_cluster, spec, out, "--json"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]  # every line is JSON
    keys = {c.key for c in plan.chunks}
    assert {e["key"] for e in events if e["kind"] == "chunk_start"} == keys
    assert {e["key"] for e in events if e["kind"] == "chunk_done"} == keys
    assert events[-1]["kind"] == "summary" and events[-1]["ok"] is True
    starts = {e["key"]: e["at"] for e in events if e["kind"] == "chunk_start"}
    assert all(e["at"] >= starts[e["key"]] for e in events if e["kind"] == "chunk_done")


def test_ctrl_c_keeps_chunks_marks_nothing_running_and_says_how_to_resume(ray_cluster, tmp_path):
    spec = write_film(tmp_path / "spec", shots=TWO_SHOTS)
    plan = plan_film(load_film(spec))
    out = tmp_path / "out"
    proc = subprocess.Popen(_cmd(ray_cluster, spec, out, "--json"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if json.loads(line)["kind"] == "chunk_done":
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    kept = _committed(out, plan)
    said = re.search(rf"(\d+) of {len(plan.chunks)} chunks are committed", err)
    # A worker killed mid-write may still land its commit after the count: never fewer.
    assert said and 1 <= int(said.group(1)) <= kept < len(plan.chunks), err
    assert f"reelfarm resume {out}" in err
    assert "Traceback" not in err
    rows = read_manifest(ChunkStore(str(out))).to_pylist()
    assert not [r for r in rows if r["status"] == "running"]
