"""The chunk scheduler as a state machine: events in, decisions out. No Ray, no wall clock.

Rules the scheduler keeps:

1. A chunk whose content key already has a committed output is not rendered again
   (the adapter passes those keys as ``done``).
2. A chunk is ready when the chunk it continues from is committed.
3. Among ready chunks: those for the model a worker already holds first (unless, with
   more than one worker, another model's chain is over twice as long), then the longest
   remaining chain (estimate of the chunk and everything that waits on it).
   Estimates are learned: once chunks of a cost class (family, resolution, steps) finish,
   that class's measured seconds per frame replace the planner's estimate, and the
   chains are weighed again, so a wrong cost model does not hold the critical path. With
   more than one worker, the first ready chunk of a class not yet started goes first (a
   probe), so every class is measured early.
4. Each worker has one chunk running and ``queue_depth - 1`` queued behind it; idle
   workers are given a chunk before busy ones queue another.
5. Failures by class: worker or node lost, timeout -> retry elsewhere; out of memory ->
   retry with low-memory settings; bad input or model error -> fail the chunk now; the
   chunk it continues from unreadable -> render that one again, then this one.
   A failed chunk fails its shot (and the chunks that continue from it); other shots go on.
6. A node whose workers fail ``node_failure_limit`` chunks is blocklisted for the run
   (never the last node that can take work).
7. One writer per chunk: a chunk whose lease another live run holds is parked (``ChunkHeld``)
   until that run commits it (``ChunkCommitted``: done here, not rendered) or lets the lease
   go (``ChunkReleased``: ready again). The adapter takes the leases (cluster/lease.py).
8. A draining node (``NodeDraining``: spot preemption or scale-down with a deadline) gets
   no new chunk and no new worker; its running chunks may finish, and a worker it loses
   does not count against it.

The same class drives the Ray farm (:mod:`reelfarm.cluster.farm` turns Ray futures into
events and decisions into actor calls) and a simulator (a discrete-event clock). Time
comes only from the ``clock`` it is given.

    sched = Scheduler(jobs, Rules(), clock=fake_clock)
    sched.on(NodeUp("n1", slots=1))              # -> [Spawn("n1")]
    sched.on(WorkerReady("w1", node="n1"))       # -> [Submit(key, "w1", ...), ...]
    sched.on(ChunkDone("w1", key, seconds=41.2))  # -> [Submit(next, "w1", ...)]
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from reelfarm.errors import BackendError, ChunkTimeout, DependencyUnreadable, FarmError, GpuOutOfMemory
from reelfarm.errors import WorkerLost as WorkerLostError

__all__ = [
    "ChunkCommitted",
    "ChunkDone",
    "ChunkFailed",
    "ChunkHeld",
    "ChunkReleased",
    "Decision",
    "Event",
    "Fail",
    "Job",
    "Kill",
    "NodeDown",
    "NodeDraining",
    "NodeUp",
    "Requeue",
    "Rules",
    "Scheduler",
    "Spawn",
    "Submit",
    "Tick",
    "WorkerDown",
    "WorkerReady",
    "chain_estimates",
    "cost_class",
]

logger = logging.getLogger(__name__)


# --- what is scheduled, and how -----------------------------------------------------------
@dataclass(frozen=True, slots=True)  # slots: a 100,000-chunk film holds 100,000 of these
class Job:
    """One chunk as the scheduler sees it.

    Attributes:
        key: content key (unique per job).
        name: ``<shot>/chunk-<first>-<last>``, for messages.
        shot: shot id: a failed chunk fails its shot.
        est_s: estimated GPU-seconds.
        model: the load key of the model it needs (workers holding it are preferred).
        depends_on: key of the chunk it continues from, if any.
        payload: what the adapter needs to run it (opaque here).
        cost: the cost class its measured seconds are pooled in (see :func:`cost_class`);
            ``None``: the model's load key.
        frames: frames it renders (measured costs are learned per frame); 0: learned per
            estimated second instead.
    """

    key: str
    name: str
    shot: str
    est_s: float
    model: str
    depends_on: str | None = None
    payload: Any = None
    cost: str | None = None
    frames: int = 0


def cost_class(family: str, width: int, height: int, steps: int) -> str:
    """The class chunks pool their measured cost in: one model family, size and step count."""
    return f"{family}/{width}x{height}/{steps}"


# Learned costs: weigh the chains again when a class's rate moves more than this, checked
# when its sample count reaches a power of two; a re-weigh is O(chunks), so one waits for
# RELEARN_EVERY of the chunks to finish after the last (changes meanwhile are pooled).
RELEARN_DRIFT = 0.10
AFFINITY_YIELD = 2.0
RELEARN_EVERY = 0.001


@dataclass(frozen=True)
class Rules:
    """Retry, blocklist, queue and timeout policy (from :class:`~reelfarm.settings.Settings`)."""

    max_attempts: int = 3
    node_failure_limit: int = 3
    queue_depth: int = 1  # as Settings: the simulator (``reelfarm plan --gpus``) must run what the farm runs
    timeout_factor: float = 10.0
    timeout_floor_s: float = 600.0
    load_timeout_s: float = 1800.0

    @classmethod
    def from_settings(cls, settings: Any) -> Rules:
        return cls(**{f: getattr(settings, f) for f in cls.__dataclass_fields__})


# --- events in ----------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeUp:
    """A node can hold ``slots`` workers (one per GPU, or CPU workers)."""

    node: str
    slots: int
    gpu: bool = False


@dataclass(frozen=True)
class NodeDown:
    """A node left the cluster: its workers are lost."""

    node: str


@dataclass(frozen=True)
class NodeDraining:
    """The cluster is taking a node away (spot preemption, scale-down) with a deadline: it
    gets no new chunk and no new worker; what runs there may finish."""

    node: str


@dataclass(frozen=True)
class WorkerReady:
    """A worker exists on ``node`` (started earlier, or in answer to a Spawn)."""

    worker: str
    node: str
    holds: str | None = None  # load key of the model it already holds


@dataclass(frozen=True)
class ChunkDone:
    """The chunk at the head of ``worker``'s queue is committed."""

    worker: str
    key: str
    seconds: float = 0.0


