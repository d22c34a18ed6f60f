"""No orphans: a watchdog that stops what a reelfarm driver started once the driver is gone.

A driver that is killed (``kill -9``, an OOM kill, a lost terminal) runs no clean-up, and
what it started lives on: Prefect's temporary API server, an embedded Ray's GCS, raylet,
dashboard and runtime-env agents, re-parented to init. So ``reelfarm render`` and ``resume``
start this small watchdog in a session of its own. It notes the driver's descendants
every half second; when the driver exits, however it exits, it stops those still running
(SIGTERM, then SIGKILL after a grace period), checking each one's start time so a reused
pid is never touched. Processes of a cluster the driver only joined are not its
descendants and are never touched.

    python -m reelfarm.reaper DRIVER_PID
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

__all__ = ["main", "start_reaper"]

POLL_S = 0.5
GRACE_S = 3.0


def start_reaper(pid: int | None = None) -> subprocess.Popen | None:
    """Start the watchdog for ``pid`` (default: this process); None where it cannot run."""
    try:
        return subprocess.Popen([sys.executable, "-m", "reelfarm.reaper", str(pid or os.getpid())],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    except OSError:
        return None


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def watch(pid: int) -> list[int]:
    """Watch ``pid`` until it exits, then stop what it left; returns the pids stopped."""
    import psutil

    try:
        driver = psutil.Process(pid)
    except psutil.Error:
        return []
    me = os.getpid()  # this watchdog is the driver's child too: never its own victim
    known: dict[int, psutil.Process] = {}
    while _alive(driver):
        try:
            for child in driver.children(recursive=True):
                if child.pid != me:
                    known.setdefault(child.pid, child)
        except psutil.Error:
            pass
        time.sleep(POLL_S)
    # The driver is gone. Its descendants, and what they started since the last look.
    left = []
    for proc in list(known.values()):
        if not _alive(proc):  # is_running() also compares the start time: a reused pid is not ours
            continue
        left.append(proc)
        try:
            left += [c for c in proc.children(recursive=True) if c.pid not in known and c.pid != me]
        except psutil.Error:
            pass
    for proc in left:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, still = psutil.wait_procs(left, timeout=GRACE_S)
    for proc in still:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return [p.pid for p in left]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not args[0].isdigit():
        print("usage: python -m reelfarm.reaper DRIVER_PID", file=sys.stderr)
        return 2
    watch(int(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
