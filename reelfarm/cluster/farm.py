"""The farm: Ray worker actors, identity sharing, and the Ray adapter of the scheduler.

Which chunk goes where, and what happens when something fails, is decided by
:class:`reelfarm.cluster.scheduler.Scheduler` (its module docstring lists the rules). This
module starts and replaces Ray actors, encodes identities once and shares them by
reference, turns Ray futures into scheduler events, and carries out its decisions.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

from reelfarm import events
from reelfarm.cluster.lease import Leases
from reelfarm.cluster.manifest import ManifestGroup, ManifestWriter, utcnow
from reelfarm.cluster.runtime import connect, draining_nodes, gpus_per_node, node_slots
from reelfarm.cluster.scheduler import (
    ChunkCommitted,
    ChunkDone,
    ChunkFailed,
    ChunkHeld,
    ChunkReleased,
    Fail,
    Job,
    Kill,
    NodeDown,
    NodeDraining,
    NodeUp,
    Requeue,
    Rules,
    Scheduler,
    Spawn,
    Submit,
    Tick,
    WorkerDown,
    WorkerReady,
)
from reelfarm.cluster.store import ChunkRecord, ChunkStore
from reelfarm.cluster.worker import ChunkWorker, RenderReply, load_key
from reelfarm.errors import FarmError, PlanError, RenderError
from reelfarm.render.identity import IdentityBundle, identity_key
from reelfarm.schemas.plan import RenderPlan
from reelfarm.settings import Settings

__all__ = ["Farm", "FarmStats", "RenderSummary"]

logger = logging.getLogger(__name__)


def remote_worker(cls: type[ChunkWorker] = ChunkWorker) -> Any:
    """``cls`` (ChunkWorker or a subclass: benchmarks, drills) as the farm's actor class: one
    chunk at a time (the default group), "control" calls (``checkpoint_now``) beside it."""
    return ray.remote(concurrency_groups={"control": 1})(cls)  # type: ignore[call-overload]


_RemoteWorker = remote_worker()
NODE_SYNC_S = 5.0  # how often the cluster's nodes are read again during a render
HELD_POLL_S = 1.0  # how often chunks another run holds are looked at
DRAIN_POLL_S = 1.0  # how often Ray is asked which nodes it is draining
SCAN_THREADS = 16  # requests in flight when a run looks for committed chunks on an object store
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
    steps_saved: int = 0  # sampling steps resumed past from mid-chunk checkpoints
    # Memory placement (render/memory.py): shot id -> "<GPU GiB>: offload <o>, peak <p> GiB",
    # one entry per GPU size in the cluster, for the shot's largest chunk.
    fits: dict[str, list[str]] = field(default_factory=dict)

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
    alive: bool = True
    info: dict[str, Any] | None = None  # what the worker reports (ChunkWorker.info): its GPU
    pg: Any = None  # its placement group, when it holds several GPUs


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
        self._started = False
        self._owns_ray = False
        # (load key, GPU GiB) -> Fit: the offload the model loads with on GPUs of that size.
        self._fits: dict[tuple[str, float], Any] = {}

    # --- workers -------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._started

    def check(self) -> Farm:
        """Refuse an OUT that Ray workers cannot reach, before anything starts."""
        root = str(self.store.root)
        if root.startswith("memory:"):
            raise FarmError(f"OUT {root!r}: a memory:// filesystem lives in one process and Ray "
                            "workers cannot see it; use a folder or an object store (s3://, gs://)")
        return self

    def start(self) -> Farm:
        """Connect to Ray (or start our own) and bring the workers up."""
        s = self.settings
        self.check()
        if s.address and "://" not in str(self.store.root):
            logger.warning("OUT %s is a local path on a joined cluster: it must be a folder every "
                           "node shares (NFS, a mounted bucket), or chunks land on the workers' disks",
                           self.store.root)
        info = connect(s.address, num_cpus=None, include_dashboard=s.include_dashboard,
                       dashboard_host=s.dashboard_host)
        self._started = True
        self._owns_ray = info.started
        # The kind of worker is decided once: losing GPU nodes never makes a CPU farm.
        self._gpu = any(n["Resources"].get("GPU") for n in ray.nodes() if n.get("Alive"))
        self._check_gpus_per_worker()
        self._fill_slots()
        if not self.workers:
            raise FarmError("the cluster has no node that can hold a worker (no GPU and no CPU free)")
        self._wait_for_workers()
        return self

    def _check_gpus_per_worker(self) -> None:
        """Refuse ``gpus_per_worker`` larger than every node, before any worker or chunk."""
        n = self.settings.gpus_per_worker
        if n == 1:
            return
        largest = max(gpus_per_node(self.blocklist).values(), default=0)
        if n > largest:
            self.shutdown()
            raise FarmError(f"`gpus_per_worker` must be at most the GPUs of one node (the largest "
                            f"node here has {largest}), got {n}")

    # --- memory placement (render/memory.py) ---------------------------------------
    def gpu_memory_gib(self, w: _Worker) -> float | None:
        """The memory of ``w``'s GPU: as the worker read it from torch, else as declared
        (``gpu_memory_gib``), else from its node's Ray ``accelerator_type``; None: unknown
        (or a CPU worker)."""
        return self._gpu_memory(w)[0]

    def _gpu_memory(self, w: _Worker) -> tuple[float | None, str]:
        from reelfarm.render.memory import gpu_gib_of

        if not w.gpus:
            return None, ""
        for other in [w, *self.workers]:  # one that came up later: its node's GPUs are alike
            if other.node_id == w.node_id and other.info and other.info.get("gpu_memory_gib"):
                return float(other.info["gpu_memory_gib"]), ""
        if self.settings.gpu_memory_gib:
            return self.settings.gpu_memory_gib, "gpu_memory_gib"
        for n in ray.nodes():
            if n["NodeID"] == w.node_id:
                kinds = [k.split(":", 1)[1] for k in n["Resources"] if k.startswith("accelerator_type:")]
                gib = gpu_gib_of(kinds[0]) if kinds else None
                return (gib, f"accelerator_type {kinds[0]}") if gib else (None, "")
        return None, ""

    def gpu_label(self, w: _Worker) -> str:
        """What the manifest and the report show as a worker's GPU: ``NVIDIA H200 (139.8 GiB)``,
        ``2 x GPU (24 GiB from gpu_memory_gib)``, ``cpu``."""
        if not w.gpus:
            return "cpu"
        gib, source = self._gpu_memory(w)
        name = (w.info or {}).get("gpu") or "GPU"
        size = "memory unknown" if gib is None else f"{gib:g} GiB" + (f" from {source}" if source else "")
        return f"{w.gpus} x {name} ({size})" if w.gpus > 1 else f"{name} ({size})"

    def check_memory(self, shots: list[Any]) -> dict[str, list[str]]:
        """Fit every shot's largest chunk to the cluster's GPUs before any chunk is sent.

        For each GPU size the workers have, the offload the model needs there is chosen
        (render/memory.py: only offload, which keeps pixels and content keys) and used when a
        worker of that size loads it. A chunk that fits no GPU of the cluster is refused.
        The check is skipped on a CPU farm, and where no GPU's memory is known.

        Returns:
            shot id -> one line per GPU size (what ``RenderSummary.fits`` shows).

        Raises:
            PlanError: a chunk fits no GPU here: the model, its size and the largest GPU.
        """
        from reelfarm.render.memory import choose_fit, no_fit_message

        sizes = sorted({g for w in self._alive() if (g := self.gpu_memory_gib(w)) is not None})
        out: dict[str, list[str]] = {}
        if not sizes:
            if self._gpu:
                logger.warning("GPU memory unknown (no worker reads it, no accelerator_type, no "
                               "`gpu_memory_gib` set): chunks are not fitted to it")
            return out
        order = ["none", "model", "group", "sequential"]
        for shot in shots:
            model = shot.model
            if model.backend != "diffusers":
                continue
            frames = max(c.num_frames for c in shot.chunks)
            msg = no_fit_message(model, shot.width, shot.height, frames, sizes[-1],
                                 where=f"shot {shot.shot_id!r}: ")
            if msg:
                raise PlanError(msg)
            lk = load_key(model)
            for gib in sizes:
                fit = choose_fit(model, shot.width, shot.height, frames, gib)
                if fit is None:  # fits larger cards only: one sent here may run out of memory
                    out.setdefault(shot.shot_id, []).append(f"{gib:g} GiB: does not fit")
                    continue
                out.setdefault(shot.shot_id, []).append(
                    f"{gib:g} GiB: offload {fit.offload}, peak {fit.peak_gib:g} GiB")
                held = self._fits.get((lk, gib))
                if held is None or order.index(fit.offload) > order.index(held.offload):
                    self._fits[(lk, gib)] = fit
        return out

    def fitted(self, model: Any, w: _Worker) -> Any:
        """``model`` as worker ``w`` loads it: with the offload its GPU needs (same content key)."""
        from reelfarm.render.memory import fitted_model

        if model.backend != "diffusers":
            return model
        gib = self.gpu_memory_gib(w)
        if gib is None:
            return model
        lk = load_key(model)
        # A size not seen at the check (a node that joined since): the fit of the largest
        # size below it, which needs at least as much offload.
        below = [g for (k, g) in self._fits if k == lk and g <= gib]
        fit = self._fits.get((lk, max(below))) if below else None
        return fitted_model(model, fit) if fit is not None else model

    def ensure_started(self) -> Farm:
        """Start on first need: a run with nothing to render never starts Ray."""
        return self if self._started else self.start()

    def _wait_for_workers(self) -> None:
        """Wait until the workers are up (each imports torch).

        A worker that cannot be placed (its GPU is held by another job) or fails to start
        is dropped: it must not hang the run. With none up, the error says why.
        """
        s = self.settings
        t0 = time.monotonic()
        pings = {w.handle.info.remote(): w for w in self.workers}
        ready, _ = ray.wait(list(pings), num_returns=len(pings), timeout=s.worker_start_timeout_s)
        up, why = 0, []
        for ref, w in pings.items():
            try:
                if ref in ready:
                    w.info = ray.get(ref)
                    up += 1
                    continue
                why.append(f"{w.wid}: not up after {time.monotonic() - t0:.0f} s")
            except ray.exceptions.RayError as e:
                why.append(f"{w.wid}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
            logger.warning("worker %s dropped: %s", w.wid, why[-1])
            self._retire(w)
        if not up:
            self.shutdown()
            raise FarmError(f"no worker started (waited {time.monotonic() - t0:.0f} s of "
                            f"{s.worker_start_timeout_s:.0f} s): " + "; ".join(why[:4]))

    def _fill_slots(self) -> None:
        """Start workers until every alive, non-blocklisted node has its share."""
        have: dict[str, int] = {}
        for w in self.workers:
            if w.alive:
                have[w.node_id] = have.get(w.node_id, 0) + 1
        for slot in node_slots(workers=self.settings.workers, exclude=self.blocklist, gpu=self._gpu,
                               gpus_per_worker=self.settings.gpus_per_worker):
            want = slot.gpus or slot.cpus
            for _ in range(want - have.get(slot.node_id, 0)):
                self._spawn(slot.node_id, gpu=bool(slot.gpus))

    def _spawn(self, node_id: str, *, gpu: bool) -> _Worker:
        n = next(self._ids)
        wid = f"{node_id[:8]}/{'gpu' if gpu else 'cpu'}-{n}"
        gpus = self.settings.gpus_per_worker if gpu else 0
        opts: dict[str, Any] = {
            "num_gpus": gpus,
            "num_cpus": 0 if gpu else 1,
            "max_restarts": 0,  # the scheduler replaces workers itself (see module doc)
            "max_task_retries": 0,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False),
        }
        pg = None
        if gpus > 1:
            # Several GPUs for one actor: reserved together on this node (a placement group,
            # STRICT_PACK, pinned by Ray's node-id label); Ray gives the actor the bundle's GPUs.
            pg = placement_group([{"GPU": gpus}], strategy="STRICT_PACK",
                                 bundle_label_selector=[{"ray.io/node-id": node_id}])
            opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)
        handle = _RemoteWorker.options(**opts).remote(wid, self.settings.chunk_delay_s,
                                                      self.settings.checkpoint_policy())
        w = _Worker(wid=wid, node_id=node_id, handle=handle, gpus=gpus, pg=pg)
        self.workers.append(w)
        self.stats.workers_started += 1
        return w

    def _alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.alive]

    def _retire(self, w: _Worker) -> None:
        """Stop a worker and give back what it reserved (its placement group)."""
        if w.alive:
            w.alive = False
            ray.kill(w.handle)
        if w.pg is not None:
            remove_placement_group(w.pg)
            w.pg = None

    def worker_info(self) -> list[dict[str, Any]]:
        return ray.get([w.handle.info.remote() for w in self._alive()])

    def shutdown(self) -> None:
        """Stop the workers; and Ray itself when this farm started its own instance."""
        for w in self.workers:
            self._retire(w)
        self.workers = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> Farm:
        return self.ensure_started()

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
            key = identity_key(model, sha)
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
            ref = w.handle.encode_identity.remote(self.fitted(model, w), name, image, sha, key, self.store)
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

    # --- rendering: Ray futures in, scheduler decisions out ---------------------------
    def render(self, plan: RenderPlan, manifest: ManifestWriter, *, force: set[str] | None = None
               ) -> RenderSummary:
        """Render every chunk of ``plan`` that storage lacks. Never raises for a chunk.

        Args:
            plan: the film's plan.
            manifest: the run's manifest, updated as chunks finish.
            force: content keys to render even if committed (found corrupt by stitching).
        """
        return self.render_many([(plan, manifest)], force=force)[0]

    def render_many(self, runs: list[tuple[RenderPlan, ManifestWriter]], *, force: set[str] | None = None,
                    on_plan_done: Callable[[int, RenderSummary], None] | None = None) -> list[RenderSummary]:
        """Render several plans' missing chunks on one queue (a campaign's cells).

        A chunk several plans share (same content key) is rendered once; workers never idle
        at the end of one plan while another has work. One summary per plan, in order: a
        shared chunk counts as rendered by the plan that finishes (or comes) first, cached
        by the others.

        Args:
            runs: each plan and its manifest.
            force: content keys to render even if committed.
            on_plan_done: called as ``on_plan_done(i, summary)`` from the farm's loop as soon
                as every chunk of plan ``i`` is done or failed while other plans still
                render (a cell's cut can be stitched then). Its summary is final and its
                manifest flushed; from then on the farm no longer flushes that manifest.
                It must return at once (hand the work to a thread): the loop waits for it.
                Plans that finish with the queue are not reported: the caller has them.
        """
        force = force or set()
        group = ManifestGroup([m for _, m in runs])
        loads_before, enc_before = self.stats.model_loads, self.stats.identity_encodes
        # 1. What is already done.
        summaries = [RenderSummary(run_id=m.run_id) for _, m in runs]
        done: set[str] = set()
        for (plan, manifest), summary in zip(runs, summaries):
            done |= self._committed(plan, manifest, summary, force)
        jobs: dict[str, Job] = {}
        keys: dict[int, str] = {}  # id(model) -> its load key (a hash): shots share their film's model
        for plan, _ in runs:
            for shot in plan.shots:
                lk = keys.get(id(shot.model)) or keys.setdefault(id(shot.model), load_key(shot.model))
                for c in shot.chunks:
                    if c.key not in jobs:
                        jobs[c.key] = Job(c.key, c.name, shot.shot_id, c.est_gpu_s, lk, c.depends_on, (shot, c))
        sched = Scheduler(jobs.values(), Rules.from_settings(self.settings), clock=time.monotonic, done=done,
                          blocklist=self.blocklist, node_failures=self._node_failures)
        run: _Run | None = None
        claimed: set[str] = set()  # rendered keys counted by a plan summarised already
        reported: set[int] = set()  # plans handed to on_plan_done
        if not sched.finished:
            # 2. Identities, once, shared by reference. 3. Dispatch and collect.
            self.ensure_started()
            # Before anything is encoded or sent: every chunk against the GPUs the cluster has.
            pending = {id(j.payload[0]): j.payload[0] for j in jobs.values() if j.key not in done}
            fits = self.check_memory(list(pending.values()))
            for summary in summaries:
                summary.fits = fits
            identities: dict[tuple[str, str], Any] = {}
            for plan, _ in runs:
                identities.update(self.prepare_identities(plan))
            run = _Run(self, sched, group, summaries[0], identities, force=force)
            if on_plan_done is not None:
                run.watch = self._plan_watch(runs, summaries, sched, run, group, claimed, reported, on_plan_done,
                                             before=(loads_before, enc_before))
            try:
                run.loop()
            except BaseException:
                run.release_all()
                # Interrupted (Ctrl-C) or broken: nothing may stay marked running, and the
                # committed chunks are kept; `reelfarm resume OUT` renders the rest.
                for row in group.rows:
                    if row.status == "running":
                        row.status = "planned"
                group.flush(force=True)
                raise
        self._summarise(runs, summaries, sched, run, claimed=claimed, only=set(range(len(runs))) - reported)
        group.flush(force=True)
        self.stats.rendered += len(sched.rendered)
        self.stats.retries += sched.retries
        summaries[0].model_loads = self.stats.model_loads - loads_before
        summaries[0].identity_encodes = self.stats.identity_encodes - enc_before
        return summaries

    def _summarise(self, runs: list[tuple[RenderPlan, ManifestWriter]], summaries: list[RenderSummary],
                   sched: Scheduler, run: _Run | None, *, claimed: set[str], only: set[int]) -> None:
        """Each plan's share of what the one queue did: plans ``only``; ``claimed``: keys counted."""
        rendered = set(sched.rendered)
        for i, ((plan, manifest), summary) in enumerate(zip(runs, summaries)):
            if i not in only:
                continue
            keys = [c.key for c in plan.chunks]
            unique = list(dict.fromkeys(keys))
            mine = [k for k in unique if k in rendered and k not in claimed]
            shared = [k for k in unique if k in rendered and k in claimed]  # another cell rendered it
            for k in shared:
                manifest.update(k, status="cached")
            claimed.update(mine)
            summary.rendered = mine
            # Cached at the start and not rendered again (a re-rendered dependency is not cached).
            summary.cached = ([k for k in summary.cached if k not in rendered] + shared
                              + [k for k in unique if k in sched.elsewhere])
            summary.failed = {k: sched.failed[k] for k in keys if k in sched.failed}
            for shot in plan.shots:
                for c in shot.chunks:
                    if c.key in sched.failed:
                        summary.failed_shots.setdefault(shot.shot_id, f"{c.name}: {sched.failed[c.key]}")
            if run is not None:
                summary.nodes_used |= run.summary.nodes_used
                summary.workers_used |= run.summary.workers_used
            summary.blocklisted |= self.blocklist

    def _plan_watch(self, runs: list[tuple[RenderPlan, ManifestWriter]], summaries: list[RenderSummary],
                    sched: Scheduler, run: _Run, group: ManifestGroup, claimed: set[str], reported: set[int],
                    on_plan_done: Callable[[int, RenderSummary], None], *, before: tuple[int, int]
                    ) -> Callable[[], None]:
        """The loop's check for plans whose chunks are all settled (``render_many``'s hook)."""
        keys = [{c.key for c in plan.chunks} for plan, _ in runs]
        seen = -1

        def watch() -> None:
            nonlocal seen
            settled = len(sched.done) + len(sched.failed)
            if settled == seen:  # nothing finished since the last look
                return
            seen = settled
            for i, ((_, manifest), summary) in enumerate(zip(runs, summaries)):
                if i in reported or not all(k in sched.done or k in sched.failed for k in keys[i]):
                    continue
                reported.add(i)
                self._summarise(runs, summaries, sched, run, claimed=claimed, only={i})
                if i == 0:  # the run's counters so far (the rest lands here when the queue ends)
                    summary.model_loads = self.stats.model_loads - before[0]
                    summary.identity_encodes = self.stats.identity_encodes - before[1]
                manifest.flush(force=True)
                group.writers.remove(manifest)  # the caller's now: the farm no longer writes it
                on_plan_done(i, summary)

        return watch

    def _scan(self, keys: list[str]) -> dict[str, ChunkRecord]:
        """The records of the committed chunks among ``keys``. An object store is asked by
        SCAN_THREADS threads at once (a request each is latency, not work); a local disk in turn."""
        unique = list(dict.fromkeys(keys))
        if self.store.local or len(unique) < 2 * SCAN_THREADS:
            records = [self.store.committed(k) for k in unique]
        else:
            with ThreadPoolExecutor(SCAN_THREADS, thread_name_prefix="reelfarm-scan") as pool:
                records = list(pool.map(self.store.committed, unique))
        return {k: r for k, r in zip(unique, records) if r is not None}

    def _committed(self, plan: RenderPlan, manifest: ManifestWriter, summary: RenderSummary,
                   force: set[str]) -> set[str]:
        """Keys already committed, recorded as cached in the manifest (rule 1)."""
        done: set[str] = set()
        found = self._scan([c.key for c in plan.chunks if c.key not in force])
        for c in plan.chunks:
            rec = found.get(c.key)
            if rec is None:
                continue
            done.add(c.key)
            if manifest.get(c.key).status == "done":
                continue  # rendered earlier in this same run (a re-render round)
            summary.cached.append(c.key)
            events.emit("chunk_cached", run_id=manifest.run_id, shot=c.name.split("/")[0], chunk=c.name,
                        key=c.key, frames=c.frame_end - c.frame_start)
            manifest.update(c.key, status="cached", output_url=rec.url, checksum=rec.checksum)
        manifest.flush(force=True)
        return done


class _Run:
    """One ``Farm.render``: turns Ray futures into scheduler events and decisions into calls."""

    def __init__(self, farm: Farm, sched: Scheduler, manifest: ManifestWriter | ManifestGroup,
                 summary: RenderSummary, identities: dict[tuple[str, str], Any],
                 force: set[str] | None = None) -> None:
        self.farm, self.sched, self.manifest, self.summary = farm, sched, manifest, summary
        self.force = force or set()
        self.identities = identities
        self.refs: dict[str, deque] = {}  # worker id -> refs of its queued chunks, head running
        self.by_id: dict[str, _Worker] = {}
        self._running: dict[str, str] = {}  # worker -> key it runs, as last announced
        # One writer per chunk (scheduler rule 7): a lease per chunk sent, renewed while in flight.
        ttl = farm.settings.lease_ttl_s
        self.leases = Leases(farm.store, f"{manifest.run_id}/{uuid.uuid4().hex[:8]}", ttl_s=ttl)
        self._renew_s = ttl / 3
        self.watch: Callable[[], None] | None = None  # called each turn of the loop (render_many's hook)

    def loop(self) -> None:
        farm, sched = self.farm, self.sched
        # Workers the farm already runs (they may hold a model), then the nodes' capacity.
        for w in farm._alive():
            self._apply(sched.on(WorkerReady(w.wid, w.node_id, holds=w.model)))
        self._sync_nodes()
        last_flush = last_sync = last_renew = last_held = last_drain = time.monotonic()
        while not sched.finished:
            if self.watch is not None:
                self.watch()
            inflight = {q[0]: wid for wid, q in self.refs.items() if q and self.by_id[wid].alive}
            if not inflight:
                if not sched.alive():
                    break  # the scheduler failed what was left
                if sched.held:  # everything left is another run's: wait for it
                    time.sleep(HELD_POLL_S)
                    self._check_held()
                self._apply(sched.on(Tick()))
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=0.5)
            for ref in ready:
                self._collect(inflight[ref], ref)
            self._apply(sched.on(Tick()))
            now = time.monotonic()
            if now - last_renew >= self._renew_s:
                self._renew()
                last_renew = now
            if sched.held and now - last_held >= HELD_POLL_S:
                self._check_held()
                last_held = now
            if now - last_drain >= DRAIN_POLL_S:
                self._check_draining()
                last_drain = now
            if now - last_sync >= NODE_SYNC_S:
                self._sync_nodes()
                last_sync = now
            if now - last_flush >= farm.settings.manifest_flush_s:
                self.manifest.flush()
                last_flush = now

    # --- leases ---------------------------------------------------------------------------
    def _in_flight(self) -> list[str]:
        return [t.job.key for w in self.sched.workers.values() if w.alive for t in w.queue]

    def _renew(self) -> None:
        for key in self.leases.renew(self._in_flight()):
            logger.warning("chunk %s: another run took its lease over (ours lapsed): both may render it", key)

    def _check_held(self) -> None:
        """Parked chunks: committed by their holder (done), or their lease gone (ready again)."""
        now = time.time()
        for key in list(self.sched.held):
            if self.farm.store.is_complete(key):
                self._apply(self.sched.on(ChunkCommitted(key)))
                self._committed_elsewhere(key)
                continue
            lease = self.leases.holder_of(key)
            if lease is None or not lease.live(now):
                self._apply(self.sched.on(ChunkReleased(key)))

    def _committed_by_us(self, key: str) -> bool:
        try:
            meta = self.farm.store.read_sidecar(key)
        except FarmError:
            return False
        if meta.get("run_id") != self.manifest.run_id:
            return False
        rec = self.farm.store.record(key)
        self.manifest.update(key, status="done", worker=meta.get("worker"), finished_at=utcnow(), error=None,
                             output_url=rec.url if rec else None, checksum=rec.checksum if rec else None)
        self._announce("chunk_done", key, worker=meta.get("worker"))
        return True

    def _committed_elsewhere(self, key: str) -> None:
        rec = self.farm.store.record(key)
        self.manifest.update(key, status="cached", output_url=rec.url if rec else None,
                             checksum=rec.checksum if rec else None, error=None)
        self._announce("chunk_cached", key)

    def release_all(self) -> None:
        """Give up the leases of what is left (an interrupted run): others need not wait them out."""
        for key in self._in_flight():
            self.leases.release(key)

    def _collect(self, wid: str, ref: Any) -> None:
        """One finished chunk call: success, a chunk failure, or a lost worker."""
        self.refs[wid].popleft()
        w = self.by_id[wid]
        key = self._head_key(wid)
        try:
            reply: RenderReply = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            if isinstance(cause, _LOST):
                self._worker_down(w, cause)
            else:
                err = cause if isinstance(cause, FarmError) else RenderError(str(cause))
                self._apply(self.sched.on(ChunkFailed(wid, key, err)))
            return
        except ray.exceptions.RayError as e:  # the worker died, its node went away, or it never started
            self._worker_down(w, e)
            return
        if reply.loaded:
            self.farm.stats.model_loads += 1
        self.summary.steps_saved += reply.steps_saved
        self.summary.nodes_used.add(w.node_id)
        self.summary.workers_used.add(wid)
        self.manifest.update(key, status="done", worker=reply.worker, node=w.node_id, finished_at=utcnow(),
                             render_s=round(reply.render_s, 4), output_url=reply.record.url,
                             checksum=reply.record.checksum, error=None, steps_saved=reply.steps_saved,
                             **reply.qc)
        self._announce("chunk_done", key, worker=wid, seconds=round(reply.render_s, 4))
        self._apply(self.sched.on(ChunkDone(wid, key, seconds=reply.render_s)))
        self.leases.release(key)

    def _head_key(self, wid: str) -> str:
        return self.sched.running()[wid]

    def _announce(self, kind: str, key: str, **fields: Any) -> None:
        job = self.sched.jobs[key]
        _, chunk = job.payload
        events.emit(kind, run_id=self.manifest.run_id, shot=job.shot, chunk=job.name, key=key,
                    frames=chunk.frame_end - chunk.frame_start, est_s=job.est_s, **fields)

    def _worker_down(self, w: _Worker, cause: BaseException) -> None:
        logger.warning("worker %s lost: %s", w.wid, type(cause).__name__)
        events.emit("worker_lost", run_id=self.manifest.run_id, worker=w.wid, error=type(cause).__name__)
        self._sync_nodes()  # a node that went away takes all its workers with it
        self._apply(self.sched.on(WorkerDown(w.wid, type(cause).__name__)))

    def _check_draining(self) -> None:
        """Nodes Ray is taking away get no new chunk (scheduler rule 8). Their running chunks
        go on (most end before the deadline) and save a checkpoint at their next step end:
        if the node goes first, the chunk resumes elsewhere from there (render/checkpoints.py)."""
        for node in sorted(draining_nodes() & set(self.sched.nodes) - self.sched.draining):
            events.emit("node_draining", run_id=self.manifest.run_id, detail={"node": node})
            self._apply(self.sched.on(NodeDraining(node)))
            for wid in self.sched.running():
                w = self.by_id.get(wid)
                if w is not None and w.node_id == node:
                    w.handle.checkpoint_now.remote()  # fire and forget: the node may go first

    def _sync_nodes(self) -> None:
        """Tell the scheduler which nodes can hold workers now (joins and losses)."""
        farm, sched = self.farm, self.sched
        slots = {s.node_id: s for s in node_slots(workers=farm.settings.workers, gpu=farm._gpu,
                                                  gpus_per_worker=farm.settings.gpus_per_worker)}
        for node in list(sched.nodes):
            if node not in slots:
                self._apply(sched.on(NodeDown(node)))
        for node, s in slots.items():
            want = s.gpus or s.cpus
            if sched.nodes.get(node) != (want, bool(s.gpus)):
                self._apply(sched.on(NodeUp(node, want, gpu=bool(s.gpus))))

    def _apply(self, decisions: list) -> None:
        """Carry out the scheduler's decisions; a Spawn answers with WorkerReady at once."""
        pending = deque(decisions)
        while pending:
            d = pending.popleft()
            if isinstance(d, Submit):
                pending.extend(self._submit(d))
            elif isinstance(d, Spawn):
                w = self.farm._spawn(d.node, gpu=d.gpu)
                pending.extend(self.sched.on(WorkerReady(w.wid, w.node_id)))
            elif isinstance(d, Kill):
                self.farm._retire(self._worker(d.worker))
            elif isinstance(d, Requeue):
                self.manifest.update(d.key, status="planned", error=d.error[:2000])
                self._announce("chunk_retry", d.key, error=d.error[:500])
            elif isinstance(d, Fail):
                self.manifest.update(d.key, status="failed", error=d.error[:2000], attempts=d.attempts,
                                     finished_at=utcnow())
                self._announce("chunk_failed", d.key, error=d.error[:500], attempt=d.attempts)
                self.leases.release(d.key)
        alive = set(self.sched.alive())
        for wid, w in self.by_id.items():  # workers the scheduler took out are out here too
            if wid not in alive:
                if w.alive or w.pg is not None:
                    self.farm._retire(w)
                self.refs.pop(wid, None)
        running = self.sched.running()
        for wid, key in running.items():  # a chunk starts when it reaches the head of its queue
            if self._running.get(wid) != key:
                self._announce("chunk_start", key, worker=wid)
        self._running = running

    def _worker(self, wid: str) -> _Worker:
        if wid not in self.by_id:
            self.by_id[wid] = next(w for w in self.farm.workers if w.wid == wid)
        return self.by_id[wid]

    def _submit(self, d: Submit) -> list:
        """Send a chunk, once its lease is ours; returns the decisions a parked chunk leads to."""
        if not self.leases.acquire(d.key):
            return self.sched.on(ChunkHeld(d.worker, d.key))
        again = d.key in self.force or d.key in self.sched.rerendered  # known bad: render it anyway
        if not again and self.farm.store.is_complete(d.key):  # committed since we looked
            self.leases.release(d.key)
            # By another run, or by one of ours lost before it could answer (its retry).
            ours = self._committed_by_us(d.key)
            out = self.sched.on(ChunkHeld(d.worker, d.key)) + self.sched.on(ChunkCommitted(d.key, ours=ours))
            if not ours:
                self._committed_elsewhere(d.key)
            return out
        w = self._worker(d.worker)
        shot, chunk = self.sched.jobs[d.key].payload
        lk = load_key(shot.model)
        w.model = lk
        names = list(shot.characters)
        refs = [self.identities[(lk, n)] for n in names]
        fitted = self.farm.fitted(shot.model, w)  # offload its GPU needs: pixels and key unchanged
        if fitted is not shot.model:
            shot = shot.model_copy(update={"model": fitted})
        ref = w.handle.render.remote(shot, chunk, self.farm.store, names, *refs, low_memory=d.low_memory,
                                     run_id=self.manifest.run_id, attempt=d.attempt)
        self.refs.setdefault(d.worker, deque()).append(ref)
        self.manifest.update(d.key, status="running", attempts=d.attempt, worker=w.wid, node=w.node_id,
                             gpu=self.farm.gpu_label(w), started_at=utcnow())
        return []