@dataclass(frozen=True)
class ChunkFailed:
    """The chunk at the head of ``worker``'s queue raised ``error``; the worker lives on."""

    worker: str
    key: str
    error: FarmError


@dataclass(frozen=True)
class WorkerDown:
    """A worker died (its process or its node); its running chunk counts as an attempt."""

    worker: str
    reason: str = ""


@dataclass(frozen=True)
class ChunkHeld:
    """``key`` was just submitted to ``worker`` but another live run holds its lease: the
    adapter did not send it. The chunk is parked until committed or released."""

    worker: str
    key: str


@dataclass(frozen=True)
class ChunkCommitted:
    """A parked chunk was committed by the run holding its lease: done here, not rendered.

    ``ours``: the commit is this run's own, made by a worker lost before it could answer;
    the chunk counts as rendered (once) by this run.
    """

    key: str
    ours: bool = False


@dataclass(frozen=True)
class ChunkReleased:
    """A parked chunk's lease was given up or lapsed uncommitted: ready again."""

    key: str


@dataclass(frozen=True)
class Tick:
    """Time passed: check running chunks against their time limits."""


Event = (NodeUp | NodeDown | NodeDraining | WorkerReady | ChunkDone | ChunkFailed | WorkerDown | ChunkHeld
         | ChunkCommitted | ChunkReleased | Tick)


# --- decisions out ------------------------------------------------------------------------
@dataclass(frozen=True)
class Submit:
    """Send ``key`` to ``worker`` (queued behind what it runs)."""

    key: str
    worker: str
    attempt: int
    low_memory: bool = False
    loads: bool = False  # the worker must load the model first


@dataclass(frozen=True)
class Kill:
    """Stop ``worker``: it hung, or its node is blocklisted."""

    worker: str
    reason: str = ""


@dataclass(frozen=True)
class Spawn:
    """Start a worker on ``node``; answer with ``WorkerReady`` when it exists."""

    node: str
    gpu: bool = False


@dataclass(frozen=True)
class Requeue:
    """``key`` failed an attempt and will be tried again."""

    key: str
    error: str


