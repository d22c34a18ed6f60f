"""The farm simulated: the real :class:`~reelfarm.cluster.scheduler.Scheduler` on a discrete-event clock.

No Ray, no sleeping. Each chunk holds a GPU for a time from a table per model family and
GPU class; spot preemptions take nodes away (Poisson, seeded) and cost the work since the
chunk's last checkpoint. The result holds the makespan next to its lower bound,
``max(total GPU time / GPUs, longest dependency chain)``, utilisation and cost.

    jobs, costs = sim_jobs(plan, gpu="h200")
    result = simulate(jobs, costs, SimSpec(gpus=64, gpu="h200"))
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reelfarm.cluster.scheduler import (
    ChunkDone,
    Fail,
    Job,
    Kill,
    NodeDown,
    NodeUp,
    Requeue,
    Rules,
    Scheduler,
    Spawn,
    Submit,
    WorkerReady,
    cost_class,
)
from reelfarm.schemas.families import FAMILIES
from reelfarm.schemas.plan import RenderPlan

__all__ = ["FAMILY_COSTS", "GPU_CLASSES", "FamilyCost", "GpuClass", "SimResult", "SimSpec",
           "chunk_seconds", "sim_jobs", "simulate", "simulate_plans", "summary"]

logger = logging.getLogger(__name__)


# --- the cost table ------------------------------------------------------------------------
@dataclass(frozen=True)
class GpuClass:
    """A GPU class: throughput relative to an H200 on video diffusion, and its price.

    ``throughput`` is an estimate from dense BF16 tensor throughput (H100 and H200 share a
    peak; the H200's memory bandwidth is worth about 10 % on these models). Prices are
    assumptions: typical on-demand cloud list prices per GPU-hour, 2025.
    """

    name: str
    throughput: float
    usd_per_hour: float
    memory_gb: int
    note: str = "estimate"


GPU_CLASSES: dict[str, GpuClass] = {
    "h200": GpuClass("h200", 1.00, 3.80, 141, "reference (measured figures below are H200)"),
    "h100": GpuClass("h100", 0.90, 3.00, 80),
    "a100": GpuClass("a100", 0.32, 1.80, 80),
    "l40s": GpuClass("l40s", 0.35, 1.90, 48),
    "a10g": GpuClass("a10g", 0.08, 1.00, 24),
    "l4": GpuClass("l4", 0.10, 0.80, 24),
}
H200_OVER_H100 = 1.0 / GPU_CLASSES["h100"].throughput


@dataclass(frozen=True)
class FamilyCost:
    """One family's H200 cost at a reference clip; other sizes scale with pixels x frames.

    Attributes:
        step_s: seconds per denoising step at the reference clip.
        decode_s: VAE decode (and the rest of one call) at the reference clip.
        ref: (width, height, frames) the figures were taken at.
        load_s: loading the model onto a GPU (an estimate for every family).
        measured: True when step_s and decode_s were measured on an H200.
        source: where the figures come from.
    """

    step_s: float
    decode_s: float
    ref: tuple[int, int, int]
    load_s: float
    measured: bool
    source: str


def _from_cost_model(family: str, ref: tuple[int, int, int], load_s: float) -> FamilyCost:
    """An H200 entry derived from families.py's cost model (published H100 figures)."""
    rule = FAMILIES[family]
    w, h, n = ref
    per_step = rule.gpu_s_per_frame_mp_step * n * w * h / 1e6
    return FamilyCost(per_step / H200_OVER_H100, rule.gpu_s_fixed / H200_OVER_H100, ref, load_s, False,
                      f"estimate: families.py cost model (H100) / {H200_OVER_H100:.2f}")


FAMILY_COSTS: dict[str, FamilyCost] = {
    "ltx": FamilyCost(0.14, 1.4, (768, 512, 121), 20.0, True,
                      "measured on H200: 0.14 s/step, 1.3-1.5 s decode"),
    "svd": FamilyCost(3.04, 2.9, (1024, 576, 25), 15.0, True, "measured on H200: 3.04 s/step, 2.9 s decode"),
    "wan": _from_cost_model("wan", (832, 480, 81), 90.0),
    "wan_vace": _from_cost_model("wan_vace", (832, 480, 81), 90.0),
    "cogvideox": _from_cost_model("cogvideox", (720, 480, 49), 40.0),
    "animatic": _from_cost_model("animatic", (1024, 576, 48), 0.0),
}


def chunk_seconds(family: str, gpu: str, width: int, height: int, frames: int, steps: int) -> float:
    """GPU-seconds of one model call (linear in pixels x frames: attention's growth is ignored)."""
    fc = FAMILY_COSTS[family]
    rw, rh, rn = fc.ref
    scale = (width * height * frames) / (rw * rh * rn)
    return (fc.step_s * steps + fc.decode_s) * scale / GPU_CLASSES[gpu].throughput


def sim_jobs(plan: RenderPlan, gpu: str = "h200") -> tuple[list[Job], dict[str, tuple[float, int]]]:
    """The plan's chunks as scheduler jobs (planner estimates), and each one's true cost.

    Returns:
        (jobs, costs): ``costs[key] = (GPU-seconds on ``gpu``, denoising steps)``.
    """
    jobs: list[Job] = []
    costs: dict[str, tuple[float, int]] = {}
    for shot in plan.shots:
        model = shot.model
        family = "animatic" if model.backend == "animatic" else str(model.family)
        steps = model.steps or model.rule().default_steps
        mkey = f"{family}:{getattr(model, 'id', None) or family}"
        cls = cost_class(family, shot.width, shot.height, steps)
        for c in shot.chunks:
            jobs.append(Job(c.key, c.name, shot.shot_id, c.est_gpu_s, mkey, c.depends_on,
                            cost=cls, frames=c.num_frames))
            costs[c.key] = (chunk_seconds(family, gpu, shot.width, shot.height, c.num_frames, steps), steps)
    return jobs, costs


# --- the simulation ------------------------------------------------------------------------
@dataclass(frozen=True)
class SimSpec:
    """What is simulated.

    Attributes:
        gpus: GPUs in all.
        gpu: GPU class (a key of ``GPU_CLASSES``).
        gpus_per_node: GPUs per node (a preemption takes a whole node).
        preempt_per_gpu_hour: spot preemptions per GPU-hour (Poisson, per node).
        checkpoint_steps: a chunk saves its latents every this many steps (0: never); a
            preempted chunk resumes from its last save.
        replace_s: seconds before a preempted node's replacement joins.
        load_s: seconds a worker takes to load a model (None: the family table's figure).
        seed: the preemption draw.
        rules: the scheduler's policy.
        learn: the scheduler learns costs from measured chunks.
        chunk_overhead_s: seconds each chunk holds its worker beyond its GPU time (reading the
            chunk it continues from, encoding and committing its frames, the driver's round
            trip); not part of the bound, which counts GPU time only.
    """

    gpus: int
    gpu: str = "h200"
    gpus_per_node: int = 8
    preempt_per_gpu_hour: float = 0.0
    checkpoint_steps: int = 0
    replace_s: float = 120.0
    load_s: float | None = None
    seed: int = 0
    rules: Rules = field(default_factory=Rules)
    learn: bool = True
    chunk_overhead_s: float = 0.0


@dataclass
class SimResult:
    """What a simulated run came to (seconds unless named otherwise)."""

    makespan: float
    bound: float
    total_gpu_s: float  # every chunk's cost once: the work itself
    critical_path_s: float  # longest dependency chain, true costs
    critical_path_chunks: int
    gpus: int
    gpu: str
    gpu_hours_held: float
    usd: float
    load_s: float = 0.0  # GPU time spent loading models
    lost_s: float = 0.0  # GPU time lost to preemptions (work since the last checkpoint)
    preemptions: int = 0
    retries: int = 0
    failed: int = 0
    chunks: int = 0
    rechains: int = 0
    events: int = 0

    @property
    def ratio(self) -> float:
        """Makespan over its lower bound (1.0 is perfect)."""
        return self.makespan / self.bound if self.bound else math.nan

    @property
    def utilisation(self) -> float:
        """Chunk work over GPU time held."""
        held = self.gpu_hours_held * 3600
        return self.total_gpu_s / held if held else math.nan


def bound(jobs: Sequence[Job], costs: dict[str, tuple[float, int]], gpus: int) -> tuple[float, float, int]:
    """(bound, critical path seconds, its chunks) for true ``costs`` on ``gpus`` GPUs.

    The same longest-chain walk as :func:`~reelfarm.cluster.scheduler.chain_estimates`,
    on true costs, counting chunks along the way.
    """
    chain: dict[str, tuple[float, int]] = {}
    tail: dict[str, tuple[float, int]] = {}  # key -> longest chain continuing from it
    for j in reversed(jobs):
        t = tail.get(j.key, (0.0, 0))
        c = chain[j.key] = (costs[j.key][0] + t[0], t[1] + 1)
        if j.depends_on and c > tail.get(j.depends_on, (0.0, 0)):
            tail[j.depends_on] = c
    del tail
    cp, n = max(chain.values(), default=(0.0, 0))
    total = sum(c for c, _ in costs.values())
    return max(total / gpus, cp), cp, n


_FINISH, _READY, _PREEMPT = 0, 1, 2


class _Sim:
    def __init__(self, jobs: list[Job], costs: dict[str, tuple[float, int]], spec: SimSpec) -> None:
        self.spec, self.costs = spec, costs
        self.now = 0.0
        self.sched = Scheduler(jobs, spec.rules, clock=lambda: self.now, learn=spec.learn)
        self.rng = random.Random(spec.seed)
        self.events: list[tuple[float, int, int, str, int]] = []
        self.seq = itertools.count()
        self.queues: dict[str, deque[tuple[str, bool]]] = {}  # worker -> (key, loads), head running
        self.started: dict[str, float] = {}  # worker -> when its head began
        self.token: dict[str, int] = {}  # worker or node -> epoch (stale events are ignored)
        self.node_of: dict[str, str] = {}
        self.workers_on: dict[str, list[str]] = {}
        self.node_since: dict[str, float] = {}
        self.ready_at: dict[str, float] = {}
        self.saved: dict[str, float] = {}  # key -> checkpointed seconds of work
        self.family_load = {j.model: self._load_s(j.model) for j in jobs}
        self.held_s = 0.0
        self.load_total = 0.0
        self.lost = 0.0
        self.preemptions = 0
        self.n_events = 0
        self.wids = itertools.count()
        self.defer: list | None = None
        self.nodes = itertools.count()

    def _load_s(self, model: str) -> float:
        if self.spec.load_s is not None:
            return self.spec.load_s
        fc = FAMILY_COSTS.get(model.split(":", 1)[0])
        return fc.load_s if fc else 0.0

    def push(self, t: float, kind: int, who: str, token: int) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, who, token))

    # 1. Nodes come and go.
    def node_up(self, boot_s: float = 0.0) -> None:
        """A node joins now; its workers are ready after ``boot_s`` (a replacement booting)."""
        spec = self.spec
        name = f"node-{next(self.nodes)}"
        self.ready_at[name] = self.now + boot_s
        self.node_since[name] = self.now
        self.workers_on[name] = []
        self.token[name] = 0
        if spec.preempt_per_gpu_hour > 0:
            rate = spec.preempt_per_gpu_hour * spec.gpus_per_node / 3600.0
            self.push(self.now + self.rng.expovariate(rate), _PREEMPT, name, 0)
        decisions = self.sched.on(NodeUp(name, self._slots.pop(), gpu=True))
        if self.defer is not None:
            self.defer += decisions
        else:
            self.apply(decisions)

    def preempt(self, node: str) -> None:
        self.preemptions += 1
        slots = len(self.workers_on[node])
        for wid in self.workers_on.pop(node):
            self.stop(wid)
        self.held_s += (self.now - self.node_since.pop(node)) * slots
        # The replacement is asked for at once: the scheduler counts its workers as coming.
        if not self.sched.finished:
            self._slots.append(slots)
            self.node_up(boot_s=self.spec.replace_s)
        self.apply(self.sched.on(NodeDown(node)))

    # 2. Workers run their queue head.
    def start(self, wid: str) -> None:
        key, loads = self.queues[wid][0]
        self.started[wid] = self.now
        cost, _ = self.costs[key]
        load = self.family_load[self.sched.jobs[key].model] if loads else 0.0
        self.push(self.now + load + cost + self.spec.chunk_overhead_s - self.saved.get(key, 0.0), _FINISH, wid,
                  self.token[wid])

    def stop(self, wid: str) -> None:
        """``wid`` is gone: its running chunk keeps only what it checkpointed."""
        self.token[wid] += 1
        q = self.queues.pop(wid)
        if not q:
            return
        key, loads = q[0]
        cost, steps = self.costs[key]
        load = self.family_load[self.sched.jobs[key].model] if loads else 0.0
        ran = self.now - self.started[wid]
        done = self.saved.get(key, 0.0) + max(0.0, ran - load)
        k = self.spec.checkpoint_steps
        keep = 0.0
        if k > 0 and steps > 0:
            every = cost * k / steps  # seconds between saves (decode spread over the steps)
            keep = min(cost, math.floor(done / every) * every)
        self.saved[key] = keep
        self.load_total += min(ran, load)
        self.lost += done - keep

    def finish(self, wid: str) -> None:
        q = self.queues[wid]
        key, loads = q.popleft()
        cost, _ = self.costs[key]
        load = self.family_load[self.sched.jobs[key].model] if loads else 0.0
        self.load_total += load
        seconds = load + cost + self.spec.chunk_overhead_s - self.saved.pop(key, 0.0)  # what the worker reports
        if q:  # the actor starts its next queued call before the driver hears of this one
            self.start(wid)
        self.apply(self.sched.on(ChunkDone(wid, key, seconds=seconds)))

    # 3. Decisions become events.
    def apply(self, decisions: list) -> None:
        pending = deque(decisions)
        while pending:
            d = pending.popleft()
            if isinstance(d, Submit):
                q = self.queues[d.worker]
                q.append((d.key, d.loads))
                if len(q) == 1:
                    self.start(d.worker)
            elif isinstance(d, Spawn):
                wid = f"w{next(self.wids)}"
                self.queues[wid] = deque()
                self.token[wid] = 0
                self.node_of[wid] = d.node
                self.workers_on[d.node].append(wid)
                if self.ready_at[d.node] > self.now:
                    self.push(self.ready_at[d.node], _READY, wid, 0)
                else:
                    pending.extend(self.sched.on(WorkerReady(wid, d.node)))
            elif isinstance(d, Kill):
                if d.worker in self.queues:
                    self.stop(d.worker)
                    self.queues[d.worker] = deque()
            elif isinstance(d, (Requeue, Fail)):
                pass  # counted by the scheduler

    def run(self) -> float:
        spec = self.spec
        full, rest = divmod(spec.gpus, spec.gpus_per_node)
        self._slots = [rest] * bool(rest) + [spec.gpus_per_node] * full
        # Every node is known before its workers report (else the first would queue two).
        self.defer = []
        while self._slots:
            self.node_up()
        deferred, self.defer = self.defer, None
        self.apply(deferred)
        last = 0.0
        sched = self.sched
        events = self.events
        while events and not sched.finished:
            t, _, kind, who, token = heapq.heappop(events)
            self.now = t
            self.n_events += 1
            if kind == _FINISH:
                if token == self.token.get(who, -1):
                    self.finish(who)
                    last = t
            elif kind == _PREEMPT:
                if who in self.workers_on:
                    self.preempt(who)
            elif kind == _READY:
                if token == self.token.get(who, -1):
                    self.apply(self.sched.on(WorkerReady(who, self.node_of[who])))
        for node, since in self.node_since.items():
            self.held_s += (last - since) * len(self.workers_on.get(node, ()))
        return last


