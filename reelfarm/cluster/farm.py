"""The farm: Ray worker actors, identity sharing, and the chunk scheduler.

Rules the scheduler keeps:

1. A chunk whose content key already has a committed output is not rendered again.
2. A chunk is ready when the chunk it continues from is committed.
3. Among ready chunks: those for the model a worker already holds first, then the
   longest remaining chain (estimate of the chunk and everything that waits on it).
4. Each worker has one chunk running and ``queue_depth - 1`` queued behind it.
5. Failures by class: worker or node lost, timeout -> retry elsewhere; out of memory ->
   retry with low-memory settings; bad input or model error -> fail the chunk now.
   A failed chunk fails its shot (and the chunks that continue from it); other shots go on.
6. A node whose workers fail ``node_failure_limit`` chunks is blocklisted for the run.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from reelfarm.cluster.manifest import ManifestWriter, utcnow
from reelfarm.cluster.runtime import connect, node_slots
from reelfarm.cluster.store import ChunkStore
from reelfarm.cluster.worker import ChunkWorker, RenderReply, identity_cache_key, load_key
from reelfarm.errors import (
    BackendError,
    ChunkTimeout,
    DependencyUnreadable,
    FarmError,
    GpuOutOfMemory,
    RenderError,
    WorkerLost,
)
from reelfarm.render.identity import IdentityBundle
from reelfarm.schemas.plan import ChunkPlan, RenderPlan, ShotPlan
from reelfarm.settings import Settings

__all__ = ["Farm", "FarmStats", "RenderSummary"]

logger = logging.getLogger(__name__)
_RemoteWorker = ray.remote(ChunkWorker)
_LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
         ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError)


@dataclass
class FarmStats:
    """Counters across the farm's life (a run may call render several times)."""

    model_loads: int = 0
    identity_encodes: int = 0
    identity_cache_hits: int = 0
    rendered: int = 0
    retries: int = 0
    workers_started: int = 0


@dataclass
class RenderSummary:
    """What one ``Farm.render`` did."""

    run_id: str
    rendered: list[str] = field(default_factory=list)  # content keys rendered in this run
    cached: list[str] = field(default_factory=list)  # already committed before the run
    failed: dict[str, str] = field(default_factory=dict)  # key -> error
    failed_shots: dict[str, str] = field(default_factory=dict)  # shot id -> first error
    nodes_used: set[str] = field(default_factory=set)
    workers_used: set[str] = field(default_factory=set)
    blocklisted: set[str] = field(default_factory=set)
    model_loads: int = 0
    identity_encodes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


@dataclass
class _Worker:
    wid: str
    node_id: str
    handle: Any
    gpus: int
    model: str | None = None  # load key of the last model asked for
    queue: deque = field(default_factory=deque)  # (ref, task), head is running
    head_since: float = 0.0
    started: bool = False  # has been given a chunk (the first one also waits for the model load)
    alive: bool = True


@dataclass
class _Task:
    shot: ShotPlan
    chunk: ChunkPlan
    priority: float
    attempts: int = 0
    low_memory: bool = False
    avoid: str | None = None  # worker that last failed it
    loads: bool = False  # its worker must load the model first: the deadline allows for it