@dataclass(frozen=True)
class Fail:
    """``key`` is given up on; its shot has failed."""

    key: str
    error: str
    attempts: int = 0


Decision = Submit | Kill | Spawn | Requeue | Fail


# --- internal state -----------------------------------------------------------------------
@dataclass(slots=True)
class _Task:
    job: Job
    priority: float
    attempts: int = 0
    low_memory: bool = False
    avoid: str | None = None  # worker that last failed it
    loads: bool = False


@dataclass(slots=True)
class _Worker:
    wid: str
    node: str
    model: str | None = None
    queue: deque[_Task] = field(default_factory=deque)  # head is running
    head_since: float = 0.0
    started: bool = False
    alive: bool = True
    rank: int = 0  # creation order: workers are filled in this order


def chain_estimates(jobs: Iterable[Job]) -> dict[str, float]:
    """Each job's estimate plus the longest chain of jobs that continue from it."""
    chain: dict[str, float] = {}
    tail: dict[str, float] = {}  # key -> longest chain among the jobs continuing from it
    for j in reversed(list(jobs)):  # a job is listed after the one it continues from
        c = chain[j.key] = j.est_s + tail.get(j.key, 0.0)
        if j.depends_on and c > tail.get(j.depends_on, 0.0):
            tail[j.depends_on] = c
    return chain