def simulate(jobs: Sequence[Job], costs: dict[str, tuple[float, int]], spec: SimSpec) -> SimResult:
    """Run ``jobs`` (their ``est_s`` is what the scheduler believes) at true ``costs``.

    Args:
        jobs: every chunk, in plan order.
        costs: ``key -> (GPU-seconds on spec.gpu, denoising steps)``.
        spec: GPUs, preemptions and policy.
    """
    if spec.gpu not in GPU_CLASSES:
        raise ValueError(f"`gpu` must be one of {', '.join(GPU_CLASSES)}, got {spec.gpu!r}")
    if spec.gpus < 1:
        raise ValueError(f"`gpus` must be at least 1, got {spec.gpus}")
    jobs = list(jobs)
    b, cp, cp_n = bound(jobs, costs, spec.gpus)
    sim = _Sim(jobs, costs, spec)
    makespan = sim.run()
    gpu_h = sim.held_s / 3600
    s = sim.sched
    return SimResult(
        makespan=makespan, bound=b, total_gpu_s=sum(c for c, _ in costs.values()),
        critical_path_s=cp, critical_path_chunks=cp_n, gpus=spec.gpus, gpu=spec.gpu,
        gpu_hours_held=gpu_h, usd=gpu_h * GPU_CLASSES[spec.gpu].usd_per_hour,
        load_s=sim.load_total, lost_s=sim.lost, preemptions=sim.preemptions, retries=s.retries,
        failed=len(s.failed), chunks=len(jobs), rechains=s.rechains, events=sim.n_events,
    )


