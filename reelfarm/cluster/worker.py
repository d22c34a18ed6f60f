"""The GPU worker: a long-lived Ray actor that keeps one model loaded and renders chunks.

One actor per GPU (or CPU slot). It loads a backend once and keeps it while chunks for
it remain, reads its conditioning (the previous chunk's tail) from the chunk store,
writes its output to the store, and returns only a small record: frames never pass
through the driver.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from reelfarm.cluster.store import ChunkRecord, ChunkStore
from reelfarm.errors import (
    BackendError,
    DependencyUnreadable,
    FarmError,
    GpuOutOfMemory,
    RenderError,
    StoreError,
)
from reelfarm.render.identity import IdentityBundle
from reelfarm.schemas.film import AnimaticModel, DiffusersModel
from reelfarm.schemas.plan import ChunkPlan, ShotPlan

__all__ = ["ChunkWorker", "RenderReply", "load_key"]

logger = logging.getLogger(__name__)


def load_key(model: AnimaticModel | DiffusersModel) -> str:
    """Which loaded model a chunk needs: workers holding the same key can take it."""
    if isinstance(model, AnimaticModel):
        return "animatic"
    doc = {k: getattr(model, k) for k in ("family", "id", "revision", "dtype")}
    return "diffusers:" + hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class RenderReply:
    """What a worker returns for one chunk: small and picklable."""

    record: ChunkRecord
    worker: str
    node: str
    pid: int
    render_s: float
    loaded: bool  # this call loaded the model
    timings: dict[str, float] = field(default_factory=dict)


def _decode_reference(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGBA") if "A" in im.getbands() else im.convert("RGB"))


class ChunkWorker:
    """A render worker. Wrapped with ``ray.remote`` by the scheduler (see ``Farm``).

    Args:
        worker_id: a name for logs and the manifest (``node-2/gpu-0``).
        chunk_delay_s: minimum seconds per chunk, a throttle for demos and failure drills.
    """

    def __init__(self, worker_id: str, chunk_delay_s: float = 0.0) -> None:
        self.worker_id = worker_id
        self.chunk_delay_s = chunk_delay_s
        self.node = socket.gethostname()
        self._backend: Any = None
        self._backend_key: str | None = None
        self._low_memory = False
        self.model_loads = 0
        self.identity_encodes = 0
        self.device = self._pick_device()

    # --- plumbing ----------------------------------------------------------------
    @staticmethod
    def _pick_device() -> str:
        # torch is imported here, in the worker process, never in the driver.
        import torch

        if torch.cuda.is_available():
            return "cuda"
        # Ray gives a num_cpus=1 actor OMP_NUM_THREADS=1; honour what Ray assigned.
        cpus = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
        torch.set_num_threads(max(1, cpus))
        return "cpu"

    def info(self) -> dict[str, Any]:
        import ray

        return {
            "worker": self.worker_id,
            "pid": os.getpid(),
            "node": self.node,
            "node_id": ray.get_runtime_context().get_node_id(),
            "device": self.device,
            "model": self._backend_key,
            "model_loads": self.model_loads,
            "identity_encodes": self.identity_encodes,
        }

    def _ensure(self, model: AnimaticModel | DiffusersModel) -> bool:
        """Load ``model`` unless it is the one held. Returns True when it loaded."""
        key = load_key(model)
        if self._backend_key == key:
            return False
        if self._backend is not None:
            self._backend.close()  # one model per GPU: free it before the next
            self._backend = None
            self._backend_key = None
        from reelfarm.render.base import load_backend

        self._backend = load_backend(model, device=self.device)
        self._backend_key = key
        self._low_memory = False
        self.model_loads += 1
        return True

    # --- work --------------------------------------------------------------------
    def encode_identity(self, model: AnimaticModel | DiffusersModel, character: str, reference: bytes,
                        sha256: str, key: str, store: ChunkStore) -> IdentityBundle:
        """Encode one character's identity from its reference's bytes, store it, return it."""
        self._ensure(model)
        try:
            image = _decode_reference(reference)
        except Exception as e:  # noqa: BLE001 - any decode failure is the reference's fault
            raise BackendError(f"character {character!r}: reference is not a readable image: {e}") from None
        bundle = self._backend.encode_identity(character, image, sha256)
        store.put_identity(key, bundle.to_bytes())
        self.identity_encodes += 1
        return bundle

    def render(self, shot: ShotPlan, chunk: ChunkPlan, store: ChunkStore, names: list[str],
               *identities: IdentityBundle, low_memory: bool = False, run_id: str = "",
               attempt: int = 1) -> RenderReply:
        """Render one chunk and commit it to the store. Identities arrive resolved by Ray."""
        t0 = time.perf_counter()
        loaded = self._ensure(shot.model)
        if low_memory and not self._low_memory:
            self._backend.low_memory()
            self._low_memory = True
        t1 = time.perf_counter()
        try:
            condition = self._condition(shot, chunk, store)
        except StoreError as e:
            # The chunk this one continues from went missing or corrupt: the farm renders
            # that one again, then this one.
            raise DependencyUnreadable(f"{chunk.name}: cannot continue from {chunk.depends_on}: {e}",
                                       str(chunk.depends_on)) from None
        t2 = time.perf_counter()
        try:
            out = self._backend(shot, chunk, dict(zip(names, identities, strict=True)), condition)
        except FarmError:
            raise
        except Exception as e:  # noqa: BLE001 - classify, keep the message, pickle-safe
            import torch

            if isinstance(e, torch.OutOfMemoryError):
                raise GpuOutOfMemory(f"{chunk.name}: out of memory on {self.worker_id}: {e}") from None
            tb = traceback.format_exc(limit=3)
            raise RenderError(f"{chunk.name}: {type(e).__name__}: {e}\n{tb}") from None
        t3 = time.perf_counter()
        if self.chunk_delay_s:
            time.sleep(max(0.0, self.chunk_delay_s - (t3 - t0)))
        meta = {
            **out.meta,
            "chunk": chunk.name, "key": chunk.key, "seed": chunk.seed, "run_id": run_id,
            "attempt": attempt, "worker": self.worker_id, "node": self.node, "pid": os.getpid(),
            "device": self.device, "low_memory": self._low_memory,
            "timings": {"load_s": t1 - t0, "condition_s": t2 - t1, "render_s": t3 - t2},
        }
        record = store.write_chunk(chunk.key, out, meta=meta)
        t4 = time.perf_counter()
        return RenderReply(record=record, worker=self.worker_id, node=self.node, pid=os.getpid(),
                           render_s=t4 - t0, loaded=loaded,
                           timings={"load_s": t1 - t0, "render_s": t3 - t2, "write_s": t4 - t3})

    def _condition(self, shot: ShotPlan, chunk: ChunkPlan, store: ChunkStore):
        """The previous chunk's tail, read from storage, for a chained chunk."""
        if not chunk.depends_on:
            return None
        from reelfarm.render.base import Condition

        prev = store.read_frames(chunk.depends_on)
        return Condition(image=prev[shot.continuation_frame(chunk)],
                         latents=store.read_latents(chunk.depends_on))

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None
            self._backend_key = None
