"""Shared test fixtures. Each section is owned by the module it serves; keep them self-contained."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests import s3 as _s3

# ---- markers ------------------------------------------------------------------------------
# slow: runs with RUN_SLOW=1. gpu: runs where torch sees CUDA. ffmpeg: runs where an ffmpeg
# binary exists (on PATH, or the one the imageio-ffmpeg wheel ships).


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import os
    import shutil

    run_slow = os.environ.get("RUN_SLOW") == "1"
    has_gpu: bool | None = None
    has_ffmpeg: bool | None = None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: set RUN_SLOW=1"))
        if "gpu" in item.keywords:
            if has_gpu is None:
                import torch

                has_gpu = torch.cuda.is_available()
            if not has_gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if "ffmpeg" in item.keywords:
            if has_ffmpeg is None:
                try:
                    import imageio_ffmpeg

                    has_ffmpeg = bool(imageio_ffmpeg.get_ffmpeg_exe())
                except Exception:  # noqa: BLE001 - no wheel binary for this platform
                    has_ffmpeg = shutil.which("ffmpeg") is not None
            if not has_ffmpeg:
                item.add_marker(pytest.mark.skip(reason="needs an ffmpeg binary"))


# ---- S3 (moto) ---------------------------------------------------------------------------
# Owned by the chunk store (reelfarm/cluster/store.py); helpers live in tests/s3.py.
# `s3_server` (session): a moto S3 server on 127.0.0.1 with fake AWS credentials in the
# environment. `s3_bucket` (function): a fresh, empty bucket, removed afterwards.


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, Any]]:
    """``{"endpoint_url": ..., "storage_options": {...}}`` of a session-wide moto S3 server."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _s3.AWS_ENV.items():
            mp.setenv(name, value)
        for name in _s3.AWS_ENV_UNSET:
            mp.delenv(name, raising=False)
        moto = _s3.start_moto_server()
        try:
            yield moto.as_dict()
        finally:
            moto.stop()


@pytest.fixture
def s3_bucket(s3_server: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A fresh bucket: ``{"name", "url": "s3://<name>", "endpoint_url", "storage_options"}``."""
    options = s3_server["storage_options"]
    name = _s3.create_bucket(options)
    yield {
        "name": name,
        "url": f"s3://{name}",
        "endpoint_url": s3_server["endpoint_url"],
        "storage_options": options,
    }
    _s3.delete_bucket(options, name)


# ---- end S3 ------------------------------------------------------------------------------


# ---- Ray (a 3-node local cluster with fake GPUs) -----------------------------------------
# Owned by the farm (reelfarm/cluster/farm.py). One Ray session per test session: starting
# Ray costs ~10 s here. The head holds no GPU; three worker nodes declare one fake GPU each,
# so the farm starts one GPU worker per node (torch falls back to the CPU inside them).


@pytest.fixture(scope="session")
def ray_cluster():
    """A running ``ray.cluster_utils.Cluster`` with the driver connected."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(3):
        cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


# ---- end Ray -----------------------------------------------------------------------------


# ---- Prefect (one API per test session) --------------------------------------------------
# Owned by the flows (reelfarm/flows/film.py). prefect_test_harness runs a temporary
# Prefect API with its own database for the whole session (~6 s to start).


@pytest.fixture(scope="session")
def prefect_api():
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# ---- end Prefect -------------------------------------------------------------------------
