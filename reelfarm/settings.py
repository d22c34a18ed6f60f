"""Run settings, read once at entry points (env prefix ``REELFARM_``) and passed down."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from reelfarm.render.checkpoints import CheckpointPolicy

__all__ = ["Settings"]


class Settings(BaseSettings):
    """How a run uses the cluster. Every field can be set as ``REELFARM_<NAME>``.

    Attributes:
        address: Ray cluster to join (``auto``, ``HOST:PORT``, ``ray://...``); None starts
            an embedded local instance sized to the machine.
        workers: CPU workers when there is no GPU (default: one per two cores, at least 1).
        dashboard_host: where an embedded Ray's dashboard listens; loopback unless asked.
        include_dashboard: start the dashboard of an embedded Ray.
        max_attempts: attempts per chunk before it fails (retryable failures only).
        node_failure_limit: failed chunks after which a node is blocklisted for the run.
        timeout_factor: a chunk running past this multiple of its estimate is cancelled...
        timeout_floor_s: ...but never before this many seconds (estimates are H100 figures).
        load_timeout_s: extra time a chunk gets when its worker must load the model first.
        queue_depth: chunks queued on each worker, the running one included. 1 by default: a
            second queued chunk hides only the dispatch gap (milliseconds against chunks of
            seconds to minutes) but holds a shot's next chained chunk behind it; simulated on
            chained films, makespan over the bound went from 1.477 (2) to 1.001 (1).
        worker_start_timeout_s: how long to wait for the first workers to come up.
        manifest_flush_s: how often the manifest is rewritten while chunks finish.
        chunk_delay_s: a throttle that makes every chunk take at least this long; for
            demos and failure drills (like Flamenco's sleep jobs). 0 in production.
        lease_ttl_s: life of a chunk's lease (one writer per chunk); a run renews the leases
            of its chunks in flight every third of it, and a lease not renewed for this long
            (its run died) is taken over.
        checkpoint_every: save a chunk's sampler state every this many steps, so a chunk
            cut short resumes elsewhere with only its remaining steps; 0 never; unset: by
            chunk cost, about one per ``checkpoint_interval_s`` of estimated GPU time
            (render/checkpoints.py). Models with a step cache are not checkpointed.
        checkpoint_interval_s: GPU seconds between checkpoints when ``checkpoint_every`` is
            unset (120 s: the notice a spot instance gets).
        gpu_memory_gib: memory of each GPU, GiB, where the workers cannot say it themselves
            (Ray's fake GPUs, a card torch does not see); a worker that reads its GPU's memory
            from torch uses that. The farm checks every chunk's peak (render/memory.py)
            against the cluster's GPUs before any chunk starts.
        gpus_per_worker: GPUs each GPU worker holds, all on one node (a Ray placement group,
            STRICT_PACK); a node with G GPUs holds G // N workers. Larger than every node's
            GPU count: refused before any chunk starts.
        storage_options: fsspec options for OUT (e.g. an S3 endpoint and keys).
        allowed_read_roots: folders and URL prefixes (``s3://studio-refs/``,
            ``https://cdn.example.com/refs/``) a spec may read references, audio and a base
            film from, besides its own folder and below. Symlinks are resolved before the
            check. ``REELFARM_ALLOWED_READ_ROOTS`` takes a comma-separated list or a JSON list.
    """

    model_config = SettingsConfigDict(env_prefix="REELFARM_", extra="ignore")

    address: str | None = None
    workers: int | None = Field(None, ge=1, le=1024)
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = False
    max_attempts: int = Field(3, ge=1, le=20)
    node_failure_limit: int = Field(3, ge=1)
    timeout_factor: float = Field(10.0, gt=1.0)
    timeout_floor_s: float = Field(600.0, gt=0.0)
    load_timeout_s: float = Field(1800.0, ge=0.0)
    queue_depth: int = Field(1, ge=1, le=16)
    worker_start_timeout_s: float = Field(600.0, gt=0.0)
    manifest_flush_s: float = Field(2.0, ge=0.0)
    chunk_delay_s: float = Field(0.0, ge=0.0)
    lease_ttl_s: float = Field(60.0, gt=1.0)
    checkpoint_every: int | None = Field(None, ge=0)
    checkpoint_interval_s: float = Field(120.0, gt=0.0)
    gpu_memory_gib: float | None = Field(None, gt=0.0, le=4096.0)
    gpus_per_worker: int = Field(1, ge=1, le=64)
    # Excluded from dumps: credentials never become Prefect flow parameters (stored in its DB).
    storage_options: dict[str, Any] = Field(default_factory=dict, exclude=True)
    allowed_read_roots: Annotated[list[str], NoDecode] = Field(default_factory=list)

    def checkpoint_policy(self) -> CheckpointPolicy:
        """The workers' mid-chunk checkpoint policy."""
        from reelfarm.render.checkpoints import CheckpointPolicy

        return CheckpointPolicy(every=self.checkpoint_every, interval_s=self.checkpoint_interval_s)

    @field_validator("allowed_read_roots", mode="before")
    @classmethod
    def _roots(cls, v: Any) -> Any:
        """``REELFARM_ALLOWED_READ_ROOTS``: ``/data/refs,s3://studio-refs/`` or a JSON list."""
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return v