def simulate_plans(plans: Sequence[RenderPlan], *, gpus: int, gpu: str = "h200", **spec: Any) -> SimResult:
    """Simulate rendering ``plans`` together (a campaign's cells; a chunk shared by cells once)."""
    jobs: list[Job] = []
    costs: dict[str, tuple[float, int]] = {}
    for plan in plans:
        pj, pc = sim_jobs(plan, gpu)
        for j in pj:
            if j.key not in costs:
                jobs.append(j)
                costs[j.key] = pc[j.key]
    return simulate(jobs, costs, SimSpec(gpus=gpus, gpu=gpu, **spec))


def summary(r: SimResult) -> dict[str, Any]:
    """The figures a user reads, in seconds, with the bound they are judged by."""
    return {
        "chunks": r.chunks,
        "gpus": f"{r.gpus} x {r.gpu}",
        "makespan_s": r.makespan,
        "bound_s": r.bound,
        "makespan_over_bound": r.ratio,
        "critical_path_s": r.critical_path_s,
        "critical_path_chunks": r.critical_path_chunks,
        "gpu_time_s": r.total_gpu_s,
        "utilisation": r.utilisation,
        "model_load_s": r.load_s,
        "preemptions": r.preemptions,
        "lost_to_preemption_s": r.lost_s,
        "failed_chunks": r.failed,
        "gpu_hours_held": r.gpu_hours_held,
        "usd": r.usd,
        "usd_per_gpu_hour": GPU_CLASSES[r.gpu].usd_per_hour,
    }