class Scheduler:
    """Decides which worker renders which chunk, and what to do when things fail.

    Args:
        jobs: every chunk of the run, in plan order (a chunk after the one it continues from).
        rules: retry, blocklist, queue and timeout policy.
        clock: seconds, monotonic; the farm passes ``time.monotonic``, tests and the
            simulator their own.
        done: keys already committed (not rendered; their dependants are ready).
        blocklist: nodes blocklisted earlier in the same farm's life (updated in place).
        node_failures: failures per node so far (updated in place).
        learn: learn costs from measured chunks (rule 3); False keeps the planner's estimates.
    """

    def __init__(self, jobs: Iterable[Job], rules: Rules, *, clock: Callable[[], float],
                 done: Iterable[str] = (), blocklist: set[str] | None = None,
                 node_failures: dict[str, int] | None = None, learn: bool = True) -> None:
        self.rules = rules
        self.clock = clock
        self.learn = learn
        self._handlers: dict[type, Callable[[Any], None]] = {}
        self.jobs = {j.key: j for j in jobs}
        self.done: set[str] = set(done)
        self.blocklist = blocklist if blocklist is not None else set()
        self.node_failures = node_failures if node_failures is not None else {}
        self.rendered: list[str] = []
        self.failed: dict[str, str] = {}
        self.failed_shots: dict[str, str] = {}
        self.rerendered: set[str] = set()
        self.held: dict[str, _Task] = {}  # parked: another run holds the lease (rule 7)
        self.elsewhere: list[str] = []  # committed by another run while parked here
        self.retries = 0
        self.workers: dict[str, _Worker] = {}
        self.nodes: dict[str, tuple[int, bool]] = {}  # node -> (slots, gpu)
        self._spawning: dict[str, int] = {}
        self._chain = chain_estimates(self.jobs.values())
        # Ready chunks, one heap per (model, cost class): a pick looks at each heap's top.
        self._heaps: dict[tuple[str, str], list[tuple[float, int, _Task]]] = {}
        self._started: set[str] = set()  # cost classes with a chunk submitted
        self._unstarted = {j.cost or j.model for j in self.jobs.values()}  # not yet probed
        self._n_ready = 0
        # Chunks waiting on a key: one, or a list when several continue from it (rare); a job
        # never tried waits as its Job (no task yet: 100,000 chunks mostly wait).
        self._waiting: dict[str, Job | _Task | list[Job | _Task]] = {}
        self._seq = itertools.count()
        self._out: list[Decision] = []
        self._hungry: set[str] = set()  # alive workers with room in their queue
        self.draining: set[str] = set()  # nodes being taken away: no new chunk, no new worker
        self._n_alive = 0
        self._n_queued = 0  # chunks queued on alive workers
        self._ranks = itertools.count()
        # Learned costs: class -> [seconds, size, samples] from chunks that loaded no model,
        # and the same from chunks that did (a load is not the chunk's cost, but it is the
        # only measure of a class whose chunks all ran first on their worker so far).
        self.learned: dict[str, list[float]] = {}
        self._learned_loaded: dict[str, list[float]] = {}
        self._rate_used: dict[str, float] = {}  # the rate each class's chains were weighed with
        self.rechains = 0
        self._stale = False  # a class's rate moved: weigh the chains again
        self._since_rechain = 0
        self._rechain_every = max(1, int(RELEARN_EVERY * len(self.jobs)))
        self._kids: dict[str, list[str]] | None = None  # key -> keys continuing from it
        self.remaining = 0
        for job in self.jobs.values():
            if job.key not in self.done:
                self._add(job)

    # --- public ---------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """Nothing left to render or wait for."""
        return self.remaining <= 0

    def alive(self) -> list[str]:
        return [w.wid for w in self.workers.values() if w.alive]

    def rate(self, cls: str) -> float | None:
        """Learned seconds per frame (or per estimated second) of a cost class; None: none yet."""
        acc = self.learned.get(cls) or self._learned_loaded.get(cls)
        return acc[0] / acc[1] if acc is not None and acc[1] > 0 else None

    def estimate(self, job: Job) -> float:
        """GPU-seconds ``job`` is expected to take: learned for its class, else the planner's."""
        r = self.rate(job.cost or job.model)
        if r is None:
            return job.est_s
        return r * (job.frames if job.frames > 0 else job.est_s)

    def running(self) -> dict[str, str]:
        """Worker -> key of the chunk it is running now."""
        return {w.wid: w.queue[0].job.key for w in self.workers.values() if w.alive and w.queue}

    def on(self, event: Event) -> list[Decision]:
        """Apply one event; return the decisions it leads to, in order."""
        handler = self._handlers.get(type(event))
        if handler is None:
            handler = self._handlers[type(event)] = getattr(self, "_on_" + type(event).__name__)
        handler(event)
        if self._stale and self._since_rechain >= self._rechain_every:
            self._rechain()
        if not self.finished:
            self._dispatch()
            self._check_capacity()
        out, self._out = self._out, []
        return out

    # --- events ---------------------------------------------------------------------------
    def _on_NodeUp(self, e: NodeUp) -> None:  # noqa: N802 - named after the event
        self.nodes[e.node] = (e.slots, e.gpu)
        self._fill_slots()

    def _on_NodeDown(self, e: NodeDown) -> None:  # noqa: N802
        self.nodes.pop(e.node, None)
        self._spawning.pop(e.node, None)
        for w in list(self.workers.values()):
            if w.alive and w.node == e.node:
                self._lose(w, cause=WorkerLostError(f"{w.wid}: node {e.node} left the cluster"))
        self._fill_slots()

    def _on_NodeDraining(self, e: NodeDraining) -> None:  # noqa: N802
        if e.node in self.draining:
            return
        logger.warning("node %s is draining: no new chunk goes there", e.node)
        self.draining.add(e.node)
        for w in self.workers.values():
            if w.node == e.node:
                self._hungry.discard(w.wid)
        self._spawning.pop(e.node, None)

    def _feed(self, wid: str) -> None:
        """``wid`` has room for a chunk: it may get one, unless its node is draining."""
        w = self.workers.get(wid)
        if w is not None and w.node not in self.draining:
            self._hungry.add(wid)

    def _on_WorkerReady(self, e: WorkerReady) -> None:  # noqa: N802
        if self._spawning.get(e.node):
            self._spawning[e.node] -= 1
        old = self.workers.get(e.worker)
        if old is not None and old.alive:
            self._n_alive -= 1
            self._n_queued -= len(old.queue)
        rank = old.rank if old is not None else next(self._ranks)
        self.workers[e.worker] = _Worker(e.worker, e.node, model=e.holds, started=e.holds is not None,
                                         rank=rank)
        self._n_alive += 1
        self._feed(e.worker)

    def _on_ChunkDone(self, e: ChunkDone) -> None:  # noqa: N802
        head = self._pop_head(e.worker, e.key)
        if head is None:
            return
        _, task = head
        key = task.job.key
        self.done.add(key)
        self.rendered.append(key)
        self.remaining -= 1
        if e.seconds > 0 and self.learn:
            self._learn(task, e.seconds)
        for dep in self._unwait(key):
            self._make_ready(dep)

    def _on_ChunkFailed(self, e: ChunkFailed) -> None:  # noqa: N802
        head = self._pop_head(e.worker, e.key)
        if head is None:
            return
        w, task = head
        err = e.error
        if isinstance(err, DependencyUnreadable):
            self._rerender_dependency(task, err)
        elif isinstance(err, BackendError) or not err.retryable:
            self._fail(task, f"{type(err).__name__}: {err}")
        else:
            self._retry(task, err, w.wid)  # the chunk's failure, not the node's

    def _on_WorkerDown(self, e: WorkerDown) -> None:  # noqa: N802
        w = self.workers.get(e.worker)
        if w is None or not w.alive:
            return
        logger.warning("worker %s lost: %s", w.wid, e.reason)
        self._lose(w, cause=WorkerLostError(f"{w.wid}: {e.reason}" if e.reason else w.wid))
        if w.node not in self.draining:  # a drained node going away is not its fault
            self._node_failed(w.node)
        self._fill_slots()

    def _on_ChunkHeld(self, e: ChunkHeld) -> None:  # noqa: N802
        w = self.workers.get(e.worker)
        task = next((t for t in (w.queue if w else ()) if t.job.key == e.key), None)
        if w is None or task is None:
            return
        was_head = w.queue[0] is task
        w.queue.remove(task)
        task.attempts -= 1  # never sent
        if w.alive:
            self._n_queued -= 1
            self._feed(w.wid)
        if was_head:
            w.head_since = self.clock()
        self.held[e.key] = task

    def _on_ChunkCommitted(self, e: ChunkCommitted) -> None:  # noqa: N802
        task = self.held.pop(e.key, None)
        if task is None:
            return
        self.done.add(e.key)
        (self.rendered if e.ours else self.elsewhere).append(e.key)
        self.remaining -= 1
        for dep in self._unwait(e.key):
            self._make_ready(dep)

    def _on_ChunkReleased(self, e: ChunkReleased) -> None:  # noqa: N802
        task = self.held.pop(e.key, None)
        if task is not None:
            self._make_ready(task)

    def _on_Tick(self, e: Tick) -> None:  # noqa: N802
        now = self.clock()
        r = self.rules
        for w in list(self.workers.values()):
            if not (w.alive and w.queue):
                continue
            task = w.queue[0]
            # A learned cost only lengthens the limit: an estimate 3x low must not kill.
            limit = max(r.timeout_floor_s, r.timeout_factor * max(task.job.est_s, self.estimate(task.job)))
            if task.loads:  # loading a model (and starting a worker) is not rendering
                limit += r.load_timeout_s
            if now - w.head_since > limit:
                logger.warning("%s ran %.0f s (limit %.0f s) on %s: cancelled",
                               task.job.name, now - w.head_since, limit, w.wid)
                self._lose(w, cause=ChunkTimeout(f"{task.job.name} ran past {limit:.0f} s"), kill=True)
                self._node_failed(w.node)
                self._fill_slots()

    # --- queue ----------------------------------------------------------------------------
    def _add(self, item: Job | _Task) -> None:
        """A chunk to render: ready, or waiting on the chunk it continues from. A job not yet
        tried waits as itself; its task (attempts, priority) is made when it is ready."""
        self.remaining += 1
        dep = item.depends_on if isinstance(item, Job) else item.job.depends_on
        if dep and dep not in self.done:
            self._wait_on(dep, item)
        else:
            self._make_ready(item if isinstance(item, _Task) else _Task(item, 0.0))

    def _wait_on(self, dep: str, item: Job | _Task) -> None:
        held = self._waiting.get(dep)
        if held is None:
            self._waiting[dep] = item  # the usual case: one chunk continues from ``dep``
        elif isinstance(held, list):
            held.append(item)
        else:
            self._waiting[dep] = [held, item]

    def _unwait(self, key: str) -> list[_Task]:
        """The chunks that waited on ``key``, no longer waiting."""
        held = self._waiting.pop(key, None)
        items = [] if held is None else held if isinstance(held, list) else [held]
        return [t if isinstance(t, _Task) else _Task(t, 0.0) for t in items]

    def _make_ready(self, task: _Task) -> None:
        job = task.job
        task.priority = self._priority(job)
        hk = (job.model, job.cost or job.model)
        heap = self._heaps.get(hk)
        if heap is None:
            heap = self._heaps[hk] = []
        heapq.heappush(heap, (-task.priority, next(self._seq), task))
        self._n_ready += 1

    def _pop_head(self, wid: str, key: str) -> tuple[_Worker, _Task] | None:
        """The worker and the chunk it ran; None for news of a worker already taken out."""
        w = self.workers.get(wid)
        if w is None or not w.alive or not w.queue or w.queue[0].job.key != key:
            logger.debug("ignoring the result of %s from %s: no longer its running chunk", key, wid)
            return None
        task = w.queue.popleft()
        self._n_queued -= 1
        self._feed(wid)
        w.head_since = self.clock()
        return w, task

    def _best(self, heap: list[tuple[float, int, _Task]], w: _Worker, multi: bool) -> int | None:
        """Index in ``heap`` of its best chunk ``w`` may take (not one that just failed there)."""
        if not heap:
            return None
        if not (multi and heap[0][2].avoid == w.wid):
            return 0
        allowed = [i for i, (_, _, t) in enumerate(heap) if t.avoid != w.wid]  # rare: a retry
        return min(allowed, key=lambda i: heap[i][:2]) if allowed else None

    def _pick(self, w: _Worker, multi: bool) -> _Task | None:
        """Best ready task for ``w``: a probe of an unmeasured class, its own model, the longest chain."""
        if not self._n_ready:
            return None
        if w.model is not None and not self._unstarted:  # the usual case: its own model's best
            own_heaps = [h for (m, _), h in self._heaps.items() if m == w.model and h]
            if len(own_heaps) == 1 and not (multi and own_heaps[0][0][2].avoid == w.wid):
                # ...unless another model's chain is the critical path (the same test as below).
                limit = AFFINITY_YIELD * -own_heaps[0][0][0]
                if not multi or all(-h[0][0] <= limit for (m, _), h in self._heaps.items() if m != w.model and h):
                    self._n_ready -= 1
                    return heapq.heappop(own_heaps[0])[2]
        best: tuple[Any, int] | None = None  # (heap, index) per tier: probe, own model, any
        own: tuple[Any, int] | None = None
        probe: tuple[Any, int] | None = None
        for (model, cls), heap in self._heaps.items():
            i = self._best(heap, w, multi)
            if i is None:
                continue
            rank = heap[i][:2]
            if best is None or rank < best[0][best[1]][:2]:
                best = (heap, i)
            if model == w.model and (own is None or rank < own[0][own[1]][:2]):
                own = (heap, i)
            if multi and self.learn and cls not in self._started and (probe is None or rank < probe[0][probe[1]][:2]):
                probe = (heap, i)
        # Its own model first, unless (with other workers to share the load) another
        # model's chain is more than AFFINITY_YIELD times longer: that is the critical path.
        if own is not None and best is not None and multi and \
                -best[0][best[1]][0] > AFFINITY_YIELD * -own[0][own[1]][0]:
            own = None
        choice = probe or own or best
        if choice is None:
            return None
        heap, i = choice
        self._n_ready -= 1
        if i == 0:
            return heapq.heappop(heap)[2]
        item = heap[i]
        heap[i] = heap[-1]
        heap.pop()
        heapq.heapify(heap)
        return item[2]

    def _dispatch(self) -> None:
        if not self._n_ready or not self._hungry:
            return
        multi = self._n_alive > 1
        depth = self.rules.queue_depth
        hungry = self._hungry
        order = sorted(hungry, key=lambda wid: self.workers[wid].rank) if len(hungry) > 1 else list(hungry)
        # Breadth first: an idle worker gets a chunk before a busy one queues a second, and
        # none queues a second while workers still starting could take what is ready.
        coming = sum(self._spawning.values()) if depth > 1 else 0
        for level in range(1, depth + 1):
            if level > 1 and self._n_ready <= coming:
                return
            for wid in order:
                w = self.workers[wid]
                if len(w.queue) >= level:
                    continue
                task = self._pick(w, multi)
                if task is None:
                    continue
                self._submit(w, task)
                if len(w.queue) >= depth:
                    hungry.discard(wid)
                if not self._n_ready:
                    return

    def _submit(self, w: _Worker, task: _Task) -> None:
        task.attempts += 1
        task.loads = w.model != task.job.model or not w.started
        w.model = task.job.model
        w.started = True
        if not w.queue:
            w.head_since = self.clock()
        w.queue.append(task)
        self._n_queued += 1
        cls = task.job.cost or task.job.model
        if cls in self._unstarted:
            self._started.add(cls)
            self._unstarted.discard(cls)
        self._out.append(Submit(task.job.key, w.wid, task.attempts, task.low_memory, task.loads))

    # --- learned costs ---------------------------------------------------------------------
    def _learn(self, task: _Task, seconds: float) -> None:
        """Pool a measured cost in its class; mark the chains stale when the rate moved."""
        self._since_rechain += 1
        job = task.job
        size = job.frames if job.frames > 0 else job.est_s
        if size <= 0:
            return
        cls = job.cost or job.model
        pools = self._learned_loaded if task.loads else self.learned
        if task.loads and cls in self.learned:
            return  # clean samples exist: a load would only blur them
        acc = pools.get(cls)
        if acc is None:
            acc = pools[cls] = [0.0, 0.0, 0]
        acc[0] += seconds
        acc[1] += size
        acc[2] += 1
        n = int(acc[2])
        if n & (n - 1):
            return  # checked at 1, 2, 4, 8... samples
        new = self.rate(cls) or 0.0
        used = self._rate_used.get(cls, job.est_s / size)  # at first: the planner's implied rate
        if abs(new - used) > RELEARN_DRIFT * used:
            self._rate_used[cls] = new
            self._stale = True

    def _rechain(self) -> None:
        """Longest remaining chains again, with learned costs; ready chunks re-ordered."""
        self.rechains += 1
        self._stale = False
        self._since_rechain = 0
        rates = {cls: r for cls in {*self.learned, *self._learned_loaded} if (r := self.rate(cls))}
        chain: dict[str, float] = {}
        children = self._children()
        done = self.done
        for job in reversed(list(self.jobs.values())):
            key = job.key
            if key in done:
                continue  # what is done waits on nothing; its chain no longer matters
            r = rates.get(job.cost or job.model)
            est = job.est_s if r is None else r * (job.frames if job.frames > 0 else job.est_s)
            kids = children.get(key)
            chain[key] = est + (max(chain.get(k, 0.0) for k in kids) if kids else 0.0)
        self._chain = chain
        for heap in self._heaps.values():
            for i, (_, seq, task) in enumerate(heap):
                task.priority = chain[task.job.key]
                heap[i] = (-task.priority, seq, task)
            heapq.heapify(heap)

    def _priority(self, job: Job) -> float:
        """``job``'s chain: weighed already, or (done when last weighed) weighed now."""
        p = self._chain.get(job.key)
        if p is None:
            kids = self._children().get(job.key, ())
            p = self.estimate(job) + max((self._chain.get(k, 0.0) for k in kids), default=0.0)
        return p

    def _children(self) -> dict[str, list[str]]:
        if self._kids is None:
            kids: dict[str, list[str]] = {}
            for j in self.jobs.values():
                if j.depends_on and j.depends_on in self.jobs:
                    kids.setdefault(j.depends_on, []).append(j.key)
            self._kids = kids
        return self._kids

    # --- failures -------------------------------------------------------------------------
    def _fail(self, task: _Task, error: str) -> None:
        job = task.job
        self.failed[job.key] = error
        self.failed_shots.setdefault(job.shot, f"{job.name}: {error}")
        self.remaining -= 1
        self._out.append(Fail(job.key, error, task.attempts))
        for dep in self._unwait(job.key):  # chunks that continue from it cannot start
            self._fail(dep, f"blocked: {job.name} failed")

    def _retry(self, task: _Task, error: FarmError, wid: str | None) -> None:
        if task.attempts >= self.rules.max_attempts:
            self._fail(task, f"{type(error).__name__} after {task.attempts} attempts: {error}")
            return
        self.retries += 1
        task.avoid = wid
        if isinstance(error, GpuOutOfMemory):
            task.low_memory = True
        self._out.append(Requeue(task.job.key, f"{type(error).__name__}: {error}"))
        self._make_ready(task)

    def _rerender_dependency(self, task: _Task, error: DependencyUnreadable) -> None:
        """The chunk ``task`` continues from is unreadable: render it again, then ``task``."""
        dep = error.key
        task.attempts -= 1  # not this chunk's fault
        if dep in self.rerendered or dep not in self.jobs:
            self._fail(task, f"{type(error).__name__}: {error}")
            return
        logger.warning("%s: rendering its dependency %s again (%s)", task.job.name, dep, error)
        self.rerendered.add(dep)
        self.done.discard(dep)
        self._add(_Task(self.jobs[dep], self._priority(self.jobs[dep])))
        self._wait_on(dep, task)

    def _lose(self, w: _Worker, *, cause: FarmError | None, kill: bool = False,
              counts: bool = True) -> None:
        """Take ``w`` out; the running chunk is retried (an attempt), the queued ones go back."""
        if not w.alive:
            return
        w.alive = False
        self._n_alive -= 1
        self._n_queued -= len(w.queue)
        self._hungry.discard(w.wid)
        if kill:
            self._out.append(Kill(w.wid, str(cause) if cause else "blocklisted"))
        first = True
        while w.queue:
            task = w.queue.popleft()
            if first and counts and cause is not None:
                self._retry(task, cause, w.wid)
            else:
                task.attempts -= 1
                self._make_ready(task)
            first = False

    def _node_failed(self, node: str) -> None:
        """Count a failure the node caused (a lost worker, a hung chunk).

        The last node that can take work is never blocklisted: that would fail every
        chunk left, where carrying on may still finish most of them.
        """
        self.node_failures[node] = self.node_failures.get(node, 0) + 1
        others = {w.node for w in self.workers.values() if w.alive} - {node}
        if (self.node_failures[node] >= self.rules.node_failure_limit and node not in self.blocklist
                and others):
            logger.warning("node %s failed %d chunks: blocklisted for this run", node,
                           self.node_failures[node])
            self.blocklist.add(node)
            for w in list(self.workers.values()):
                if w.alive and w.node == node:
                    self._lose(w, cause=None, kill=True, counts=False)

    # --- capacity -------------------------------------------------------------------------
    def _fill_slots(self) -> None:
        """Spawn workers until every known, non-blocklisted node has its share."""
        have: dict[str, int] = {}
        for w in self.workers.values():
            if w.alive:
                have[w.node] = have.get(w.node, 0) + 1
        for node, (slots, gpu) in self.nodes.items():
            if node in self.blocklist or node in self.draining:
                continue
            for _ in range(slots - have.get(node, 0) - self._spawning.get(node, 0)):
                self._spawning[node] = self._spawning.get(node, 0) + 1
                self._out.append(Spawn(node, gpu))

    def _check_capacity(self) -> None:
        """Fail what can never run rather than wait forever.

        No worker alive and none coming: every chunk left fails. Nothing ready and nothing
        running while chunks still wait: their dependencies will never come.
        """
        if not self._n_alive and not any(self._spawning.values()) and self.workers:
            heaps = list(self._heaps.values())
            self._heaps = {}
            self._n_ready = 0
            for heap in heaps:
                for _, _, task in sorted(heap, key=lambda item: item[:2]):
                    self._fail(task, "no worker left: every node is lost or blocklisted")
        elif self._n_ready or self._n_queued or self.held:
            return
        for key in list(self._waiting):
            for t in self._unwait(key):
                self._fail(t, f"blocked: dependency {self.jobs[key].name if key in self.jobs else key} "
                              "never rendered")
