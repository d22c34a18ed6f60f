#!/usr/bin/env python3
"""Scale an autoscaling Ray cluster up to N GPUs, run a command, scale it back down.

    with-gpus 8 -- reelfarm render s3://bucket/films/flame.yaml --out s3://bucket/runs/flame --address auto

Why: reelfarm's farm places one worker per GPU on the nodes that are alive when it starts
(node affinity; reelfarm/cluster/farm.py) and decides GPU or CPU workers once, at start.
It never asks Ray's autoscaler for nodes. So before the render starts this asks the
autoscaler for N one-GPU bundles (``ray.autoscaler.sdk.request_resources``), waits until at
least ``--min`` GPUs have joined (nodes that join later still get workers), runs the
command, and withdraws the request afterwards (the request is kept by the cluster until
it is overridden, so an idle GPU pool would otherwise never scale down).

Runs inside the cluster (a RayJob entrypoint or a Prefect flow-run command on the head);
Ray's token reaches it through the environment like every other Ray process there.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="with-gpus", usage="with-gpus N [options] -- COMMAND...",
                                description=__doc__.splitlines()[0])
    p.add_argument("gpus", type=int, help="one-GPU bundles to ask the autoscaler for")
    p.add_argument("--min", dest="min_gpus", type=int, default=1,
                   help="GPUs that must be up before the command starts (default 1)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds to wait for --min GPUs (spot capacity can be slow; default 1800)")
    p.add_argument("--address", default="auto", help="Ray address (default auto)")
    if "--" not in argv:
        p.error("give the command to run after --")
    i = argv.index("--")
    ns = p.parse_args(argv[:i])
    ns.command = argv[i + 1:]
    if not ns.command:
        p.error("give the command to run after --")
    if ns.gpus < 1 or not 1 <= ns.min_gpus <= ns.gpus:
        p.error("need 1 <= --min <= gpus")
    return ns


def _request(address: str, gpus: int) -> None:
    import ray
    from ray.autoscaler.sdk import request_resources

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        request_resources(bundles=[{"GPU": 1}] * gpus)
    finally:
        ray.shutdown()


def _wait(address: str, want: int, timeout: float) -> int:
    import ray

    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        deadline = time.monotonic() + timeout
        while True:
            have = int(ray.cluster_resources().get("GPU", 0))
            if have >= want or time.monotonic() > deadline:
                return have
            time.sleep(10)
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    ns = _parse(sys.argv[1:] if argv is None else argv)
    _request(ns.address, ns.gpus)
    try:
        have = _wait(ns.address, ns.min_gpus, ns.timeout)
        if have < ns.min_gpus:
            print(f"with-gpus: only {have} GPU(s) after {ns.timeout:.0f} s, wanted {ns.min_gpus}",
                  file=sys.stderr)
            return 75  # EX_TEMPFAIL: try again later
        print(f"with-gpus: {have} GPU(s) up (asked for {ns.gpus}); running {ns.command[0]}", flush=True)
        child = subprocess.Popen(ns.command)  # noqa: S603 - the operator's own command
        for sig in (signal.SIGTERM, signal.SIGINT):  # a stopped job stops the render too
            signal.signal(sig, lambda s, _f: child.send_signal(s))
        return child.wait()
    finally:
        _request(ns.address, 0)  # withdraw: an empty request lets idle GPU nodes go


if __name__ == "__main__":
    sys.exit(main())