class Farm:
    """A pool of long-lived render workers on a Ray cluster, and the scheduler over it.

    Args:
        store: where chunks are committed (OUT).
        settings: cluster and retry settings.
    """

    def __init__(self, store: ChunkStore, settings: Settings | None = None) -> None:
        self.store = store
        self.settings = settings or Settings()
        self.stats = FarmStats()
        self.workers: list[_Worker] = []
        self.blocklist: set[str] = set()
        self._node_failures: dict[str, int] = {}
        self._ids = itertools.count()
        self._identity_refs: dict[tuple[str, str], Any] = {}  # (store root, identity key) -> ref
        self._gpu = False

    # --- workers -------------------------------------------------------------------
    def start(self) -> Farm:
        s = self.settings
        root = str(self.store.root)
        if root.startswith("memory:"):
            raise FarmError(f"OUT {root!r}: a memory:// filesystem lives in one process and Ray "
                            "workers cannot see it; use a folder or an object store (s3://, gs://)")
        if s.address and "://" not in root:
            logger.warning("OUT %s is a local path on a joined cluster: it must be a folder every "
                           "node shares (NFS, a mounted bucket), or chunks land on the workers' disks",
                           root)
        connect(s.address, num_cpus=None, include_dashboard=s.include_dashboard,
                dashboard_host=s.dashboard_host)
        # The kind of worker is decided once: losing GPU nodes never makes a CPU farm.
        self._gpu = any(n["Resources"].get("GPU") for n in ray.nodes() if n.get("Alive"))
        self._fill_slots()
        if not self.workers:
            raise FarmError("the cluster has no node that can hold a worker (no GPU and no CPU free)")
        # Wait until the workers are up (each imports torch). A worker that cannot be
        # placed (its GPU is held by another job) or fails to start is dropped: it must
        # not hang the run.
        pings = {w.handle.info.remote(): w for w in self.workers}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=s.worker_start_timeout_s)
        up = 0
        for ref, w in pings.items():
            try:
                if ref in ready:
                    ray.get(ref)
                    up += 1
                    continue
                logger.warning("worker %s did not start within %.0f s: dropped", w.wid,
                               s.worker_start_timeout_s)
            except ray.exceptions.RayError as e:
                logger.warning("worker %s failed to start: %s", w.wid, e)
            w.alive = False
            ray.kill(w.handle)
        if not up:
            self.shutdown()
            raise FarmError(f"no worker started within {s.worker_start_timeout_s:.0f} s: the cluster's "
                            "GPUs (or CPU slots) are held by other jobs, or workers cannot import torch")
        return self

    def _fill_slots(self) -> None:
        """Start workers until every alive, non-blocklisted node has its share."""
        have: dict[str, int] = {}
        for w in self.workers:
            if w.alive:
                have[w.node_id] = have.get(w.node_id, 0) + 1
        for slot in node_slots(workers=self.settings.workers, exclude=self.blocklist, gpu=self._gpu):
            want = slot.gpus or slot.cpus
            for _ in range(want - have.get(slot.node_id, 0)):
                self._spawn(slot.node_id, gpu=bool(slot.gpus))

    def _spawn(self, node_id: str, *, gpu: bool) -> _Worker:
        n = next(self._ids)
        wid = f"{node_id[:8]}/{'gpu' if gpu else 'cpu'}-{n}"
        opts: dict[str, Any] = {
            "num_gpus": 1 if gpu else 0,
            "num_cpus": 0 if gpu else 1,
            "max_restarts": 0,  # the scheduler replaces workers itself (see module doc)
            "max_task_retries": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
        }
        handle = _RemoteWorker.options(**opts).remote(wid, self.settings.chunk_delay_s)
        w = _Worker(wid=wid, node_id=node_id, handle=handle, gpus=int(gpu))
        self.workers.append(w)
        self.stats.workers_started += 1
        return w

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    def worker_info(self) -> list[dict[str, Any]]:
        return ray.get([w.handle.info.remote() for w in self._alive()])

    def shutdown(self) -> None:
        for w in self.workers:
            if w.alive:
                ray.kill(w.handle)
                w.alive = False
        self.workers = []

    def __enter__(self) -> Farm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # --- identities ----------------------------------------------------------------
    def prepare_identities(self, plan: RenderPlan) -> dict[tuple[str, str], Any]:
        """Each character's identity, once per (model, character): from storage or encoded.

        Returns ``{(load_key, character): ObjectRef}``. Every ref is put by the driver,
        which owns it (objects put by a worker die with it), and the bundle is also in
        storage, so a lost object can be read again. The driver reads each reference
        image and sends its bytes, so workers on other machines need no access to it.
        """
        needed: dict[tuple[str, str], tuple[Any, str]] = {}
        for shot in plan.shots:
            for name, sha in zip(shot.characters, shot.character_hashes, strict=True):
                needed.setdefault((load_key(shot.model), name), (shot.model, sha))
        refs: dict[tuple[str, str], Any] = {}
        jobs: dict[str, tuple[Any, str, str, str]] = {}  # identity key -> (model, lk, name, sha)
        slots: list[tuple[tuple[str, str], str]] = []
        root = self.store.root
        for (lk, name), (model, sha) in sorted(needed.items(), key=lambda kv: kv[0]):
            key = identity_cache_key(model, sha)
            slots.append(((lk, name), key))
            if (root, key) in self._identity_refs or key in jobs:  # shared already
                continue
            data = self.store.get_identity(key)
            if data is not None:
                self.stats.identity_cache_hits += 1
                self._identity_refs[(root, key)] = ray.put(IdentityBundle.from_bytes(data))
                continue
            jobs[key] = (model, lk, name, sha)
        for i, (key, (model, lk, name, sha)) in enumerate(jobs.items()):
            self._identity_refs[(root, key)] = ray.put(self._encode(i, key, model, lk, name, sha, plan))
            self.stats.identity_encodes += 1
        for slot, key in slots:
            refs[slot] = self._identity_refs[(root, key)]
        return refs

    def _encode(self, i: int, key: str, model: Any, lk: str, name: str, sha: str,
                plan: RenderPlan) -> IdentityBundle:
        """Encode one identity on a worker; a lost worker hands it to another."""
        import fsspec

        url = plan.references[name]
        with fsspec.open(url, "rb", **self.settings.storage_options) as f:
            image = f.read()
        for _ in range(self.settings.max_attempts):
            alive = self._alive()
            if not alive:
                raise FarmError(f"no worker left to encode character {name!r}")
            holders = [w for w in alive if w.model == lk] or alive
            w = holders[i % len(holders)]
            if w.model != lk:
                self.stats.model_loads += 1
                w.model = lk
            ref = w.handle.encode_identity.remote(model, name, image, sha, key, self.store)
            try:
                return ray.get(ref)  # a bad reference raises here, before any chunk starts
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, FarmError):
                    raise e.cause from None
                raise
            except ray.exceptions.RayError as e:
                logger.warning("worker %s lost while encoding %r: %s", w.wid, name, type(e).__name__)
                w.alive = False
                self._fill_slots()
        raise FarmError(f"character {name!r}: every worker given its identity was lost")

    # --- the scheduler -------------------------------------------------------------
    def render(self, plan: RenderPlan, manifest: ManifestWriter, *, force: set[str] | None = None
               ) -> RenderSummary:
        """Render every chunk of ``plan`` that storage lacks. Never raises for a chunk.

        Args:
            plan: the film's plan.
            manifest: the run's manifest, updated as chunks finish.
            force: content keys to render even if committed (found corrupt by stitching).
        """
        s = self.settings
        summary = RenderSummary(run_id=manifest.run_id)
        loads_before, enc_before = self.stats.model_loads, self.stats.identity_encodes
        force = force or set()
        # 1. What is already done.
        done: set[str] = set()
        todo: list[tuple[ShotPlan, ChunkPlan]] = []
        for shot in plan.shots:
            for c in shot.chunks:
                if c.key not in force and self.store.is_complete(c.key):
                    done.add(c.key)
                    if manifest.get(c.key).status == "done":
                        continue  # rendered earlier in this same run (a re-render round)
                    summary.cached.append(c.key)
                    rec = self.store.record(c.key)
                    manifest.update(c.key, status="cached", output_url=rec.url if rec else None,
                                    checksum=rec.checksum if rec else None)
                else:
                    todo.append((shot, c))
        manifest.flush(force=True)
        if not todo:
            return summary
        # 2. Identities, once, shared by reference.
        identities = self.prepare_identities(plan)
        # 3. Priorities: the estimate of a chunk plus everything chained after it.
        chain: dict[str, float] = {}
        for shot in plan.shots:
            acc = 0.0
            for c in reversed(shot.chunks):
                acc = c.est_gpu_s + (acc if shot.chunks[-1].depends_on else 0.0)
                chain[c.key] = acc
        waiting: dict[str, list[_Task]] = {}  # dependency key -> tasks waiting on it
        ready: list[tuple[float, int, _Task]] = []
        seq = itertools.count()

        def make_ready(task: _Task) -> None:
            heapq.heappush(ready, (-task.priority, next(seq), task))

        for shot, c in todo:
            task = _Task(shot, c, chain[c.key])
            if c.depends_on and c.depends_on not in done:
                waiting.setdefault(c.depends_on, []).append(task)
            else:
                make_ready(task)
        remaining = len(todo)

        def fail(task: _Task, error: str) -> None:
            nonlocal remaining
            key = task.chunk.key
            summary.failed[key] = error
            summary.failed_shots.setdefault(task.shot.shot_id, f"{task.chunk.name}: {error}")
            manifest.update(key, status="failed", error=error[:2000], attempts=task.attempts,
                            finished_at=utcnow())
            remaining -= 1
            for dep in waiting.pop(key, []):  # chunks that continue from it cannot start
                fail(dep, f"blocked: {task.chunk.name} failed")

        def succeed(task: _Task, w: _Worker, reply: RenderReply) -> None:
            nonlocal remaining
            key = task.chunk.key
            done.add(key)
            summary.rendered.append(key)
            summary.nodes_used.add(w.node_id)
            summary.workers_used.add(w.wid)
            self.stats.rendered += 1
            if reply.loaded:
                self.stats.model_loads += 1
            manifest.update(key, status="done", attempts=task.attempts, worker=reply.worker,
                            node=w.node_id, finished_at=utcnow(), render_s=round(reply.render_s, 4),
                            output_url=reply.record.url, checksum=reply.record.checksum, error=None)
            remaining -= 1
            for dep in waiting.pop(key, []):
                make_ready(dep)

        def pick(w: _Worker) -> _Task | None:
            """Best ready task for ``w``: its own model first, then the longest chain."""
            if not ready:
                return None
            multi = len(self._alive()) > 1
            top = ready[0][2]
            if (w.model is None or load_key(top.shot.model) == w.model) and not (
                    multi and top.avoid == w.wid):
                return heapq.heappop(ready)[2]  # the usual case: one model, O(log n)
            best = None
            for i, (_, _, t) in enumerate(ready):
                if t.avoid == w.wid and len(self._alive()) > 1:
                    continue
                if load_key(t.shot.model) == w.model:
                    if best is None or (ready[i][0], ready[i][1]) < (ready[best][0], ready[best][1]):
                        best = i
            if best is None:
                candidates = [i for i, (_, _, t) in enumerate(ready)
                              if not (t.avoid == w.wid and len(self._alive()) > 1)]
                if not candidates:
                    return None
                best = min(candidates, key=lambda i: (ready[i][0], ready[i][1]))
            item = ready[best]
            ready[best] = ready[-1]
            ready.pop()
            heapq.heapify(ready)
            return item[2]

        def submit(w: _Worker, task: _Task) -> None:
            task.attempts += 1
            lk = load_key(task.shot.model)
            task.loads = w.model != lk or not w.started
            w.model = lk
            w.started = True
            names = list(task.shot.characters)
            refs = [identities[(lk, n)] for n in names]
            ref = w.handle.render.remote(task.shot, task.chunk, self.store, names, *refs,
                                         low_memory=task.low_memory, run_id=manifest.run_id,
                                         attempt=task.attempts)
            if not w.queue:
                w.head_since = time.monotonic()
            w.queue.append((ref, task))
            manifest.update(task.chunk.key, status="running", attempts=task.attempts, worker=w.wid,
                            node=w.node_id, started_at=utcnow())

        def retry(task: _Task, error: FarmError, w: _Worker | None) -> None:
            if task.attempts >= s.max_attempts:
                fail(task, f"{type(error).__name__} after {task.attempts} attempts: {error}")
                return
            self.stats.retries += 1
            task.avoid = w.wid if w else None
            if isinstance(error, GpuOutOfMemory):
                task.low_memory = True
            manifest.update(task.chunk.key, status="planned", error=f"{type(error).__name__}: {error}"[:2000])
            make_ready(task)

        def node_failed(node_id: str) -> None:
            """Count a failure the node caused (a lost worker, a hung chunk).

            Failures the chunk causes (bad input, out of memory, storage) are not counted.
            The last node that can take work is never blocklisted: that would fail every
            chunk left, where carrying on may still finish most of them.
            """
            self._node_failures[node_id] = self._node_failures.get(node_id, 0) + 1
            others = {w.node_id for w in self._alive()} - {node_id}
            if (self._node_failures[node_id] >= s.node_failure_limit and node_id not in self.blocklist
                    and others):
                logger.warning("node %s failed %d chunks: blocklisted for this run",
                               node_id, self._node_failures[node_id])
                self.blocklist.add(node_id)
                summary.blocklisted.add(node_id)
                for other in self._alive():
                    if other.node_id == node_id:
                        lose_worker(other, requeue=True, kill=True)

        def lose_worker(w: _Worker, *, requeue: bool, kill: bool = False,
                        cause: FarmError | None = None) -> None:
            """Take ``w`` out; its queued chunks go back to the ready list."""
            if not w.alive:
                return
            w.alive = False
            if kill:
                ray.kill(w.handle)
            while w.queue:
                _, task = w.queue.popleft()
                if cause is not None and requeue:
                    retry(task, cause, w)
                    cause = None  # only the running chunk counts as an attempt
                else:
                    task.attempts -= 1
                    make_ready(task)

        chunks_by_key = {c.key: (shot, c) for shot in plan.shots for c in shot.chunks}
        rerendered: set[str] = set()

        def rerender_dependency(task: _Task, error: DependencyUnreadable) -> None:
            """The chunk ``task`` continues from is unreadable: render it again, then ``task``."""
            nonlocal remaining
            dep = error.key
            task.attempts -= 1  # not this chunk's fault
            if dep in rerendered or dep not in chunks_by_key:
                fail(task, f"{type(error).__name__}: {error}")
                return
            logger.warning("%s: rendering its dependency %s again (%s)", task.chunk.name, dep, error)
            rerendered.add(dep)
            done.discard(dep)
            summary.cached = [k for k in summary.cached if k != dep]
            shot, chunk = chunks_by_key[dep]
            remaining += 1
            make_ready(_Task(shot, chunk, chain[dep]))
            waiting.setdefault(dep, []).append(task)

        def check_capacity() -> None:
            self._fill_slots()
            if not self._alive():
                for _, _, task in list(ready):
                    fail(task, "no worker left: every node is lost or blocklisted")
                ready.clear()

        # 4. Dispatch and collect, in completion order.
        last_flush = time.monotonic()
        while remaining > 0:
            for w in self._alive():
                while len(w.queue) < s.queue_depth:
                    task = pick(w)
                    if task is None:
                        break
                    submit(w, task)
            inflight = {w.queue[0][0]: w for w in self._alive() if w.queue}
            if not inflight:
                if ready or waiting:
                    check_capacity()
                    if not self._alive():
                        break
                    if not ready and waiting:
                        # Everything left waits on chunks that will never come.
                        for key in list(waiting):
                            for t in waiting.pop(key, []):
                                fail(t, f"blocked: dependency {key} never rendered")
                    continue
                break
            done_refs, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            now = time.monotonic()
            for ref in done_refs:
                w = inflight[ref]
                _, task = w.queue.popleft()
                w.head_since = now
                try:
                    reply: RenderReply = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if isinstance(e.cause, BaseException) else e
                    if isinstance(cause, _LOST):
                        self._worker_lost(w, task, lose_worker, retry, node_failed, cause)
                    elif isinstance(cause, DependencyUnreadable):
                        rerender_dependency(task, cause)
                    else:
                        err = cause if isinstance(cause, FarmError) else RenderError(str(cause))
                        if isinstance(err, BackendError) or not err.retryable:
                            fail(task, f"{type(err).__name__}: {err}")
                        else:
                            retry(task, err, w)  # the chunk's failure, not the node's
                    continue
                except ray.exceptions.RayError as e:
                    # The worker died, its node went away, or it never started.
                    self._worker_lost(w, task, lose_worker, retry, node_failed, e)
                    continue
                succeed(task, w, reply)
            # Timeouts: a running chunk far past its estimate is cancelled and retried.
            for w in self._alive():
                if not w.queue:
                    continue
                _, task = w.queue[0]
                limit = max(s.timeout_floor_s, s.timeout_factor * task.chunk.est_gpu_s)
                if task.loads:  # loading a model (and starting a worker) is not rendering
                    limit += s.load_timeout_s
                if now - w.head_since > limit:
                    logger.warning("%s ran %.0f s (limit %.0f s) on %s: cancelled",
                                   task.chunk.name, now - w.head_since, limit, w.wid)
                    lose_worker(w, requeue=True, kill=True,
                                cause=ChunkTimeout(f"{task.chunk.name} ran past {limit:.0f} s"))
                    node_failed(w.node_id)
                    self._fill_slots()
            if now - last_flush >= s.manifest_flush_s:
                manifest.flush()
                last_flush = now
        manifest.flush(force=True)
        summary.model_loads = self.stats.model_loads - loads_before
        summary.identity_encodes = self.stats.identity_encodes - enc_before
        summary.blocklisted |= self.blocklist
        return summary

    def _worker_lost(self, w: _Worker, task: _Task, lose_worker, retry, node_failed, cause) -> None:
        """A worker died (its process, or its node): retry its chunks elsewhere."""
        logger.warning("worker %s lost while rendering %s: %s", w.wid, task.chunk.name,
                       type(cause).__name__)
        # The running chunk counts as a failed attempt; the queued ones go back as they were.
        w.queue.appendleft((None, task))
        lose_worker(w, requeue=True, cause=WorkerLost(f"{w.wid}: {type(cause).__name__}"))
        node_failed(w.node_id)
        self._fill_slots()
